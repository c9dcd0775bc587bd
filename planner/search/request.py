"""What a user asks of `pilot recommend`, as the library takes it: `RecommendRequest` (the
search) and `VerifyRequest` (launching and measuring its plan). Each checks its fields on
construction and raises a `FieldError` naming the field; the CLI names the flag behind it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine import safetensors_files
from engine.model_config import CheckpointError, ModelConfig
from planner.costmodel.fit import CostModel
from planner.costmodel.fit_data import measured_acceptance
from planner.measure import host_speed
from planner.measure.profiler import VIA
from planner.measure.quality import stored_quality
from planner.search.candidate import QualityLimit, RecommendError, Requirement
from planner.search.search import Search
from planner.spec import hardware as hw
from planner.spec.search_space import SearchSpace
from planner.spec.slo import parse_slos
from planner.spec.workload import Workload
from planner.store.database import Store

HOST_SPEEDS = ("typical", "now")
GPU_BACKENDS = ("vllm", "sglang")


@dataclass(frozen=True)
class RecommendRequest:
    """The deployment asked for: a model, SLOs, one load (a rate or a concurrency) and the
    workload's lengths, and where and how far to search."""

    model: Path
    slo: str
    rate: float | None = None
    concurrency: int | None = None
    workload: Path | None = None  # a workload file or data set name; else isl/osl/num_requests
    isl: str = "32:256"
    osl: str = "16:128"
    num_requests: int = 300
    hardware: tuple[str, ...] = ()  # spec names; empty: the hardware the cost model measured
    max_devices: int = 8
    space: str | None = None  # a search-space file or built-in name
    trials: int = 100
    objective: str = "cost"
    confidence: float = 0.8
    draft: Path | None = None
    seed: int = 0
    host_speed: str = "typical"  # predict the host at a typical moment, or as a probe finds it now
    backend: str = "vllm"  # the engine a GPU plan is served by (its kernels price it)
    backend_version: str | None = None  # whose kernel measurements; None: the newest there are
    max_quality_loss: float | None = None  # perplexity increase a quantization may cost (0.02 = 2%)

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise RecommendError("give exactly one of rate or concurrency", field="rate")
        if self.num_requests < 1:
            raise RecommendError(f"must be >= 1, got {self.num_requests}", field="num_requests")
        if self.max_quality_loss is not None and not 0 <= self.max_quality_loss < 10:
            raise RecommendError(f"must be a share >= 0 (0.02 or 2%), got {self.max_quality_loss}",
                                 field="max_quality_loss")
        if self.trials < 1:
            raise RecommendError(f"must be >= 1, got {self.trials}", field="trials")
        if self.backend not in GPU_BACKENDS:
            raise RecommendError(f"must be one of {', '.join(GPU_BACKENDS)}, got {self.backend!r}",
                                 field="backend")
        if self.host_speed not in HOST_SPEEDS:
            raise RecommendError(f"must be typical or now, got {self.host_speed!r}", field="host_speed")
        for field, path in (("model", self.model), ("draft", self.draft)):
            if path is None:
                continue
            if not Path(path).is_dir():
                raise RecommendError(f"model directory not found: {path}", field=field)
            # A plan reads config.json alone (no weights, no tokenizer): check it before the
            # search, so the error names the flag as well as the file and its field.
            try:
                ModelConfig.from_dir(path)
            except CheckpointError as err:
                raise RecommendError(str(err), field=field) from None

    def check_launchable(self) -> None:
        """For --verify, which runs the plan on the engine: the model (and draft) must be an
        architecture the engine builds, with its weights here; config.json alone only plans."""
        for field, path in (("model", self.model), ("draft", self.draft)):
            if path is None:
                continue
            try:
                ModelConfig.for_engine(path)
                safetensors_files(Path(path))
            except CheckpointError as err:
                raise RecommendError(f"{err} (verifying launches it on the engine; a plan "
                                     "alone needs only config.json)", field=field) from None

    def requirement(self) -> Requirement:
        kind, value = ("rate", self.rate) if self.rate is not None else ("concurrency", self.concurrency)
        return Requirement(parse_slos(self.slo), kind, float(value), self.objective, self.confidence)

    def load(self) -> Workload:
        if self.workload is not None:
            return Workload.from_name_or_file(self.workload, self.model, self.num_requests)
        return Workload.from_flags(self.isl, self.osl, concurrency=1, num_requests=self.num_requests)

    def search(self, store: Store, cost_model: CostModel) -> Search:
        """The search this request describes, over `cost_model`; a draft's acceptance rate is
        read from the runs in `store`."""
        draft = str(self.draft) if self.draft else None
        return Search(
            cost_model, str(self.model), self.load(), self.requirement(),
            hardware=list(self.hardware) or None,
            space=SearchSpace.from_file(self.space) if self.space else None,
            max_devices=self.max_devices, draft_dir=draft,
            acceptance_rate=measured_acceptance(store, str(self.model), draft) if draft else None,
            seed=self.seed,
            host_slowdowns=host_slowdowns_now(cost_model) if self.host_speed == "now" else None,
            backend=self.backend, backend_version=self.backend_version,
            quality=self.quality_limit(store))

    def quality_limit(self, store: Store) -> QualityLimit | None:
        """The quality bound, judged by the measured costs of the schemes the engine runs (a
        GGUF format's row informs, but is not a configuration)."""
        if self.max_quality_loss is None:
            return None
        return QualityLimit(self.max_quality_loss, [q for q in stored_quality(store, str(self.model)) if q.in_engine])


@dataclass(frozen=True)
class VerifyRequest:
    """How to check a plan: measure it `via` `pilot serve` (as its clients will) or the engine
    in process, `repeats` times; on a miss try up to `fallbacks` next candidates; once one holds, up to `explore`
    cheaper ones."""

    via: str = "http"
    repeats: int = 3
    fallbacks: int = 2
    explore: int = 0

    def __post_init__(self) -> None:
        if self.via not in VIA:
            raise RecommendError(f"must be one of {', '.join(VIA)}, got {self.via!r}", field="via")
        for field, least in (("repeats", 1), ("fallbacks", 0), ("explore", 0)):
            value = getattr(self, field)
            if not (isinstance(value, int) and value >= least):
                raise RecommendError(f"must be >= {least}, got {value}", field=field)


def host_slowdowns_now(cost_model: CostModel) -> dict[str, float]:
    """This machine's speed now against its typical moment in the cost model's runs, keyed by
    its spec name; empty when the cost model has no probe readings of this machine."""
    spec = hw.detect().name
    if not cost_model.reads_host(spec):
        return {}
    return {spec: cost_model.host_slowdown(spec, host_speed.probe(host_speed.PLANNING_SECONDS))}
