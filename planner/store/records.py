"""Writing what a measurement found into the store: this host's, the model's, the engine
configuration's and the workload's rows, and a run with its requests and steps in one
transaction. The profiler, `recommend --verify` and `pilot bench serve` all record through here."""

from __future__ import annotations

import datetime as dt
import subprocess
from dataclasses import asdict
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import insert, update

from engine import EngineConfig, StepStats, checkpoint_shapes
from engine.model_config import ModelConfig
from planner.spec import hardware as hw
from planner.spec.slo import SLO, goodput, summarize
from planner.spec.workload import Workload
from planner.store.database import (
    Campaign,
    EngineConfigRow,
    Experiment,
    Hardware,
    Model,
    RequestRow,
    Run,
    StepRow,
    Store,
    WorkloadRow,
    fingerprint,
    utcnow,
)

if TYPE_CHECKING:
    from planner.measure.in_process import LoadResult

# The checkout this code runs from, if it does: an installed copy's parents[2] is site-packages,
# which may itself sit inside some other git repository.
REPO = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=1)
def engine_version() -> str:
    try:
        return metadata.version("pilot")
    except metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=1)  # once per process, not a `git` subprocess per run
def git_revision() -> str | None:
    if not (REPO / ".git").exists():  # an installed package, not a checkout
        return None
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def hardware_row(store: Store, measure: bool = True) -> Hardware:
    """This machine's row; the CPU microbenchmark runs once per host and is kept."""
    detected = hw.detect()
    identity = asdict(detected)
    kind = "gpu" if detected.gpus else "cpu"
    description = detected.gpus[0].name if detected.gpus else detected.cpu.model
    row = store.get_or_create(
        Hardware, fingerprint(identity), spec_name=detected.name, kind=kind,
        description=description, device_count=max(1, len(detected.gpus)),
        memory_gb=(detected.gpus[0].memory_gb if detected.gpus else detected.cpu.memory_gb),
        details=identity)
    if measure and kind == "cpu" and row.measurement is None:
        # Every thread this process may use, not the current count: an engine run earlier in
        # the process leaves its own (one, in `pilot bench recommend`'s ground-truth store,
        # which then read a third of the bandwidth and half the matmul rate).
        measurement = asdict(hw.measure_cpu(threads=detected.cpu.usable_threads))
        with store.session() as session:
            session.execute(update(Hardware).where(Hardware.id == row.id)
                            .values(measurement=measurement, measured_at=utcnow()))
            session.commit()
        row.measurement = measurement
    return row


def model_row(store: Store, model_dir: str) -> Model:
    cfg = ModelConfig.from_dir(model_dir)
    params = 0
    for shape in checkpoint_shapes(cfg).values():
        count = 1
        for n in shape:
            count *= n
        params += count
    return store.get_or_create(
        Model, fingerprint(cfg.raw), name=Path(model_dir).name, path=str(Path(model_dir).resolve()),
        model_type=cfg.model_type, num_params=params, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, num_experts=cfg.num_local_experts,
        config=cfg.raw)


def config_row(store: Store, config: EngineConfig) -> EngineConfigRow:
    data = config.model_dump(mode="json", exclude={"model", "tokenizer"})
    return store.get_or_create(
        EngineConfigRow, fingerprint(data), dtype=config.dtype, quantization=config.quantization,
        tensor_parallel_size=config.tensor_parallel_size, data_parallel_size=config.data_parallel_size,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        enable_chunked_prefill=config.enable_chunked_prefill,
        enable_prefix_caching=config.enable_prefix_caching,
        speculative_model=config.speculative_model, num_speculative_tokens=config.num_speculative_tokens,
        config=data)


def workload_row(store: Store, workload: Workload) -> WorkloadRow:
    spec = workload.model_dump(mode="json")
    return store.get_or_create(WorkloadRow, fingerprint(spec), name=workload.name,
                               description=workload.describe(), spec=spec)


def record_run(store: Store, experiment: Experiment, campaign: Campaign, result: LoadResult,
               slos: list[SLO] | None, gpu: dict | None, host_probe_s: float | None = None,
               host_probe_parallel_s: float | None = None) -> int:
    """The run, its requests and its steps, and the experiment marked done: one transaction."""
    requests = result.requests
    latencies = [r.latency for r in requests]
    output_tokens = sum(r.output_tokens for r in requests)
    drafted = sum(r.num_draft_tokens for r in requests) or sum(s.num_draft_tokens for s in result.steps)
    accepted = (sum(r.num_accepted_tokens for r in requests)
                or sum(s.num_accepted_tokens for s in result.steps))
    with store.session() as session, session.begin():
        run = Run(
            experiment_id=experiment.id, hardware_id=campaign.hardware_id, model_id=campaign.model_id,
            engine_config_id=experiment.engine_config_id, workload_id=campaign.workload_id,
            load_kind=experiment.load_kind, load_value=experiment.load_value,
            started_at=utcnow() - dt.timedelta(seconds=result.duration_s), duration_s=result.duration_s,
            num_requests=len(requests), output_tokens=output_tokens,
            throughput_tok_s=output_tokens / result.duration_s,
            request_rate=len(requests) / result.duration_s,
            goodput=goodput(latencies, slos, result.duration_s) if slos else None,
            slos=",".join(str(s) for s in slos) if slos else None, latency=summarize(latencies),
            peak_memory_bytes=result.peak_memory_bytes,
            acceptance_rate=accepted / drafted if drafted else None,
            energy_j=(gpu or {}).get("energy_j"), gpu=gpu or None,
            engine_version=engine_version(), git_revision=git_revision(), host_probe_s=host_probe_s,
            host_probe_parallel_s=host_probe_parallel_s, path=result.path,
            delivery=result.delivery)
        session.add(run)
        session.flush()
        # Core inserts, many rows a statement: a run has hundreds of steps, and ORM objects
        # for each took longer than a small model's run.
        if requests:
            session.execute(insert(RequestRow), [dict(
                run_id=run.id, position=r.spec.index, input_tokens=r.spec.input_tokens,
                output_tokens=r.output_tokens, arrival_s=r.arrival - result.start_time,
                ttft_s=r.latency.ttft_s, tpot_s=r.latency.tpot_s,
                itl_mean_s=r.latency.mean_itl_s, e2e_s=r.latency.e2e_s,
                num_preemptions=r.num_preemptions, num_cached_prompt_tokens=r.num_cached_prompt_tokens,
                acceptance_rate=r.acceptance_rate, finish_reason=r.finish_reason) for r in requests])
        if result.steps:
            session.execute(insert(StepRow), [dict(run_id=run.id, start_s=s.start_time - result.start_time,
                                                   **_step_fields(s)) for s in result.steps])
        session.execute(update(Experiment).where(Experiment.id == experiment.id)
                        .values(status="done", owner=None, error=None))
        return run.id


def _step_fields(stats: StepStats) -> dict:
    data = stats.to_dict()
    del data["start_time"]  # kept as the offset from the run's start
    del data["kv_blocks_touched"]  # the server's memory, not the step's cost
    return data
