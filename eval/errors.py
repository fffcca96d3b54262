"""The evaluation package's one error class: bad input the user can fix (printed as one line, exit 2)."""
from __future__ import annotations


class EvalError(ValueError):
    """Bad evaluation input (question file, image folder, backend, weights); the message names what is
    missing and the fix. Raised after any partial results have been written."""
