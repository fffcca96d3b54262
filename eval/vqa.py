"""TIFA's VQA backends behind one small interface.

A backend answers TIFA records about images: `answer(images, records) -> [str]`, where images[k] is
the image records[k] asks about. A `free_form` backend (a Hugging Face VQA model, pre-computed answers)
answers in words, which TIFA maps to the nearest choice (`tifa_mapping.ChoiceMapper`); the judge
answers with a choice directly.

    backend = get_backend("judge")                           # the shapes world's judge: exact programs
    backend = get_backend("transformers", model="dandelin/vilt-b32-finetuned-vqa")   # or a local folder
    backend = get_backend("answers", answers="mplug_result.json")   # answers computed elsewhere
    mapper = get_mapper("official")                          # tifa_mapping: all-mpnet-base-v2
    mc = mapper.map(backend.answer(images, records), [r["choices"] for r in records])

The transformers backend (`vqa_hf.py`) runs BLIP, ViLT and GIT as the official loop does (TIFA's
recommended mPLUG-large is not in transformers: run it elsewhere and score its answers with
`answers`), and BLIP-2, InstructBLIP and chat VLMs with the choices in the prompt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .errors import EvalError
from .tifa_mapping import ChoiceMapper, _need  # noqa: F401  (ChoiceMapper lived here before)
from .vqa_base import VQABackend
from .vqa_hf import HF_VQA_MODELS, TransformersVQA  # noqa: F401


# ---------------------------------------------------------------- backends


class JudgeVQA(VQABackend):
    """The embedded world's judge: reads each image into a spec once and evaluates each record's
    `program` on it (`world.questions.answer_program`), so it answers with one of the choices or
    'none' (the object asked about is not there: wrong for every question). It knows only the shapes
    world, so records without a `program` (e.g. the official TIFA v1.0 file) are refused."""

    name, free_form = "judge", False

    def __init__(self, judge=None, weights: str | Path | None = None):
        from prompt_cdm.world.judge import JUDGE_DIR, Judge

        try:
            self.judge = judge if judge is not None else Judge.load(weights or JUDGE_DIR)
        except FileNotFoundError as e:
            raise EvalError(str(e)) from None

    def unanswerable(self, record: dict) -> str | None:
        from prompt_cdm.world.questions import answer_program
        from prompt_cdm.world.spec import ObjectSpec, Spec

        prog = record.get("program")
        if not isinstance(prog, dict) or "op" not in prog:
            return ("the judge answers only shapes-world questions (records with a `program`, written by "
                    "`prompt-cdm world questions`); use --backend transformers --model MODEL for others")
        try:  # a program the judge cannot evaluate would stop the run halfway: try it on a spec holding its object
            obj = ObjectSpec(str(prog.get("shape") or "circle"), str(prog.get("color") or "red"), "small", 0, 0)
            answer_program(Spec("?", "plain", "flat", [obj], seed=-1), prog)
        except (KeyError, ValueError, TypeError, IndexError):
            return "its `program` is not one the judge can evaluate"
        return None

    def answer(self, images: Sequence, records: Sequence[dict]) -> list[str]:
        from prompt_cdm.world.questions import answer_program

        slot: dict[int, int] = {}
        unique = []
        for im in images:
            if id(im) not in slot:
                slot[id(im)] = len(unique)
                unique.append(im)
        specs = self.judge.read(unique) if unique else []
        return [answer_program(specs[slot[id(im)]], r["program"]) for im, r in zip(images, records)]


def read_answers(path: str | Path) -> dict[tuple[str, str], str]:
    """{(caption id, question): free-form answer} from a file of pre-computed answers: the official result
    JSON (`question_details` {id: {question: {free_form_vqa, ...}}}, as `tifa_score_benchmark` writes it),
    or a JSON list / .jsonl of {id, question, answer} (a row that has `free_form_vqa`, as our RESULT.jsonl,
    is read from that field, since its `answer` is the question file's)."""
    import json

    from prompt_cdm.util.io import read_json

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"answers file {path} does not exist (--answers: the official result JSON or a jsonl of "
                        "{id, question, answer})")
    fix = "an answers file is the official result JSON or a jsonl of {id, question, answer}"
    if path.suffix == ".jsonl":
        try:
            data = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvalError(f"{path} is not valid JSON lines ({e}); {fix}") from None
    else:
        data = read_json(path, EvalError, fix)
    out: dict[tuple[str, str], str] = {}
    if isinstance(data, dict) and isinstance(data.get("question_details"), dict):
        for cid, qs in data["question_details"].items():
            for q, rec in (qs.items() if isinstance(qs, dict) else ()):
                if isinstance(rec, dict) and "free_form_vqa" in rec:
                    out[(str(cid), q)] = rec["free_form_vqa"]
        return out
    if not isinstance(data, list):
        raise EvalError(f"answers file {path} is neither the official result (with question_details) nor a list "
                        f"of {{id, question, answer}}; {fix}")
    for k, row in enumerate(data):
        field = "free_form_vqa" if isinstance(row, dict) and "free_form_vqa" in row else "answer"
        if not isinstance(row, dict) or not {"id", "question", field} <= set(row):
            raise EvalError(f"answers file {path}: row {k} is not an object with id, question and answer; {fix}")
        out[(str(row["id"]), row["question"])] = row[field]
    return out


class AnswersVQA(VQABackend):
    """Answers computed elsewhere (mPLUG-large as TIFA recommends, OFA, BLIP-2, PromptCap, any VLM), read
    from a file (`read_answers`) and matched to the question file by (id, question); they are free-form
    and go through the mapping like any model's. Questions the file lacks are refused by id."""

    name, free_form, needs_images = "answers", True, False

    def __init__(self, answers: str | Path | None = None):
        if not answers:
            raise EvalError("the answers backend needs --answers FILE: the official result JSON or a jsonl of "
                            "{id, question, answer}")
        self.path = str(answers)
        self.answers = read_answers(answers)

    def unanswerable(self, record: dict) -> str | None:
        if (str(record["id"]), record["question"]) not in self.answers:
            return f"not in the answers file {self.path}: is it for another question file?"
        return None

    def answer(self, images: Sequence, records: Sequence[dict]) -> list[str]:
        return [self.answers[(str(r["id"]), r["question"])] for r in records]


BACKENDS: dict[str, type[VQABackend]] = {"judge": JudgeVQA, "transformers": TransformersVQA, "answers": AnswersVQA}


def get_backend(name: str, **options) -> VQABackend:
    """Build the backend registered as `name` (options: judge -- judge, weights; transformers -- model,
    processor, device, batch_size, max_length, max_new_tokens; answers -- answers)."""
    if name not in BACKENDS:
        raise EvalError(f"unknown VQA backend {name!r}; valid: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](**options)
