"""The store's runs as the cost model sees them: each run's deployment and device, its steps
with their measured durations, the requests it served, and what was measured end to end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from engine import EngineConfig
from engine.scheduler import SchedulerConfig
from planner.costmodel.delivery import DeliveryModel
from planner.costmodel.features import COMPOSITION
from planner.costmodel.jitter import jitter_class
from planner.costmodel.roofline import Deployment, Device, ModelShape
from planner.costmodel.simulator import SimRequest, Simulator, StepTime, unique_prompts
from planner.measure import host_speed
from planner.spec import hardware as hw
from planner.spec.workload import Workload, WorkloadError
from planner.store.database import (
    EngineConfigRow,
    Experiment,
    Hardware,
    Model,
    RequestRow,
    Run,
    StepRow,
    Store,
    fingerprint,
)

# What the cost model predicts of a run, and is judged on.
METRICS = ("ttft_p50", "ttft_p95", "itl_p50", "itl_p95", "throughput_tok_s")


@dataclass
class RunData:
    run_id: int
    model_id: int
    model_name: str
    model_fingerprint: str
    hardware_id: int
    spec_name: str
    hardware_rates: dict[str, Any]  # `hardware_rates()`: what the roofline needs of the machine
    config: dict[str, Any]  # EngineConfig fields, model path included
    deployment: Deployment
    device: Device
    load_kind: str
    load_value: float
    requests: list[SimRequest]
    measured: dict[str, float]
    steps: dict[str, np.ndarray]  # COMPOSITION columns, "busy_peers" and "period_s"
    num_kv_blocks: int
    max_model_len: int
    acceptance_rate: float | None
    host_probe_s: float | None = None  # planner.host_speed reading around the run
    host_probe_parallel_s: float | None = None  # and its parallel_probe reading
    # Those readings against the host's typical ones (set by the fit that judges the run; 1.0
    # when unknown): step features, so a slow moment is not mistaken for a slow config.
    host_slowdown: float = 1.0
    host_parallel_slowdown: float = 1.0
    # The campaign that ran it: a sitting of repeats (None: measured outside a campaign).
    sitting: int | None = None
    path: str = "engine"  # "http": measured through `pilot serve`, as its clients see it
    delivery: dict[str, Any] | None = None  # served: planner.measure.delivery.summarize_delivery

    @property
    def served(self) -> bool:
        return self.path == "http"

    @property
    def mean_in_flight(self) -> float:
        """Requests the server held at once: a closed loop's clients, or an open loop's requests
        running or waiting (each replica's, weighted by the steps' time, times the replicas)."""
        if self.load_kind == "concurrency":
            return float(self.load_value)
        period, held = self.steps["period_s"], self.steps.get("in_flight", self.steps["num_seqs"])
        replicas = int(self.config.get("data_parallel_size") or 1)
        return replicas * float(np.average(held, weights=period)) if period.sum() > 0 else 1.0

    def step_features(self) -> dict[str, np.ndarray]:
        """The steps' columns `features.feature_matrix` reads, the run's host slowdowns and
        whether it was served included."""
        n = len(self.steps["period_s"])
        return {**self.steps, "host_slowdown": np.full(n, self.host_slowdown),
                "host_parallel_slowdown": np.full(n, self.host_parallel_slowdown),
                "served": np.full(n, float(self.served))}

    def simulator(self, step_time: StepTime, seed: int = 0,
                  delivery: DeliveryModel | None = None) -> Simulator:
        config = EngineConfig.model_validate(self.config)
        return Simulator(step_time, SchedulerConfig.for_engine(config, self.max_model_len),
                         self.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                         config.data_parallel_size, config.num_speculative_tokens or 0,
                         self.acceptance_rate if config.num_speculative_tokens else None, seed,
                         delivery if self.served else None)

    def replay(self, step_time: StepTime, seed: int = 0,
               delivery: DeliveryModel | None = None) -> dict[str, float]:
        """Simulate this run's requests at its load level; the metrics in `METRICS` and more.
        A served run is replayed as its clients saw it, with `delivery`'s delays."""
        concurrency = int(self.load_value) if self.load_kind == "concurrency" else None
        return self.simulator(step_time, seed, delivery).run(self.requests, concurrency).metrics()


