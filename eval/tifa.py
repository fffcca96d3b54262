"""TIFA (Hu et al. 2023): per-question correctness -> mean per caption -> mean over captions.

As the official code scores it (github.com/Yushi-Hu/tifa, `tifascore/tifa_score.py`): a question scores 1
when the VQA answer, mapped to the nearest choice (`tifa_mapping`), equals `answer` as a string (exactly;
`normalise` ignores case and surrounding space); TIFA is the mean over captions of the per-caption mean,
with the sample stdev over captions; accuracy per element type pools questions. `official_result` writes
the official result file (tifa_average, tifa_stdev, accuracy_by_type, question_details, caption_scores).

Question files follow TIFA v1.0 (`tifa_v1.0_question_answers.json`): a JSON list of records with
`id` (the caption's id, shared by its questions), `caption`, `question`, `choices`, `answer`,
`element_type`, `element` (+ `coco_val_id`). Records from `prompt-cdm world questions` have the same
`id` and also carry `question_id`, `caption_id` and a `program` the judge evaluates exactly.

    prompt-cdm world render --domain base --n 200 --heldout --out runs/tifa/base
    prompt-cdm world questions --from runs/tifa/base --out runs/tifa/base_q.json
    prompt-cdm eval tifa --questions runs/tifa/base_q.json --images runs/tifa/base --backend judge \
        --out runs/tifa/base.json        # + base.jsonl (per question) + base.md (table)
    prompt-cdm eval tifa --questions tifa_v1.0_question_answers.json --backend answers \
        --answers mplug_result.json --format official --out tifa.json   # + tifa.official.json

Images are `<caption id>.png` (or .jpg/.jpeg/.webp) in a folder, the official id -> path JSON, or
generated on the fly (written to disk as generated, 64 captions at a time); files are read in chunks, never
all held. Bad input (records lacking keys, images missing for some ids, questions the backend cannot
answer) is skipped and named in the result; `run_tifa` writes what it could score, then raises EvalError.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from prompt_cdm.util.io import read_json

from .errors import EvalError

REQUIRED_KEYS = ("id", "caption", "question", "choices", "answer", "element_type")
TIFA_KEYS = REQUIRED_KEYS
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def caption_key(rec: dict) -> str:
    """The caption a question belongs to: `caption_id` (our files), else TIFA v1.0's `id`, else the caption."""
    for k in ("caption_id", "id"):
        if rec.get(k) not in (None, ""):
            return str(rec[k])
    return str(rec["caption"])


def correct(choice, answer, normalise: bool = False) -> int:
    """1 when the mapped choice is the answer: exact string equality as the official code
    (`int(mc_answer == answer)`), or ignoring case and surrounding space with `normalise`."""
    if normalise:
        return int(str(choice).strip().lower() == str(answer).strip().lower())
    return int(choice == answer)


def _stdev(xs: list[float]) -> float | None:
    """Sample standard deviation (`statistics.stdev`, as the official tifa_stdev); None under 2 values."""
    from statistics import stdev

    return stdev(xs) if len(xs) > 1 else None


def score(records: list[dict], answers: list[str], normalise: bool = False) -> dict:
    """TIFA score (mean over captions of the per-caption accuracy), its sample stdev over captions and
    the accuracy per element type (pooled over questions), from records and the mapped answers (same
    order). Correctness is exact string equality unless `normalise` (see `correct`)."""
    if len(records) != len(answers):
        raise ValueError(f"{len(records)} questions but {len(answers)} answers")
    per_caption: dict[str, list[float]] = defaultdict(list)
    per_type: dict[str, list[float]] = defaultdict(list)
    for rec, ans in zip(records, answers):
        ok = float(correct(ans, rec["answer"], normalise))
        per_caption[caption_key(rec)].append(ok)
        per_type[rec["element_type"]].append(ok)
    cap_means = [sum(v) / len(v) for v in per_caption.values()]
    return {
        "score": sum(cap_means) / len(cap_means) if cap_means else float("nan"),
        "stdev": _stdev(cap_means),
        "by_type": {k: sum(v) / len(v) for k, v in sorted(per_type.items())},
        "n_captions": len(cap_means),
        "n_questions": len(records),
    }


