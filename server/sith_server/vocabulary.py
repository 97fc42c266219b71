"""The concept vocabulary, held by the server so unknown concepts fail before a job is queued.

Workers explain vectors over ``default_vocabulary()``; checking names here lets a typo come back
at once as INVALID_ARGUMENT with close matches instead of as a failed job minutes later.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Sequence

from sith.engine.errors import InvalidInput


class Vocabulary:
    """The default vocabulary (loaded lazily), or a custom word list that jobs then carry along."""

    def __init__(self, words: Sequence[str] | None = None) -> None:
        self.custom = list(words) if words is not None else None
        self._load: Callable[[], Sequence[str]] = (lambda: self.custom) if self.custom is not None else _default
        self._words: list[str] | None = None
        self._set: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        if self._words is None:
            with self._lock:
                if self._words is None:
                    words = list(self._load())
                    self._set = frozenset(words)
                    self._words = words

    def warm(self) -> None:
        """Load now (server start) so the first request does not pay for it."""
        self._ensure()

    def job_fields(self) -> dict:
        """What a job payload needs so workers explain over the same concepts the server checks."""
        return {"dictionary": self.custom} if self.custom is not None else {}

    def check(self, concepts: Sequence[str], field: str) -> list[str]:
        """Stripped concepts; InvalidInput naming ``field[i]`` with close matches for an unknown one."""
        self._ensure()
        out = []
        for i, concept in enumerate(concepts):
            name = concept.strip()
            if not name:
                raise InvalidInput(f"{field}[{i}]", "empty concept name")
            if name not in self._set:
                close = difflib.get_close_matches(name.lower(), self._words or [], n=5, cutoff=0.6)
                raise InvalidInput(f"{field}[{i}]", f"{name!r} is not in the concept dictionary", suggestions=close)
            out.append(name)
        return out


def from_setting(setting: str, model=None) -> Vocabulary:
    """``SITH_VOCABULARY``: the built-in English words, the testbed world's words, or a word-list file;
    "auto" (or empty) applies the one model-aware rule (``sith.testbed.vocabulary.vocabulary_for``)
    to ``model`` (a served model reference; None = the embedded testbed model).

    Anything but "default" is a custom list that jobs carry, so workers explain over exactly it.
    """
    from sith.testbed.vocabulary import vocabulary_for

    try:
        words = vocabulary_for(model, setting)  # a file follows the workers' dictionary rules (comments, duplicates)
    except InvalidInput as exc:
        raise InvalidInput("SITH_VOCABULARY", f"{setting}: {exc.reason}") from None
    return Vocabulary() if words is None else Vocabulary(words)


def _default() -> list[str]:
    from sith.engine.dictionary import default_vocabulary

    return default_vocabulary()
