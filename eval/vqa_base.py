"""The interface of TIFA's VQA backends (`vqa.py` registers them by name)."""
from __future__ import annotations

from typing import Sequence


class VQABackend:
    """The interface: `answer(images, records) -> [str]`; `unanswerable(record) -> reason or None`."""

    name: str = "?"
    free_form: bool = True  # answers need mapping to a choice
    needs_images: bool = True  # False: answers were computed elsewhere (`AnswersVQA`)

    def unanswerable(self, record: dict) -> str | None:
        return None

    def answer(self, images: Sequence, records: Sequence[dict]) -> list[str]:
        raise NotImplementedError