def official_result(rows: Sequence[dict]) -> dict:
    """The official `tifa_score_benchmark` result from our per-question rows (each a question record plus
    free_form_vqa, multiple_choice_vqa, score): tifa_average, tifa_stdev, accuracy_by_type (first-seen
    order), question_details {id: {question: record + free_form_vqa, multiple_choice_vqa, scores}} and
    caption_scores. As the official loop, a question asked twice for one id keeps its first record and
    its last answers, and both askings count."""
    from statistics import mean

    details: dict[str, dict] = defaultdict(dict)
    per_caption: dict[str, list[int]] = defaultdict(list)
    per_type: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        rec = {k: v for k, v in row.items() if k not in ("free_form_vqa", "multiple_choice_vqa", "score")}
        log = details[rec["id"]].setdefault(rec["question"], rec)
        log.update(free_form_vqa=row["free_form_vqa"], multiple_choice_vqa=row["multiple_choice_vqa"],
                   scores=row["score"])
        per_caption[rec["id"]].append(row["score"])
        per_type[rec["element_type"]].append(row["score"])
    averaged = [mean(v) for v in per_caption.values()]
    return {"tifa_average": mean(averaged) if averaged else None, "tifa_stdev": _stdev(averaged),
            "accuracy_by_type": {k: mean(v) for k, v in per_type.items()},
            "question_details": dict(details),
            "caption_scores": {k: mean(v) for k, v in per_caption.items()}}


def chance(records: list[dict]) -> float:
    """The TIFA score of guessing uniformly among each question's choices (the lower sanity bound)."""
    per_caption: dict[str, list[float]] = defaultdict(list)
    for rec in records:
        per_caption[caption_key(rec)].append(1.0 / max(1, len(rec["choices"])))
    means = [sum(v) / len(v) for v in per_caption.values()]
    return sum(means) / len(means) if means else float("nan")


# ---------------------------------------------------------------- question files


def check_record(rec) -> str | None:
    """What is wrong with one record (None if it can be scored)."""
    if not isinstance(rec, dict):
        return f"is a {type(rec).__name__}, not an object"
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(rec["choices"], list) or not rec["choices"]:
        return "has no list of `choices`"
    return None


@dataclass
class QuestionFile:
    """The scorable records of a question file and, per bad record, what is wrong with it."""

    path: str
    records: list[dict]
    problems: list[str] = field(default_factory=list)


