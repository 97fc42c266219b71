"""The one error type for bad input, so every layer (CLI, gRPC) can report field and reason."""

from __future__ import annotations

from collections.abc import Sequence


class InvalidInput(ValueError):
    """Bad user input: names the offending field and says why.

    The CLI prints it without a traceback; the gRPC server maps it to INVALID_ARGUMENT with a
    ``BadRequest.FieldViolation`` (and close matches, when ``suggestions`` is set).
    """

    def __init__(self, field: str, reason: str, suggestions: Sequence[str] = ()) -> None:
        self.field = field
        self.reason = reason
        self.suggestions = list(suggestions)
        message = f"{field}: {reason}"
        if self.suggestions:
            message += f" (did you mean: {', '.join(self.suggestions)}?)"
        super().__init__(message)
