"""Write answers.json: realistic free-form VQA answers, each with a TIFA-style choice list and the choice
the official TIFA mapping picks for it (computed once, with the official code itself).

    git clone https://github.com/Yushi-Hu/tifa /tmp/tifa   # the official code (not copied here)
    python tests/eval/data/tifa_mapping/make_answers.py --tifa /tmp/tifa \
        --model ~/.cache/prompt_cdm/all-mpnet-base-v2        # unzipped by eval.tifa_mapping.official_model_dir()

The official logic (`tifascore/vqa_models.py::VQAModel.multiple_choice_vqa` + `mc_sbert.py`): an answer
that is in `choices` (exact string equality) is kept, any other goes to `SBERTModel.multiple_choice`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

# (choices, free-form answers a VQA model gives to such questions)
GROUPS = [
    (["yes", "no"], "yes|no|Yes|No|yes.|no.|nope|yeah|yep|not really|definitely|absolutely|of course|no way|i don't "
     "think so|maybe|probably|not sure|correct|false|true|it is|it is not|there is|there isn't|none|nothing|sure|"
     "negative|affirmative|kind of|somewhat|partially|no, it is not|yes it is|unclear|not at all|certainly|possibly|"
     "right|wrong|yes, there is|no one|nobody|always|never|both|neither|sometimes|unknown|can't tell|hard to say|"
     "not visible|i think so|looks like it|no idea|YES|NO"),
    (["1", "2", "3", "4"], "zero|one|two|three|four|five|several|a few|many|couple|a couple|pair|single|none|lots|"
     "dozen|6|0|2 dogs|three cats|a lot|few|multiple|both|twins|trio|only one|just one|no dogs|7|10|100|1 person|"
     "two people|one dog|four legs|a pair|alone|solo|double|triple|quadruple|numerous|some"),
    (["0", "1", "2", "3"], "zero|none|nothing|no|one|two|three|four|5|several|a few|couple|single|empty|all|pair|"
     "lots|only one|not any|many"),
    (["red", "blue", "green", "yellow"], "crimson|navy|scarlet|maroon|teal|turquoise|lime|olive|gold|dark red|"
     "light blue|pale green|dark green|sky blue|burgundy|cyan|indigo|amber|coral|mustard|emerald|lemon|cherry|"
     "royal blue|forest green|orange|purple|pink|Red|RED|red and white|blue and yellow|reddish|bluish|greenish|"
     "blonde|golden|neon|aqua|azure|ruby|sapphire|jade"),
    (["black", "white", "brown", "gray"], "charcoal|ivory|cream|beige|tan|silver|grey|dark|light|black and white|"
     "brownish|chocolate|coffee|snow|ebony|jet black|off white|dark brown|light gray|wooden|rust|bronze|khaki|"
     "transparent|clear|silver and black|dark gray|pale|blond|gold"),
    (["pink", "purple", "orange", "white"], "lavender|violet|magenta|peach|salmon|coral|fuchsia|lilac|tangerine|"
     "rose|plum|mauve|apricot|cream|ivory|snow white|hot pink|light purple|dark orange|red|yellow|multicolored|"
     "rainbow|pastel"),
    (["surfboard", "skateboard", "snowboard", "kite"], "board|surf board|paddle|wakeboard|ski|skis|longboard|"
     "boogie board|paddle board|kiteboard|sail|frisbee|umbrella|bag|towel|nothing|surfing board|white board|"
     "a surfboard|surfboards"),
    (["dog", "cat", "horse", "cow"], "puppy|kitten|pony|bull|calf|sheep|animal|pet|labrador|poodle|tabby|goat|"
     "dogs|cats|horses|cows|german shepherd|siamese|stallion|mare|cattle|ox|donkey|zebra|foal|golden retriever|"
     "husky|persian|kitty|doggy|bulldog|deer|elephant|bear|fox|wolf|lion|tiger"),
    (["walking", "running", "sitting", "standing"], "strolling|jogging|resting|lying down|sleeping|eating|playing|"
     "surfing|skiing|riding|waiting|posing|laying|walk|sit|crouching|jumping|dancing|sprinting|hiking|marching|"
     "kneeling|leaning|stand|run|moving|still|racing|relaxing|wandering"),
    (["beach", "park", "street", "kitchen"], "ocean|sand|shore|sea|grass|field|road|city|restaurant|indoors|outside|"
     "living room|bathroom|yard|garden|sidewalk|water|forest|mountain|snow|coast|seaside|lawn|highway|downtown|"
     "house|home|cafe|playground|alley"),
    (["round", "square", "triangular", "rectangular"], "circle|circular|oval|box|cube|triangle|rectangle|sphere|"
     "ball|star|heart|flat|long|curved|oblong|boxy|pyramid|cylinder|round shape|square shaped"),
    (["wood", "metal", "plastic", "glass"], "wooden|steel|iron|aluminum|stone|paper|ceramic|leather|cloth|fabric|"
     "rubber|brass|concrete|timber|bamboo|tin|chrome|porcelain|crystal|vinyl"),
    (["left", "right", "top", "bottom"], "on the left|to the right|above|below|under|behind|in front|next to|"
     "center|middle|beside|on top|underneath|left side|right side|upper|lower|up|down|corner"),
    (["pizza", "sandwich", "cake", "salad"], "pasta|bread|dessert|burger|hot dog|pie|vegetables|donut|cheese|soup|"
     "sushi|fruit|cookie|lettuce|sub|cupcake|birthday cake|pepperoni|food|lunch"),
    (["car", "bus", "truck", "bicycle"], "bike|motorcycle|van|suv|train|taxi|scooter|jeep|trolley|vehicle|cab|lorry|"
     "pickup|sedan|coach|tram|automobile|cycle|motorbike|minivan"),
    (["man", "woman", "child", "boy"], "person|guy|lady|girl|kid|baby|surfer|player|people|men|women|teenager|"
     "gentleman|toddler|male|female|adult|son|daughter|mother"),
]


def items() -> list[dict]:
    out = []
    for choices, answers in GROUPS:
        out += [{"answer": w, "choices": choices} for w in answers.split("|")]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tifa", required=True, help="a checkout of github.com/Yushi-Hu/tifa")
    p.add_argument("--model", required=True, help="the all-mpnet-base-v2 folder")
    p.add_argument("--out", default=str(Path(__file__).with_name("answers.json")))
    a = p.parse_args()
    spec = importlib.util.spec_from_file_location("mc_sbert", Path(a.tifa) / "tifascore" / "mc_sbert.py")
    mc_sbert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc_sbert)
    sbert = mc_sbert.SBERTModel(a.model)
    rows = []
    for it in items():
        official = it["answer"] if it["answer"] in it["choices"] else sbert.multiple_choice(it["answer"], it["choices"])
        rows.append(dict(it, official=official))
    doc = {"source": "free-form answers written for this test; `official`: the official TIFA mapping "
                     "(tifascore mc_sbert.py + all-mpnet-base-v2), by make_answers.py", "items": rows}
    Path(a.out).write_text(json.dumps({"source": doc["source"]})[:-1] + ', "items": [\n'
                           + ",\n".join(json.dumps(r) for r in rows) + "\n]}\n")
    print(f"{len(rows)} answers -> {a.out}")


if __name__ == "__main__":
    main()