def load_questions(path: str | Path) -> QuestionFile:
    """Read a TIFA v1.0 question file; records lacking required keys are set aside and named.
    Raises EvalError when the file itself cannot be read as a JSON list of records."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"question file {path} does not exist (write one with `prompt-cdm world questions` "
                        "or use TIFA's tifa_v1.0_question_answers.json)")
    data = read_json(path, EvalError, "a TIFA question file is a JSON list of records")
    if not isinstance(data, list):
        raise EvalError(f"question file {path} must be a JSON list of TIFA records, got a {type(data).__name__}")
    if data and all(isinstance(r, dict) and "caption" in r and "question" not in r for r in data):
        raise EvalError(f"{path} is a TIFA text-inputs file ({len(data)} captions, no questions): pass its question "
                        "file as --questions (e.g. tifa_v1.0_question_answers.json)")
    records, problems = [], []
    for k, rec in enumerate(data):
        why = check_record(rec)
        if why is None:
            records.append(rec)
        else:
            rid = rec.get("question_id", rec.get("id")) if isinstance(rec, dict) else None
            problems.append(f"record {k}" + (f" (id {rid})" if rid is not None else "") + f" {why}")
    return QuestionFile(str(path), records, problems)


def caption_ids(records: Sequence[dict]) -> list[str]:
    """Caption ids in first-seen order."""
    return list(dict.fromkeys(caption_key(r) for r in records))


def captions_by_id(records: Sequence[dict]) -> dict[str, str]:
    return {caption_key(r): r["caption"] for r in reversed(records)}


def find_images(source: str | Path, ids: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    """The image of each caption id -> ({id: path}, missing ids). `source`: a folder of `<id>.png` (or
    .jpg/.jpeg/.webp), or the official id -> image path JSON (`sample_imgs.json`; relative paths are
    relative to the JSON's folder, as `tifa_score_benchmark` reads them)."""
    source = Path(source)
    if source.is_file() and source.suffix == ".json":
        table = read_json(source, EvalError, "an image list is a JSON object {caption id: image path}")
        if not isinstance(table, dict):
            raise EvalError(f"image list {source} must be a JSON object {{caption id: image path}}, "
                            f"got a {type(table).__name__}")
        found, missing = {}, []
        for i in ids:
            p = table.get(str(i))
            p = None if p is None else (Path(p) if Path(p).is_absolute() else source.parent / p)
            if p is not None and p.is_file():
                found[i] = p
            else:
                missing.append(i)
        return found, missing
    if not source.is_dir():
        raise EvalError(f"image folder {source} does not exist (--images: a folder of <id>.png or an "
                        "id -> path JSON)")
    found, missing = {}, []
    for i in ids:
        for suf in IMAGE_SUFFIXES:
            p = source / f"{i}{suf}"
            if p.is_file():
                found[i] = p
                break
        else:
            missing.append(i)
    return found, missing


def load_image(path: str | Path):
    """One image file as an RGB PIL image (read now, file closed)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def load_images(paths: dict[str, Path]) -> dict:
    return {i: load_image(p) for i, p in paths.items()}


class ImageFiles(Mapping):
    """{caption id: image} read from disk on access and not kept: `evaluate` holds one chunk of images
    at a time, so memory stays flat however many images there are."""

    def __init__(self, paths: dict[str, Path]):
        self.paths = dict(paths)

    def __getitem__(self, key):
        return load_image(self.paths[key])

    def __iter__(self):
        return iter(self.paths)

    def __len__(self):
        return len(self.paths)

    def __contains__(self, key):
        return key in self.paths


# ---------------------------------------------------------------- scoring


@dataclass
class TifaRun:
    """The result (`result`: score, by_type, counts, what was skipped) and one row per question."""

    result: dict
    rows: list[dict]


def _chunks(ids: list[str], size: int):
    for s in range(0, len(ids), size):
        yield ids[s: s + size]


def evaluate(records: Sequence[dict], images: Mapping | None, backend, mapper=None,
             invalid_records: Sequence[str] = (), normalise: bool = False, chunk: int = 64) -> TifaRun:
    """Score `records` on `images` ({caption id: PIL image}, e.g. `ImageFiles`) with a VQA `backend`
    (`vqa.VQABackend`). A backend that needs no images (`needs_images` False: pre-computed answers)
    takes `images=None`.

    Images are read `chunk` captions at a time and dropped after their questions are answered. Questions
    whose image is absent (`missing_images`: their caption ids) or that the backend cannot answer
    (`unanswerable`) are skipped and named in the result; the score is over the rest. A free-form
    backend needs `mapper` (`tifa_mapping.ChoiceMapper`). Correctness is exact string equality as the
    official code, or ignoring case and space with `normalise`. `invalid_records`: the question file's
    problems, passed on."""
    if backend.free_form and mapper is None:
        raise EvalError(f"backend {backend.name!r} answers free-form: pass a ChoiceMapper")
    if images is None and getattr(backend, "needs_images", True):
        raise EvalError(f"backend {backend.name!r} needs images: give --images DIR (or an id -> path JSON)")
    todo, unanswerable = [], {}
    for r in records:
        if images is not None and caption_key(r) not in images:
            continue
        why = backend.unanswerable(r)
        if why is None:
            todo.append(r)
        else:
            unanswerable.setdefault(why, []).append(str(r.get("question_id", r.get("id"))))
    by_caption: dict[str, list[int]] = defaultdict(list)
    for k, r in enumerate(todo):
        by_caption[caption_key(r)].append(k)
    free: list = [None] * len(todo)
    for ids in _chunks(list(by_caption), chunk):
        held = {i: images[i] for i in ids} if images is not None else {}  # read once per caption
        idx = [k for i in ids for k in by_caption[i]]
        answers = backend.answer([held.get(caption_key(todo[k])) for k in idx], [todo[k] for k in idx])
        for k, a in zip(idx, answers):
            free[k] = a
        del held
    mc = mapper.map(free, [r["choices"] for r in todo]) if backend.free_form and todo else list(free)
    rows = [dict(r, free_form_vqa=f, multiple_choice_vqa=m, score=correct(m, r["answer"], normalise))
            for r, f, m in zip(todo, free, mc)]
    res = score(todo, mc, normalise) if todo else {"score": None, "stdev": None, "by_type": {}, "n_captions": 0,
                                                    "n_questions": 0}
    if res["score"] != res["score"]:  # nan
        res["score"] = None
    per_caption: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        per_caption[caption_key(row)].append(row["score"])
    res.update(
        chance=chance(todo) if todo else None,
        backend=backend.name,
        vqa_model=getattr(backend, "model_name", None),
        mapping=mapper.describe() if backend.free_form else None,
        answer_match="normalised" if normalise else "exact",
        caption_scores={k: sum(v) / len(v) for k, v in per_caption.items()},
        missing_images=[] if images is None else [i for i in caption_ids(records) if i not in images],
        invalid_records=list(invalid_records),
        unanswerable={why: ids for why, ids in unanswerable.items()},
    )
    return TifaRun(res, rows)


def table(result: dict) -> str:
    """The result as a Markdown table: TIFA, chance level, then accuracy per element type."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = ["| metric | value |", "|---|---|",
             f"| TIFA ({result['n_captions']} captions, {result['n_questions']} questions) | {fmt(result['score'])} |",
             f"| chance (uniform guess) | {fmt(result.get('chance'))} |"]
    lines += [f"| accuracy: {k} | {fmt(v)} |" for k, v in result["by_type"].items()]
    skipped = [(len(result.get("missing_images", [])), "caption ids without an image"),
               (len(result.get("invalid_records", [])), "records lacking keys"),
               (sum(len(v) for v in result.get("unanswerable", {}).values()), "questions the backend cannot answer")]
    lines += [f"| skipped: {what} | {n} |" for n, what in skipped if n]
    return "\n".join(lines) + "\n"


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """RESULT.json -> (RESULT.json, RESULT.jsonl per question, RESULT.md table); with `--format official`
    also RESULT.official.json (`official_path`)."""
    out = Path(out)
    if out.suffix != ".json":
        raise EvalError(f"--out {out}: give a .json path (the per-question .jsonl and the .md table go beside it)")
    return out, out.with_suffix(".jsonl"), out.with_suffix(".md")


