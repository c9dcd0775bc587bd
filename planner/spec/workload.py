"""A serving workload: request lengths and arrival times, shared by the profiler, the simulator
and the load generator so that all three see the same traffic for the same seed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from planner.spec.dataset import DatasetSource, dataset_requests
from planner.spec.files import read_mapping

# `--workload NAME`: real traffic, and which turns of each conversation it sends.
DATASETS: dict[str, Literal["first", "all"]] = {"sharegpt": "first", "sharegpt-multi-turn": "all"}


class WorkloadError(ValueError):
    """A workload description (file, trace line or flag) that cannot be used."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    _text: ClassVar[str]  # describe()'s template, so each kind says it in one line

    def describe(self) -> str:
        return self._text.format(s=self)


# ---- length distributions: every sampled length is an int >= 1 (a request has a token) ----

class _Length(_Spec):
    def describe(self) -> str:
        return self._text.format(s=self, mean=self.mean())  # type: ignore[attr-defined]


class FixedLength(_Length):
    kind: Literal["fixed"] = "fixed"
    value: PositiveInt
    _text = "fixed {s.value}"

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)

    def mean(self) -> float:
        return float(self.value)


class UniformLength(_Length):
    kind: Literal["uniform"] = "uniform"
    low: PositiveInt
    high: PositiveInt  # inclusive, as a user writing "128:1024" expects
    _text = "uniform {s.low}..{s.high} (mean {mean:g})"

    @model_validator(mode="after")
    def _ordered(self) -> UniformLength:
        if self.high < self.low:
            raise ValueError(f"high={self.high} is below low={self.low}")
        return self

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)

    def mean(self) -> float:
        return (self.low + self.high) / 2