def hardware_rates(hardware: Hardware) -> dict[str, Any]:
    """A stored machine's rates: measured for a CPU host, the spec sheet's for a GPU."""
    if hardware.kind == "cpu":
        m = hardware.measurement or {}
        if not m:
            raise ValueError(f"hardware {hardware.id} ({hardware.description}) has no CPU measurement")
        return {"kind": "cpu", "memory_bandwidth_gbs": m["read_bandwidth_gbs"],
                "peak_tflops": {"fp32": m["matmul_tflops_fp32"], "bf16": m["matmul_tflops_bf16"]},
                "interconnect_gbs": None}
    try:
        return spec_rates(hw.get_spec(hardware.spec_name))
    except hw.HardwareSpecError as err:  # a GPU no spec file describes: its rates are unknown
        raise ValueError(f"hardware {hardware.id} ({hardware.description}) has no spec named "
                         f"{hardware.spec_name!r} in profiles/hardware/*.yaml: add one (name, "
                         "memory, bandwidth, peak TFLOP/s) to fit its runs") from err


def spec_rates(spec: hw.HardwareSpec) -> dict[str, Any]:
    return {"kind": spec.kind, "memory_bandwidth_gbs": spec.memory_bandwidth_gbs,
            "peak_tflops": dict(spec.peak_tflops),
            "interconnect_gbs": spec.interconnect.bandwidth_gbs if spec.interconnect else None}


def device_for(rates: dict[str, Any], deployment: Deployment) -> Device:
    return Device.for_deployment(deployment, rates["kind"], rates["memory_bandwidth_gbs"],
                                 rates["peak_tflops"], rates["interconnect_gbs"])


def step_periods(start_s: np.ndarray, duration_s: np.ndarray, replica: np.ndarray,
                 idle_after: np.ndarray) -> np.ndarray:
    """Each step's share of the run's clock: from its start to its replica's next step (the
    loop's overhead between steps included), or its own duration where the engine then waited
    for an arrival, and for a replica's last step."""
    period = duration_s.astype(float).copy()
    for r in np.unique(replica):
        index = np.flatnonzero(replica == r)
        index = index[np.argsort(start_s[index], kind="stable")]
        gaps = np.diff(start_s[index])
        busy = ~idle_after[index[:-1]]
        period[index[:-1]] = np.where(busy, np.maximum(gaps, duration_s[index[:-1]]),
                                      duration_s[index[:-1]])
    return period


def busy_peers(start_s: np.ndarray, period_s: np.ndarray, replica: np.ndarray) -> np.ndarray:
    """How many other replicas were mid-step during each step, averaged over the step: replica
    processes share the machine's cores and memory bandwidth, so a step is slower while its
    peers are working than while they wait (about 15% on a 2-core host)."""
    peers = np.zeros(len(start_s))
    for r in np.unique(replica):
        mine = np.flatnonzero(replica == r)
        mine = mine[np.argsort(start_s[mine], kind="stable")]
        begins = start_s[mine]
        ends = np.minimum(begins + period_s[mine], np.r_[begins[1:], np.inf])
        # Replica r's busy time up to t, as a piecewise-linear function through its step edges.
        knots = np.column_stack([begins, ends]).ravel()
        worked = np.column_stack([np.r_[0.0, np.cumsum(ends - begins)[:-1]],
                                  np.cumsum(ends - begins)]).ravel()
        others = replica != r
        a, b = start_s[others], start_s[others] + period_s[others]
        peers[others] += (np.interp(b, knots, worked) - np.interp(a, knots, worked)) / np.maximum(b - a, 1e-12)
    return np.clip(peers, 0.0, max(len(np.unique(replica)) - 1, 0))