def official_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".official.json")


def write_outputs(run: TifaRun, out: str | Path, official: bool = False) -> tuple[Path, Path, Path]:
    """Write RESULT.json, .jsonl and .md (and, with `official`, RESULT.official.json in the official shape)."""
    from prompt_cdm.util.io import write_json, write_jsonl, write_text

    res_p, rows_p, md_p = output_paths(out)
    write_json(res_p, run.result)
    write_jsonl(rows_p, run.rows)
    write_text(md_p, table(run.result))
    if official:
        write_json(official_path(out), official_result(run.rows), indent=4)
    return res_p, rows_p, md_p


def problems_line(result: dict, limit: int = 5) -> str | None:
    """One line naming everything that was skipped (None if nothing was)."""
    def few(xs):
        xs = list(xs)
        return ", ".join(xs[:limit]) + (f", ... ({len(xs)} in all)" if len(xs) > limit else "")

    parts = []
    if result["invalid_records"]:
        parts.append(f"{len(result['invalid_records'])} record(s) unusable: {few(result['invalid_records'])}")
    if result["missing_images"]:
        parts.append(f"no image for {len(result['missing_images'])} caption id(s): {few(result['missing_images'])}")
    for why, ids in result["unanswerable"].items():
        parts.append(f"{len(ids)} question(s) unanswerable ({why}): {few(ids)}")
    return "; ".join(parts) or None


