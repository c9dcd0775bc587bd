"""Search spaces: the engine knobs a campaign explores and the load levels it measures them at.

A space is a YAML file in `search_spaces/`: each knob is an `EngineConfig` field with a list of
values or an integer range; `load` names the load levels every configuration is measured at.
The profiler orders candidate configurations so that every prefix of the order covers the space
evenly (farthest-point order over normalised knob values, starting from the engine's defaults):
a campaign cut short by its time budget has still seen the whole space, coarsely, rather than
one corner of a grid in full.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.config import EngineConfig
from engine.model_config import ModelConfig
from engine.rules import check_scheme, check_shardable
from planner.spec.files import builtin_data, read_mapping

SPACES_DIR = builtin_data("search_spaces")
# Knobs a space may vary (EngineConfig fields); anything else is a fixed setting of the space.
KNOBS = ("dtype", "quantization", "kv_cache_dtype", "tensor_parallel_size", "data_parallel_size",
         "max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill", "enable_prefix_caching",
         "num_speculative_tokens")
MAX_CANDIDATES = 4096


class SearchSpaceError(ValueError):
    """A space file that cannot be used; the message names the file and the field."""


class IntRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    low: int = Field(ge=1)
    high: int = Field(ge=1)
    log: bool = True  # batch caps matter by ratio: 1, 2, 4 ... rather than 1, 9, 17 ...

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if self.high < self.low:
            raise ValueError(f"high={self.high} is below low={self.low}")
        return self

    def values(self) -> list[int]:
        """Powers of two between the bounds (log) or up to 8 evenly spaced integers."""
        if self.log:
            points = {self.low, self.high} | {2 ** e for e in range(0, 31)
                                              if self.low <= 2 ** e <= self.high}
            return sorted(points)
        return sorted({int(round(v)) for v in np.linspace(self.low, self.high, num=8)})


class LoadLevels(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["concurrency", "rate"] = "concurrency"
    levels: list[float] = Field(min_length=1)

    @field_validator("levels")
    @classmethod
    def _positive(cls, levels: list[float]) -> list[float]:
        for i, level in enumerate(levels):
            if level <= 0:
                raise ValueError(f"levels[{i}]={level} must be > 0")
        return sorted(levels)


def bf16_is_slower(bf16_tflops: float | None, fp32_tflops: float | None) -> bool:
    """Whether measured (or spec) matmul rates say bf16 runs slower than fp32; False if unknown."""
    return bool(bf16_tflops and fp32_tflops and bf16_tflops < fp32_tflops)


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    knobs: dict[str, list[Any] | IntRange]
    fixed: dict[str, Any] = Field(default_factory=dict)  # other EngineConfig fields, as given
    load: LoadLevels = LoadLevels(levels=[1, 4, 16])

    @field_validator("knobs")
    @classmethod
    def _known_knobs(cls, knobs: dict[str, Any]) -> dict[str, Any]:
        for name, values in knobs.items():
            if name not in KNOBS:
                raise ValueError(f"knobs.{name}: not a knob; choose from {', '.join(KNOBS)}")
            if isinstance(values, list) and not values:
                raise ValueError(f"knobs.{name}: needs at least one value")
        return knobs

    @classmethod
    def from_file(cls, path: str | Path) -> "SearchSpace":
        path = Path(path)
        if not path.is_file() and not path.suffix and (SPACES_DIR / f"{path}.yaml").is_file():
            path = SPACES_DIR / f"{path}.yaml"  # a built-in space by name
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
            raise FileNotFoundError(f"search space not found: {path} (built-in: {known})")
        data = read_mapping(path, SearchSpaceError, "search-space fields")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            errors = err.errors()
            # A knob is a list or a range: when it is a bad range, the "not a list" error of
            # the other branch only hides the reason.
            specific = [e for e in errors if e["type"] != "list_type"] or errors
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'] if p not in ('list[any]', 'IntRange'))}: {e['msg']}"
                for e in specific[:3])
            raise SearchSpaceError(f"{path}: {problems}") from err

    def without_drafts(self) -> "SearchSpace":
        """This space with speculative decoding left out (no draft model to run)."""
        knobs = {**self.knobs}
        if "num_speculative_tokens" in knobs:
            knobs["num_speculative_tokens"] = [0]
        return self.model_copy(update={"knobs": knobs})

    def in_float32_where_bf16_is_slower(self, bf16_slower: bool) -> "SearchSpace":
        """The built-in CPU space (named "cpu", narrowed or not) in float32 if it fixes bfloat16
        on a host whose bf16 matmuls run slower than its fp32 ones (bf16 emulated, as on a CPU
        without AVX-512): it assumes a CPU with bf16 arithmetic. Any other space as it is."""
        if not bf16_slower or self.name != "cpu" or self.fixed.get("dtype") != "bfloat16":
            return self
        return self.model_copy(update={"fixed": {**self.fixed, "dtype": "float32"}})

    def values(self, knob: str) -> list[Any]:
        spec = self.knobs[knob]
        return spec.values() if isinstance(spec, IntRange) else list(spec)

    def configs(self, base: EngineConfig, speculative_model: str | None = None,
                max_parallel: int | None = None, model: ModelConfig | None = None) -> list[EngineConfig]:
        """Every valid configuration, in coverage order. `base` carries the model and the
        settings outside the space; `max_parallel` caps tensor x data parallel processes. Given
        the `model`'s config, sizes it cannot be split into and quantization groups its layers
        cannot hold are left out (`fits_model`): they would only fail at launch."""
        names = list(self.knobs)
        grid = list(itertools.product(*(self.values(n) for n in names)))
        rng = np.random.default_rng(0)
        if len(grid) > MAX_CANDIDATES:
            grid = [grid[i] for i in rng.choice(len(grid), MAX_CANDIDATES, replace=False)]
        valid: list[tuple[tuple[Any, ...], EngineConfig]] = []
        for point in grid:
            config = self._config(base, dict(zip(names, point)), speculative_model, max_parallel)
            if config is not None and (model is None or fits_model(model, config)):
                valid.append((point, config))
        if not valid:
            raise SearchSpaceError(f"search space {self.name!r}: no valid configuration for "
                                   f"{base.model}")
        order = _coverage_order([p for p, _ in valid], [self.values(n) for n in names],
                                _default_point(names, base, [self.values(n) for n in names]))
        return [valid[i][1] for i in order]

    def _config(self, base: EngineConfig, point: dict[str, Any], speculative_model: str | None,
                max_parallel: int | None) -> EngineConfig | None:
        update = {**self.fixed, **point}
        k = update.pop("num_speculative_tokens", None)
        if k:
            if speculative_model is None:
                raise SearchSpaceError(f"search space {self.name!r}: knobs.num_speculative_tokens "
                                       "includes drafts, but no draft model was given (--draft)")
            update.update(speculative_model=speculative_model, num_speculative_tokens=int(k))
        parallel = update.get("tensor_parallel_size", 1) * update.get("data_parallel_size", 1)
        if max_parallel is not None and parallel > max_parallel:
            return None
        if not update.get("enable_chunked_prefill", base.enable_chunked_prefill):
            # Without chunking a whole prompt must fit one step.
            longest = base.max_model_len or 0
            if update.get("max_num_batched_tokens", base.max_num_batched_tokens) < longest:
                return None
        try:  # validated: model_copy(update=...) would take any value
            return EngineConfig.model_validate({**base.model_dump(), **update})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise SearchSpaceError(f"search space {self.name!r}: {where}: {first['msg']} "
                                   f"(got {first.get('input')!r})") from err


def quantizable(model: ModelConfig, config: EngineConfig) -> bool:
    """Whether every linear layer's inputs (one rank's share) fit the quantization scheme."""
    if config.quantization in (None, "fp8"):  # fp8 scales per tensor: any shape holds
        return True
    tp = config.tensor_parallel_size
    inputs = {model.hidden_size, model.intermediate_size // tp, model.num_attention_heads * model.head_dim // tp}
    try:
        for features in inputs:
            check_scheme(config.quantization, config.quantization_group_size, features)
        return True
    except ValueError:
        return False


def shardable(model: ModelConfig, size: int) -> bool:
    """Whether the model splits into `size` tensor-parallel ranks."""
    try:
        check_shardable(model.num_attention_heads, model.num_key_value_heads, model.intermediate_size, size)
        return True
    except ValueError:
        return False


def fits_model(model: ModelConfig, config: EngineConfig) -> bool:
    """Whether the engine can load `model` as `config` asks: its parallel split and its
    quantization groups."""
    return shardable(model, config.tensor_parallel_size) and quantizable(model, config)


def _normalise(point: tuple[Any, ...], choices: list[list[Any]]) -> np.ndarray:
    out = []
    for value, values in zip(point, choices):
        if len(values) == 1:
            out.append(0.0)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            scale = math.log if min(values) > 0 else float  # ratios matter for caps and sizes
            lo, hi = scale(min(values)), scale(max(values))
            out.append((scale(value) - lo) / (hi - lo) if hi > lo else 0.0)
        else:
            out.append(values.index(value) / (len(values) - 1))
    return np.array(out)


def _default_point(names: list[str], base: EngineConfig, choices: list[list[Any]]) -> tuple[Any, ...]:
    point = []
    for name, values in zip(names, choices):
        value = (base.num_speculative_tokens or 0) if name == "num_speculative_tokens" else getattr(base, name)
        point.append(value if value in values else values[0])
    return tuple(point)


def _coverage_order(points: list[tuple[Any, ...]], choices: list[list[Any]],
                    start: tuple[Any, ...]) -> list[int]:
    """Farthest-point order: start nearest the defaults, then always the point farthest from
    every point already chosen."""
    coords = np.stack([_normalise(p, choices) for p in points])
    first = int(np.argmin(np.linalg.norm(coords - _normalise(start, choices), axis=1)))
    order, nearest = [first], np.linalg.norm(coords - coords[first], axis=1)
    while len(order) < len(points):
        nearest[order] = -1.0
        nxt = int(np.argmax(nearest))
        order.append(nxt)
        nearest = np.minimum(nearest, np.linalg.norm(coords - coords[nxt], axis=1))
    return order
