"""`pilot profile --until "median_ape<=8%,p90_ape<=20%"`: profile until the cross-validated
error reaches every target (or the budget ends)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from planner.profiling.estimate import Accuracy
from planner.spec.errors import FieldError

TARGETS = ("median_ape", "p90_ape")
_TERM = re.compile(r"^\s*(\w+)\s*<=\s*([0-9]*\.?[0-9]+)\s*(%?)\s*$")


class UntilError(FieldError):
    def __init__(self, message: str) -> None:
        super().__init__(message, field="until")


@dataclass(frozen=True)
class StopRule:
    targets: dict[str, float]  # name in TARGETS -> the most error allowed, as a fraction

    def met(self, estimate: Accuracy) -> bool:
        return all(getattr(estimate, name) <= limit for name, limit in self.targets.items())

    def __str__(self) -> str:
        return ",".join(f"{name}<={limit:.4g}" if limit >= 10 else f"{name}<={100 * limit:.4g}%"
                        for name, limit in self.targets.items())


def parse_until(text: str) -> StopRule:
    """`median_ape<=8%` or `median_ape<=8%,p90_ape<=20%` (a bare number is a fraction: 0.08)."""
    if not text or not text.strip():
        raise UntilError("empty: write e.g. median_ape<=8%,p90_ape<=20%")
    targets: dict[str, float] = {}
    for term in text.split(","):
        match = _TERM.match(term)
        if match is None:
            raise UntilError(f"{term.strip()!r} is not NAME<=VALUE (e.g. median_ape<=8%)")
        name, number, percent = match.groups()
        if name not in TARGETS:
            raise UntilError(f"{name!r} is not one of {', '.join(TARGETS)}")
        limit = float(number) / (100 if percent else 1)
        if not limit > 0:
            raise UntilError(f"{name}: the target must be above 0, got {term.strip()!r}")
        if name in targets:
            raise UntilError(f"{name} is given twice")
        targets[name] = limit
    return StopRule(targets)