def _prompts(run: Run, vocab_size: int, rows: list[RequestRow]) -> list[tuple[int, ...]]:
    """The run's own prompts, regenerated from its workload's seed where they match the stored
    lengths (prefix caching then sees the same hits), else unrelated prompts of those lengths."""
    lengths = [r.input_tokens for r in rows]
    try:
        workload = Workload.model_validate(run.workload.spec)
        specs = workload.sample(len(rows))
        rng = np.random.default_rng(workload.seed)
        prompts = [tuple(workload.prompt_token_ids(s, vocab_size, rng)) for s in specs]
    except (WorkloadError, ValueError):
        return unique_prompts(lengths)
    if [len(p) for p in prompts] != lengths:
        return unique_prompts(lengths)
    return prompts


def load_runs(store: Store, run_ids: list[int] | None = None) -> list[RunData]:
    """Every run of the store (or those given) with its requests and steps."""
    out = []
    with store.session() as session:
        query = select(Run).order_by(Run.id)
        if run_ids is not None:
            query = query.where(Run.id.in_(run_ids))
        runs = list(session.scalars(query))
        sittings = {r: c for r, c in session.execute(
            select(Run.id, Experiment.campaign_id).join(Experiment, Run.experiment_id == Experiment.id))}
        drafts: dict[str, ModelShape] = {}
        for run in runs:
            model: Model = run.model
            config = {**run.engine_config.config, "model": model.path}
            draft = None
            if config.get("speculative_model"):
                path = config["speculative_model"]
                if path not in drafts:
                    drafts[path] = ModelShape.from_dir(path)
                draft = drafts[path]
            target = ModelShape(model.hidden_size, model.intermediate_size, model.num_layers,
                                model.num_heads, model.num_kv_heads, model.head_dim, model.vocab_size,
                                model.num_experts, int(model.config.get("num_experts_per_tok", 0) or 0))
            deployment = Deployment.from_engine_config(config, target, draft)
            rows = list(session.scalars(select(RequestRow).where(RequestRow.run_id == run.id)
                                        .order_by(RequestRow.position)))
            steps = _steps(session, run.id, run.load_kind, served=run.path == "http")
            if not rows or not len(steps["period_s"]):
                continue
            prompts = _prompts(run, model.vocab_size, rows)
            open_loop = run.load_kind == "rate"
            requests = [SimRequest(p, r.output_tokens, r.arrival_s if open_loop else None)
                        for p, r in zip(prompts, rows)]
            max_len = config.get("max_model_len") or model.config.get("max_position_embeddings", 2048)
            rates = hardware_rates(run.hardware)
            out.append(RunData(
                run.id, model.id, model.name, model.fingerprint, run.hardware_id, run.hardware.spec_name,
                rates, config, deployment, device_for(rates, deployment), run.load_kind, run.load_value,
                requests, {**run.latency, "throughput_tok_s": run.throughput_tok_s},
                steps, int(steps.pop("kv_blocks_total")[0]), int(max_len), run.acceptance_rate,
                run.host_probe_s, run.host_probe_parallel_s, sitting=sittings.get(run.id),
                path=run.path or "engine", delivery=run.delivery))
    return out


def _steps(session: Any, run_id: int, load_kind: str, served: bool = False) -> dict[str, np.ndarray]:
    columns = [getattr(StepRow, name) for name in COMPOSITION]
    rows = session.execute(
        select(*columns, StepRow.start_s, StepRow.duration_s, StepRow.replica, StepRow.num_running,
               StepRow.num_waiting, StepRow.kv_blocks_total)
        .where(StepRow.run_id == run_id).order_by(StepRow.replica, StepRow.step)).all()
    data = np.array(rows, dtype=float).reshape(len(rows), len(COMPOSITION) + 6)
    steps = {name: data[:, i] for i, name in enumerate(COMPOSITION)}
    start, duration, replica, running, waiting, blocks = data[:, len(COMPOSITION):].T
    # With nothing left in the engine, the gap to the next step is waiting, not work: in an open
    # loop, and in a served closed loop, whose next request comes after its client read the
    # last token and the server took the new one (in process it is added at once).
    idle = ((running + waiting == 0) if load_kind == "rate" or served
            else np.zeros(len(rows), dtype=bool))
    steps["period_s"] = step_periods(start, duration, replica, idle)
    steps["busy_peers"] = busy_peers(start, steps["period_s"], replica)
    steps["kv_blocks_total"] = blocks
    steps["in_flight"] = running + waiting  # the replica's requests after the step
    return steps