def image_generator(backbone: str = "tiny", adapters: Sequence[str] = (), steps: int = 25, guidance: float = 5.0,
                    seed: int = 0, device=None, dtype=None) -> Callable[[list[str]], list]:
    """captions -> images with a backbone alone, or composing adapter folders (uniform weights; one adapter:
    plain diffusers semantics, per-source unconditional row) -- `prompt-cdm generate`'s defaults; the backbone
    placed on `device` in `dtype` (backbone.placement). `generate(captions, offset)`: the captions starting at
    index `offset` of the whole list (a multiple of the batch size), so generating in chunks gives the same
    images as one call; the backbone loads once."""
    state: dict = {}

    def generate(captions: list[str], offset: int = 0) -> list:
        from prompt_cdm.backbone.loading import load_quietly
        from prompt_cdm.compose.pipeline import CDMPipeline
        from prompt_cdm.compose.request import ComposeRequest

        if "cdm" not in state:
            state["cdm"] = CDMPipeline(load_quietly(backbone, dtype, device), adapters=list(adapters))
        # the backbone alone draws noise per 64 prompts (text_to_image's batch), compositions per 16
        req = ComposeRequest(captions, steps=steps, guidance=guidance, seed=seed + offset,
                             batch_size=16 if adapters else 64)
        return state["cdm"](req, progress=True).images

    return generate


GENERATE_CHUNK = 64  # captions generated, written and dropped at a time (a multiple of both batch sizes above)


def _generated(generate: Callable, ids: list[str], captions: Mapping[str, str], folder: Path) -> dict[str, Path]:
    """Generate the captions' images chunk by chunk into `folder` as <id>.png -> {id: path}. A generator that
    takes (captions, offset) is called per GENERATE_CHUNK captions; one that takes only captions, once."""
    import inspect

    from prompt_cdm.util.io import save_image

    takes_offset = len(inspect.signature(generate).parameters) >= 2
    step = GENERATE_CHUNK if takes_offset else max(1, len(ids))
    paths = {}
    for k in range(0, len(ids), step):
        part = ids[k: k + step]
        images = generate([captions[i] for i in part], k) if takes_offset else generate([captions[i] for i in part])
        for i, im in zip(part, images):
            paths[i] = folder / f"{i}.png"
            save_image(paths[i], im)
    return paths


def run_tifa(questions: str | Path, out: str | Path, backend, *, images: str | Path | None = None,
             generate: Callable[[list[str]], list] | None = None, save_images: str | Path | None = None,
             mapper=None, normalise: bool = False, official: bool = False) -> dict:
    """Score a question file on images and write RESULT.json, .jsonl and .md (+ RESULT.official.json in the
    official shape with `official`). Images: a folder of `<id>.png` or an id -> path JSON (`images`, read
    in chunks, never all held), or `generate(captions)` (saved as `<id>.png` in `save_images` if given);
    a backend that needs no images (pre-computed answers) takes neither, or `images` to score only the
    captions that have one. Writes the partial result, then raises EvalError, when records, images or
    answers were missing."""
    if images is not None and generate is not None:
        raise EvalError("give an image folder (--images DIR) or a generator (--backbone ...), not both")
    if images is None and generate is None and backend.needs_images:
        raise EvalError(f"backend {backend.name!r} needs images: give an image folder (--images DIR) or a "
                        "generator (--backbone ...)")
    output_paths(out)
    qf = load_questions(questions)
    ids = caption_ids(qf.records)
    source: Mapping | None = None
    scratch = None
    if images is not None:
        source = ImageFiles(find_images(images, ids)[0])
    elif generate is not None:  # written as generated (to --save-images or a scratch folder), read back in chunks
        import tempfile

        if save_images is None:
            scratch = tempfile.TemporaryDirectory(prefix="tifa-images-")
        folder = Path(save_images if save_images is not None else scratch.name)
        source = ImageFiles(_generated(generate, ids, captions_by_id(qf.records), folder))
    if backend.free_form and mapper is None:
        from .tifa_mapping import get_mapper

        mapper = get_mapper(normalise=normalise)
    try:
        run = evaluate(qf.records, source, backend, mapper, invalid_records=qf.problems, normalise=normalise)
    finally:
        if scratch is not None:
            scratch.cleanup()
    run.result.update(questions=str(questions), images=str(images if images is not None else save_images or ""))
    res_p, _, _ = write_outputs(run, out, official=official)
    problem = problems_line(run.result)
    if problem:
        raise EvalError(f"{problem}; scored the rest ({run.result['n_questions']} questions) -> {res_p}")
    return run.result