class NormalLength(_Length):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    kind: Literal["normal"] = "normal"
    mean_: float = Field(alias="mean", allow_inf_nan=False)  # `mean` is the method all kinds have
    std: float = Field(ge=0, allow_inf_nan=False)
    min: PositiveInt = 1
    max: PositiveInt | None = None
    _text = "normal {s.mean_:g}±{s.std:g} (mean {mean:.1f})"

    @model_serializer(mode="wrap")
    def _dump_as_mean(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Stored and fingerprinted as written, "mean", whether or not the caller asks by_alias.
        return {("mean" if key == "mean_" else key): value for key, value in handler(self).items()}

    @model_validator(mode="after")
    def _ordered(self) -> NormalLength:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max={self.max} is below min={self.min}")
        return self

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.clip(np.rint(rng.normal(self.mean_, self.std, size=n)), self.min, self.max).astype(np.int64)

    def mean(self) -> float:
        """The mean of what `sample` returns, not the nominal one: clipping at `min` moves it
        (short prompts with a wide std), and callers size batches by it."""
        mu, sd, lo = self.mean_, self.std, self.min
        hi: float = self.max if self.max is not None else math.inf
        if sd == 0:
            return float(min(max(round(mu), lo), hi))
        # E[Y] = lo + sum over k in lo+1..hi of P(Y >= k), with P(Y >= k) = P(X >= k - 0.5).
        # Past 9 std those terms are 1 (below the bell) or 0 (above it) to double precision.
        start, stop = max(lo + 1, math.floor(mu - 9 * sd)), min(hi, math.ceil(mu + 9 * sd))
        ones = max(0, min(start - 1, hi) - lo)
        tail = sum(0.5 * math.erfc((k - 0.5 - mu) / (sd * math.sqrt(2))) for k in range(start, int(stop) + 1))
        return float(lo + ones + tail)


class EmpiricalLength(_Length):
    kind: Literal["empirical"] = "empirical"
    values: list[PositiveInt] = Field(min_length=1)
    _text = "empirical over {n} values (mean {mean:.1f})"

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(np.asarray(self.values, dtype=np.int64), size=n, replace=True)

    def mean(self) -> float:
        return float(np.mean(self.values))

    def describe(self) -> str:
        return self._text.format(n=len(self.values), mean=self.mean())


LengthDistribution = Annotated[
    Union[FixedLength, UniformLength, NormalLength, EmpiricalLength], Field(discriminator="kind")
]


# ---- arrival processes: offsets in seconds from the start of the run ----

class PoissonArrival(_Spec):
    kind: Literal["poisson"] = "poisson"
    rate: PositiveFloat  # requests per second
    _text = "poisson {s.rate} req/s"

    def arrival_times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.cumsum(rng.exponential(1.0 / self.rate, size=n))


class ConstantArrival(_Spec):
    kind: Literal["constant"] = "constant"
    rate: PositiveFloat
    _text = "constant {s.rate} req/s"

    def arrival_times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.arange(n, dtype=np.float64) / self.rate


class ClosedLoopArrival(_Spec):
    """No schedule: the client sends a new request whenever one of `concurrency` finishes."""

    kind: Literal["closed_loop"] = "closed_loop"
    concurrency: PositiveInt
    _text = "closed loop, {s.concurrency} in flight"

    def arrival_times(self, n: int, rng: np.random.Generator) -> None:
        return None


class TraceArrival(_Spec):
    """Recorded arrivals, replayed; sorted and shifted so the first is at 0."""

    kind: Literal["trace"] = "trace"
    offsets: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(min_length=1)
    _text = "trace of {n} arrivals over {span:.1f} s"

    @field_validator("offsets")
    @classmethod
    def _normalise(cls, offsets: list[float]) -> list[float]:
        ordered = sorted(offsets)
        return [t - ordered[0] for t in ordered]

    def arrival_times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        base = np.asarray(self.offsets, dtype=np.float64)
        # A repeat starts one mean gap after the trace's end, not at it: starting at the span
        # itself would put two requests at the same instant at every seam.
        period = base[-1] + (base[-1] / (len(base) - 1) if len(base) > 1 else 0.0)
        return np.concatenate([base + i * period for i in range(max(1, -(-n // len(base))))])[:n]

    def describe(self) -> str:
        return self._text.format(n=len(self.offsets), span=self.offsets[-1])


ArrivalProcess = Annotated[
    Union[PoissonArrival, ConstantArrival, ClosedLoopArrival, TraceArrival], Field(discriminator="kind")
]


class _TraceLine(BaseModel):
    model_config = ConfigDict(strict=True)  # 3.5 tokens, or "3", means the trace is broken
    input_tokens: PositiveInt
    output_tokens: PositiveInt
    arrival: float = Field(allow_inf_nan=False)


@dataclass(frozen=True)
class RequestSpec:
    index: int
    input_tokens: int
    output_tokens: int
    arrival_time: float | None  # None under a closed loop: the client decides when to send


def _problems(err: ValidationError) -> str:
    """pydantic's errors on one line, each led by the field it is about."""
    parts = []
    for e in err.errors():
        field, got = ".".join(map(str, e["loc"])), "" if e["type"] == "missing" else f", got {e['input']!r}"
        parts.append(f"{field}: {e['msg']}{got}" if field else e["msg"])
    return "; ".join(parts)


def parse_length(text: str, field: str) -> LengthDistribution:
    """Read a length flag: "512" (fixed), "128:1024" (uniform, inclusive), "normal:512,128"."""
    spec = text.strip()
    try:
        if spec.startswith("normal:"):
            mean, std = spec[len("normal:"):].split(",")
            return NormalLength(mean=float(mean), std=float(std))
        if ":" in spec:
            low, high = spec.split(":")
            return UniformLength(low=int(low), high=int(high))
        return FixedLength(value=int(spec))
    except ValidationError as err:
        raise WorkloadError(f"{field} {text!r}: {_problems(err)}") from None
    except ValueError:
        raise WorkloadError(
            f"{field} {text!r}: expected N (fixed), LOW:HIGH (uniform) or normal:MEAN,STD") from None


class Workload(BaseModel):
    """What a deployment is asked to serve; `seed` makes every sample of it reproducible."""

    model_config = ConfigDict(extra="forbid")
    name: str = "custom"
    input_tokens: LengthDistribution
    output_tokens: LengthDistribution
    arrival: ArrivalProcess
    num_requests: PositiveInt = 100
    # Share of each prompt that is one prefix common to all requests (a system prompt,
    # few-shot examples): what prefix caching can save.
    shared_prefix_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int = 0
    # Real requests (prompts and reply lengths) in place of random ids of the lengths above,
    # which then only summarise them.
    dataset: DatasetSource | None = None

    @model_validator(mode="after")
    def _prompts_from_one_place(self) -> Workload:
        if self.dataset is not None and self.shared_prefix_fraction:
            raise ValueError("shared_prefix_fraction applies to random prompts; a dataset's prompts share "
                             "what they share (dataset.turns: all)")
        return self

    @classmethod
    def from_dataset(cls, source: DatasetSource, arrival: ArrivalProcess, num_requests: int = 100,
                     seed: int = 0) -> Workload:
        """`num_requests` requests of `source` (e.g. ShareGPT, counted by a model's tokenizer)."""
        pool = dataset_requests(source, seed)
        picked = [pool[i % len(pool)] for i in range(num_requests)]
        return cls(name=source.name if source.turns == "first" else f"{source.name}-multi-turn",
                   input_tokens=EmpiricalLength(values=[len(r.prompt_token_ids) for r in picked]),
                   output_tokens=EmpiricalLength(values=[r.output_tokens for r in picked]),
                   arrival=arrival, num_requests=num_requests, seed=seed, dataset=source)

    @classmethod
    def from_trace(cls, path: str | Path) -> Workload:
        """A JSONL trace: one {"input_tokens", "output_tokens", "arrival"} object per line."""
        path, records = Path(path), []
        if not path.is_file():
            raise FileNotFoundError(f"trace file not found: {path}")
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(_TraceLine.model_validate_json(line))
            except ValidationError as err:
                raise WorkloadError(f"{path}, line {number}: {_problems(err)}") from None
        if not records:
            raise WorkloadError(f"{path}: the trace has no requests")
        return cls(name=path.stem, input_tokens=EmpiricalLength(values=[r.input_tokens for r in records]),
                   output_tokens=EmpiricalLength(values=[r.output_tokens for r in records]),
                   arrival=TraceArrival(offsets=[r.arrival for r in records]), num_requests=len(records))

    @classmethod
    def from_file(cls, path: str | Path) -> Workload:
        """A YAML (or .json) mapping of the fields, or a .jsonl trace."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"workload file not found: {path}")
        if path.suffix == ".jsonl":
            return cls.from_trace(path)
        data = read_mapping(path, WorkloadError, "workload fields")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise WorkloadError(f"{path}: {_problems(err)}") from None

    @classmethod
    def from_name_or_file(cls, value: str | Path, model: str | Path | None, num_requests: int = 100,
                          seed: int = 0) -> Workload:
        """`--workload`: a data set's name (its prompts counted by `model`'s tokenizer, one client
        at a time until a load is given) or a workload file."""
        if str(value) in DATASETS:
            if model is None:
                raise WorkloadError(f"workload {value}: needs a model, whose tokenizer counts the tokens")
            # vLLM's benchmark keeps prompts to 1024 tokens; both halves also fit the model's context.
            from engine.model_config import ModelConfig

            context = ModelConfig.from_dir(model).max_position_embeddings
            source = DatasetSource(tokenizer=str(model), turns=DATASETS[str(value)],
                                   max_input_tokens=min(1024, context // 2),
                                   max_output_tokens=min(1024, context - min(1024, context // 2)))
            return cls.from_dataset(source, ClosedLoopArrival(concurrency=1), num_requests, seed)
        path = Path(value)
        if not path.exists() and path.suffix not in (".yaml", ".yml", ".json", ".jsonl"):
            raise WorkloadError(f"workload {value!r}: no such file, nor a data set ({', '.join(DATASETS)})")
        return cls.from_file(path)

    @classmethod
    def from_flags(cls, isl: str, osl: str, rate: float | None = None, concurrency: int | None = None,
                   num_requests: int = 100, shared_prefix_fraction: float = 0.0) -> Workload:
        """The CLI's `--isl/--osl` with one of `--rate` (Poisson) or `--concurrency`."""
        if (rate is None) == (concurrency is None):
            raise WorkloadError(f"give exactly one of rate or concurrency, got rate={rate!r}, "
                                f"concurrency={concurrency!r}")
        try:
            arrival = (PoissonArrival(rate=rate) if rate is not None
                       else ClosedLoopArrival(concurrency=concurrency))
            return cls(input_tokens=parse_length(isl, "isl"), output_tokens=parse_length(osl, "osl"),
                       arrival=arrival, num_requests=num_requests,
                       shared_prefix_fraction=shared_prefix_fraction)
        except ValidationError as err:
            raise WorkloadError(_problems(err)) from None

    def sample(self, n: int | None = None) -> list[RequestSpec]:
        """The same n requests for the same seed, whoever asks (profiler, simulator, client)."""
        n = self.num_requests if n is None else n
        if n < 0:
            raise WorkloadError(f"n must be >= 0, got {n}")
        # One stream per quantity: sample(5) is then the first 5 of sample(100), and changing
        # the output lengths leaves the arrivals as they were.
        streams = [np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(3)]
        if self.dataset is not None:  # request i is the dataset's i-th, lengths paired as recorded
            pool = dataset_requests(self.dataset, self.seed)
            inputs = [len(pool[i % len(pool)].prompt_token_ids) for i in range(n)]
            outputs = [pool[i % len(pool)].output_tokens for i in range(n)]
        else:
            inputs, outputs = self.input_tokens.sample(n, streams[0]), self.output_tokens.sample(n, streams[1])
        times = self.arrival.arrival_times(n, streams[2])
        return [RequestSpec(i, int(inputs[i]), int(outputs[i]), None if times is None else float(times[i]))
                for i in range(n)]

    def shared_prefix_length(self, input_tokens: int) -> int:
        return round(self.shared_prefix_fraction * input_tokens)

    def prompt_token_ids(self, spec: RequestSpec, vocab_size: int, rng: np.random.Generator) -> list[int]:
        """The dataset's prompt for request `spec.index`; without a dataset, random ids for a
        prompt of `spec.input_tokens`, starting with the workload's shared prefix. Ids stay
        below 256: on the byte tokenizer 256 and 257 are BOS and EOS, and an EOS inside a
        prompt would change what is measured."""
        if self.dataset is not None:
            pool = dataset_requests(self.dataset, self.seed)
            return list(pool[spec.index % len(pool)].prompt_token_ids)
        if vocab_size < 1:
            raise WorkloadError(f"vocab_size must be >= 1, got {vocab_size}")
        high, k = min(vocab_size, 256), self.shared_prefix_length(spec.input_tokens)
        # Seeded apart from `rng` so every request draws the same prefix; numpy fills an array
        # in order, so a shorter request's prefix is the start of a longer one's.
        prefix = np.random.default_rng([self.seed, 0x5052]).integers(0, high, size=k)
        rest = rng.integers(0, high, size=spec.input_tokens - k)
        return [int(t) for t in np.concatenate([prefix, rest])]

    def describe(self) -> str:
        shared = f", {self.shared_prefix_fraction:.0%} shared prefix" if self.shared_prefix_fraction else ""
        if self.dataset is not None:  # the lengths the requests have, whatever the file summarised
            specs = self.sample()
            return (f"{self.arrival.describe()}, {self.dataset.describe()}: input mean "
                    f"{np.mean([s.input_tokens for s in specs]):.1f}, output mean "
                    f"{np.mean([s.output_tokens for s in specs]):.1f}, {self.num_requests} requests")
        return (f"{self.arrival.describe()}, input {self.input_tokens.describe()}, "
                f"output {self.output_tokens.describe()}, {self.num_requests} requests{shared}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
