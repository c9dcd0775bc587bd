"""The error every layer of the planner raises for input it cannot use: it names the field and
the value, so the CLI can name the flag that set it and a library caller the argument."""

from __future__ import annotations


class FieldError(ValueError):
    """`message` about the input `field` (None: the input as a whole)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.message, self.field = message, field
