"""The one exception every adapter refusal raises (loading, validating, applying)."""
from __future__ import annotations


class AdapterError(ValueError):
    """An adapter cannot be saved, loaded or applied; the message names the file and the fix."""
