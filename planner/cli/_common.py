"""What every command shares: the console, failing with a message, the one duration grammar,
the `--db` option, and naming the flag behind a library error's field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer
from rich.console import Console

from planner.spec.errors import FieldError

if TYPE_CHECKING:
    from planner.store.database import Store

console = Console(stderr=True)

Db = Annotated[Optional[str], typer.Option("--db", help="SQLAlchemy URL; default sqlite:///pilot.db")]


def fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def flag_for(field: str) -> str:
    """The flag that sets library field `field`: every command names its flags `--field-name`."""
    return "--" + field.replace("_", "-")


def fail_error(err: Exception) -> NoReturn:
    """Exit 2 with `err`'s message; a `FieldError` is named by the flag that set its field."""
    if isinstance(err, FieldError) and err.field:
        fail(f"{flag_for(err.field)}: {err.message}")
    fail(str(err))


def open_store(db: str | None) -> Store:
    """The store at `--db`, or exit 2 naming the flag and the URL."""
    from planner.store.database import Store

    try:
        return Store(db)
    except ValueError as err:
        fail_error(err)


# A number with a unit, or several from hours down ("1h30m"); a bare number is seconds.
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, None: 1.0}
_ORDER = ("h", "m", "s", "ms")


def parse_duration(text: str, field: str = "budget", allow_zero: bool = False) -> float:
    """Seconds in "500ms", "90", "90s", "10m", "1.5h" or "1h30m"; a FieldError naming `field`."""
    source, position, total, last = text.strip(), 0, 0.0, -1
    example = "e.g. 500ms, 90s, 10m, 1h30m"
    while position < len(source):
        match = _PART.match(source, position)
        rank = _ORDER.index(match.group(2) or "s") if match else -1
        if match is None or rank <= last or (match.group(2) is None and match.end() < len(source)):
            raise FieldError(f"cannot read {text!r} as a duration ({example})", field)
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position, last = match.end(), rank
    if not source:
        raise FieldError(f"cannot read {text!r} as a duration ({example})", field)
    if total < 0 or (total == 0 and not allow_zero):
        raise FieldError(f"must be positive, got {text!r}", field)
    return total


def parse_share(text: str, field: str) -> float:
    """A share as "2%" or "0.02"; a FieldError naming `field` otherwise."""
    source = text.strip()
    try:
        value = float(source[:-1]) / 100 if source.endswith("%") else float(source)
    except ValueError:
        raise FieldError(f"cannot read {text!r} as a share (e.g. 2% or 0.02)", field) from None
    if not value >= 0:
        raise FieldError(f"must be >= 0, got {text!r}", field)
    return value


def resolve_model_option(value: Path | str | None) -> Path | None:
    """`--model`: a model directory, a .gguf file (imported once), a name from `pilot models
    list` or ORG/NAME on the Hugging Face hub (pulled once into the model cache)."""
    if value is None:
        return None
    from engine.hub import resolve_model
    from engine.model_config import CheckpointError

    try:
        return resolve_model(value, say=lambda message: console.print(message))
    except CheckpointError as err:
        fail(f"--model: {str(err).removeprefix('model: ')}")