def host_key(spec_name: str, data_parallel_size: int = 1, tensor_parallel_size: int = 1) -> str:
    """Whose readings a run's is compared with: the same hardware, and the same process layout,
    since a loaded engine's other processes share the cores the probe runs on: a data- or
    tensor-parallel engine's runs read slower than one process's at any moment."""
    return f"{spec_name}/{jitter_class(data_parallel_size, tensor_parallel_size)}"


def run_host_key(run: RunData) -> str:
    return host_key(run.spec_name, run.deployment.data_parallel_size, run.deployment.tensor_parallel_size)


PARALLEL = "parallel/"  # prefixes a host_key whose reference is of parallel_probe readings


def host_references(runs: list[RunData]) -> dict[str, float]:
    """The typical probe reading of each hardware and process layout (`host_key`) over `runs`,
    and under PARALLEL + that key the typical parallel_probe reading."""
    keys = [run_host_key(r) for r in runs]
    out = {}
    for key in sorted(set(keys)):
        mine = [r for r, k in zip(runs, keys) if k == key]
        for name, readings in ((key, [r.host_probe_s for r in mine]),
                               (PARALLEL + key, [r.host_probe_parallel_s for r in mine])):
            reading = host_speed.typical(readings)
            if reading is not None:
                out[name] = reading
    return out


def set_host_slowdown(runs: list[RunData], references: dict[str, float]) -> None:
    for run in runs:
        key = run_host_key(run)
        run.host_slowdown = host_speed.slowdown(run.host_probe_s, references.get(key))
        run.host_parallel_slowdown = host_speed.slowdown(run.host_probe_parallel_s,
                                                         references.get(PARALLEL + key))


def length_coverage(runs: list[RunData]) -> dict[str, int]:
    """The longest prompt and the longest sequence (prompt + output) the runs measured: beyond
    them the step model's learned corrections stop following the lengths and only the roofline
    terms still grow, so predictions there are extrapolations."""
    prompts = [len(r.prompt_token_ids) for run in runs for r in run.requests]
    sequences = [len(r.prompt_token_ids) + r.output_tokens for run in runs for r in run.requests]
    if not prompts:
        return {}
    return {"prompt_tokens": max(prompts), "sequence_tokens": max(sequences)}


def data_version(runs: list[RunData]) -> str:
    """Names the training data: the runs and how many steps each held."""
    return fingerprint(sorted((r.run_id, len(r.steps["period_s"])) for r in runs))



def measured_acceptance(store: Store, model_dir: str, draft_dir: str) -> float | None:
    """The median acceptance rate the store measured for this target and draft, or None."""
    from engine.model_config import ModelConfig

    target = fingerprint(ModelConfig.from_dir(model_dir).raw)
    draft = str(Path(draft_dir).resolve())
    with store.session() as session:
        rows = session.execute(
            select(Run.acceptance_rate, EngineConfigRow.speculative_model)
            .join(EngineConfigRow, Run.engine_config_id == EngineConfigRow.id)
            .join(Model, Run.model_id == Model.id)
            .where(Model.fingerprint == target, Run.acceptance_rate.is_not(None))).all()
    rates = [rate for rate, path in rows if path and str(Path(path).resolve()) == draft]
    return float(np.median(rates)) if rates else None
