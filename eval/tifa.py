"""TIFA scoring (Hu et al. 2023): per-question correctness -> mean per caption -> mean over captions.

Records follow the TIFA v1.0 question file (`id`, `caption`, `question`, `choices`, `answer`,
`element_type`, `element`); a question scores 1 when the (mapped) answer equals `answer`.
"""
from __future__ import annotations

from collections import defaultdict

TIFA_KEYS = ("caption", "question", "choices", "answer", "element_type")


def caption_key(rec: dict) -> str:
    """TIFA groups questions by caption id (`caption_id`, or the official `id` prefix), else by caption text."""
    return str(rec.get("caption_id") or rec.get("coco_val_id") or rec["caption"])


def score(records: list[dict], answers: list[str]) -> dict:
    """TIFA score and accuracy per element type, from records and the VQA's answers (same order)."""
    if len(records) != len(answers):
        raise ValueError(f"{len(records)} questions but {len(answers)} answers")
    per_caption: dict[str, list[float]] = defaultdict(list)
    per_type: dict[str, list[float]] = defaultdict(list)
    for rec, ans in zip(records, answers):
        ok = float(str(ans).strip().lower() == str(rec["answer"]).strip().lower())
        per_caption[caption_key(rec)].append(ok)
        per_type[rec["element_type"]].append(ok)
    cap_means = [sum(v) / len(v) for v in per_caption.values()]
    return {
        "score": sum(cap_means) / len(cap_means) if cap_means else float("nan"),
        "by_type": {k: sum(v) / len(v) for k, v in sorted(per_type.items())},
        "n_captions": len(cap_means),
        "n_questions": len(records),
    }
