"""TIFA's VQA backend for transformers models: the official loop's models and today's VLMs.

One question per call by default, as the official `VQAModel.multiple_choice_vqa` loop asks them
(transformers' BLIP generate attends padded question positions, so a padded batch can change an
answer); `max_length=50` as the official `generate(..., max_length=50)`; answers are returned as
decoded, unstripped, for the official exact-match pre-check.

| model_type | class | how it is asked |
|---|---|---|
| vilt | ViltForQuestionAnswering | classifier over `config.id2label` (official VILT) |
| blip | BlipForQuestionAnswering | answer decoder, max_length 50 (official BLIP) |
| git | GitForCausalLM | [CLS] + question as the prompt, max_length 50 (official GIT) |
| blip-2, instructblip | Blip2/InstructBlipForConditionalGeneration | the official BLIP-2 prompt with the choices |
| any other image-text-to-text model (llava, paligemma, qwen2_vl, ...) | AutoModelForImageTextToText | the same prompt, through the processor's chat template when it has one |

For the prompted models `max_length` counts generated tokens (their prompt holds the image tokens).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from .errors import EvalError
from .tifa_mapping import _need, quiet_transformers
from .vqa_base import VQABackend


def choice_prompt(question: str, choices: Sequence[str]) -> str:
    """The official BLIP-2 multiple-choice prompt (`tifascore/vqa_models.py`, class BLIP2)."""
    if not choices:
        return f"Answer the question. Question: {question} Answer:"
    return f"Answer the multiple-choice question. Question: {question} Choices: {', '.join(choices)} Answer:"


def _vilt(backend: "TransformersVQA", images: list, records: list[dict]) -> list[str]:
    """ViLT: a classifier over its answer vocabulary (`config.id2label`)."""
    inp = backend.processor(images=images, text=[r["question"] for r in records], return_tensors="pt",
                            padding=True, truncation=True).to(backend.device)
    idx = backend.model(**inp).logits.argmax(-1).tolist()
    return [backend.model.config.id2label[i] for i in idx]


def _blip(backend: "TransformersVQA", images: list, records: list[dict]) -> list[str]:
    """BLIP: the answer decoder generates from the image and the question."""
    inp = backend.processor(images=images, text=[r["question"] for r in records], return_tensors="pt",
                            padding=True).to(backend.device)
    out = backend.model.generate(**inp, **backend.length())
    return backend.processor.batch_decode(out, skip_special_tokens=True)


def _git(backend: "TransformersVQA", images: list, records: list[dict]) -> list[str]:
    """GIT: the question is the prompt ([CLS] + question, no [SEP]); the answer is what follows it.
    One question per call, since a right-padded batch of prompts would break generation."""
    import torch

    tok = backend.processor.tokenizer
    pixels = backend.processor(images=images, return_tensors="pt").pixel_values.to(backend.device)
    answers = []
    for k, r in enumerate(records):
        ids = [tok.cls_token_id] + tok(r["question"], add_special_tokens=False).input_ids
        prompt = torch.tensor([ids], device=backend.device)
        out = backend.model.generate(pixel_values=pixels[k: k + 1], input_ids=prompt, **backend.length())
        answers.append(tok.decode(out[0, len(ids):], skip_special_tokens=True))
    return answers


def _prompted(backend: "TransformersVQA", images: list, records: list[dict]) -> list[str]:
    """BLIP-2, InstructBLIP and chat VLMs: the question and its choices in the official BLIP-2 prompt
    (wrapped in the processor's chat template when it has one, as a user turn holding the image); the
    answer is the generated text after the prompt. One question per call."""
    proc = backend.processor
    answers = []
    for im, r in zip(images, records):
        text = choice_prompt(r["question"], [str(c) for c in r.get("choices") or []])
        if getattr(proc, "chat_template", None):
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            text = proc.apply_chat_template(turn, add_generation_prompt=True)
        inp = proc(images=im, text=text, return_tensors="pt").to(backend.device)
        out = backend.model.generate(**inp, max_new_tokens=backend.max_length)
        ids = inp["input_ids"][0]
        if out.shape[1] >= len(ids) and bool((out[0, :len(ids)] == ids).all()):
            out = out[:, len(ids):]  # decoder-only language models return the prompt too
        answers.append(proc.batch_decode(out, skip_special_tokens=True)[0])
    return answers


# model_type -> (transformers model class name, answer function); other image-text-to-text models: _prompted
HF_VQA_MODELS: dict[str, tuple[str, Callable]] = {
    "vilt": ("ViltForQuestionAnswering", _vilt),
    "blip": ("BlipForQuestionAnswering", _blip),
    "git": ("GitForCausalLM", _git),
    "blip-2": ("Blip2ForConditionalGeneration", _prompted),
    "instructblip": ("InstructBlipForConditionalGeneration", _prompted),
}


def _image_text_to_text_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


class TransformersVQA(VQABackend):
    """Any transformers VQA model or VLM (table above), from a local folder or a hub id (a hub id needs
    the model in the local cache when offline). `processor`: a separate processor folder or id (default:
    the model's). `batch_size`: questions per call for ViLT/BLIP (default 1, as the official loop).
    `max_length`: generate's max_length (official 50); `max_new_tokens` replaces it when given. Answers are
    free-form; TIFA maps them to choices."""

    name, free_form = "transformers", True

    def __init__(self, model: str | Path | None = None, processor: str | Path | None = None, device: str = "cpu",
                 batch_size: int = 1, max_length: int = 50, max_new_tokens: int | None = None):
        if not model:
            raise EvalError("the transformers backend needs --model: a VQA model folder or hub id "
                            f"({', '.join(sorted(HF_VQA_MODELS))} or a chat VLM, e.g. dandelin/vilt-b32-finetuned-vqa)")
        _need("transformers", "the transformers VQA backend")
        import transformers
        from transformers import AutoConfig, AutoProcessor

        model = str(model)
        try:
            kind = AutoConfig.from_pretrained(model).model_type
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot load VQA model {model!r}: {str(e).splitlines()[0]} (offline, a hub id must "
                            "already be in the local cache; or pass a folder)") from None
        if kind in HF_VQA_MODELS:
            cls_name, self._answer = HF_VQA_MODELS[kind]
        elif kind in _image_text_to_text_types():
            cls_name, self._answer = "AutoModelForImageTextToText", _prompted
        else:
            raise EvalError(f"VQA model {model!r} is a {kind!r} model; the transformers backend supports blip, git, "
                            "vilt (TIFA's own), blip-2, instructblip and image-text-to-text models (llava, paligemma, ...)")
        try:
            with quiet_transformers():
                self.processor = AutoProcessor.from_pretrained(str(processor or model))
                self.model = getattr(transformers, cls_name).from_pretrained(model).eval().to(device)
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot load VQA model {model!r} ({kind}): {str(e).splitlines()[0]}") from None
        if batch_size < 1:
            raise EvalError(f"--batch-size {batch_size}: give 1 or more")
        self.kind, self.model_name, self.device = kind, model, device
        self.batch_size = batch_size
        self.max_length = max_new_tokens if max_new_tokens is not None else max_length
        self.max_new_tokens = max_new_tokens

    def length(self) -> dict:
        """generate's length argument: max_new_tokens when given, else the official max_length."""
        return {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens is not None else \
            {"max_length": self.max_length}

    def answer(self, images: Sequence, records: Sequence[dict]) -> list[str]:
        import torch

        out: list[str] = []
        with torch.no_grad():
            for s in range(0, len(records), self.batch_size):
                ims = [im.convert("RGB") for im in images[s: s + self.batch_size]]
                out += list(self._answer(self, ims, list(records[s: s + self.batch_size])))
        return out
