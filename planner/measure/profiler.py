"""`pilot profile`: measure the real engine over a search space and keep every run.

A campaign is the plan for one (hardware, model, workload, space, draft): every configuration
of the space, in coverage order (planner/spec/search_space.py), at every load level. It is stored
before anything runs, and each experiment is claimed, run and written with its requests and
steps in one transaction. Running the same command again resumes the campaign: finished
experiments are never redone, and one left "running" by a process that has died (Ctrl-C,
kill -9) is claimed again. Several profilers may share a campaign; each claims its own
experiments.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from engine import LLM, EngineConfig
from engine.device import native_bf16
from engine.model_config import ModelConfig
from planner.measure import host_speed
from planner.measure.claims import Heartbeat, Rank, claim_next, fail_config, release
from planner.measure.in_process import LoadResult, run_load
from planner.spec import hardware as hw
from planner.spec.errors import FieldError
from planner.spec.search_space import SearchSpace
from planner.spec.slo import SLO
from planner.spec.workload import Workload
from planner.store.database import (
    Campaign,
    EngineConfigRow,
    Experiment,
    Model,
    Store,
    fingerprint,
)
from planner.store.records import config_row, hardware_row, model_row, record_run, workload_row


@dataclass
class ProfileResult:
    campaign_id: int
    planned: int  # experiments in the campaign
    done_before: int  # finished by earlier invocations
    run_ids: list[int] = field(default_factory=list)  # finished by this one
    failed: list[tuple[int, str]] = field(default_factory=list)  # (experiment id, error)
    remaining: int = 0
    stopped_by_rule: bool = False  # `after_run` stopped it (a stop rule met)


def space_for_this_host(name_or_file: str) -> SearchSpace:
    """A search space by file or built-in name; the built-in CPU space is measured in float32 on
    a CPU that emulates bf16 (`SearchSpace.in_float32_where_bf16_is_slower`)."""
    return SearchSpace.from_file(name_or_file).in_float32_where_bf16_is_slower(not native_bf16())


def base_config(model_dir: str, workload: Workload) -> EngineConfig:
    """Settings outside the space: the model, and a context long enough for the workload."""
    longest = max(s.input_tokens + s.output_tokens for s in workload.sample())
    model_max = ModelConfig.from_dir(model_dir).max_position_embeddings
    if longest > model_max:
        raise ValueError(f"the workload has requests of {longest} tokens, more than the model's "
                         f"max_position_embeddings={model_max}")
    return EngineConfig(model=model_dir, max_model_len=min(model_max, -(-longest // 16) * 16))


def plan_campaign(store: Store, model_dir: str, space: SearchSpace, workload: Workload,
                  draft: str | None = None, max_parallel: int | None = None,
                  measure_hardware: bool = True, repeats: int = 1) -> Campaign:
    """The campaign for these inputs: found if it exists (resume), else planned and stored.

    `repeats` > 1 measures every (configuration, load level) that many times back to back on one
    engine: on a shared host one run's metrics stray from the next run's by tens of percent, and
    `pilot fit` judges its predictions against the median of the repeats."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    hardware, model = hardware_row(store, measure_hardware), model_row(store, model_dir)
    load = workload_row(store, workload)
    # The draft by its absolute path, so `--workdir ref` and `--workdir /tmp/ref` resume one
    # campaign; a campaign keyed by the path as it was typed is still found.
    spellings = dict.fromkeys([str(Path(draft).resolve()), draft] if draft else [draft])
    keys = [fingerprint({"hardware": hardware.fingerprint, "model": model.fingerprint,
                         "workload": load.fingerprint, "space": space.model_dump(mode="json"),
                         "draft": spelling}
                        # Only when repeating, so campaigns planned before repeats keep their key.
                        | ({"repeats": repeats} if repeats > 1 else {}))
            for spelling in spellings]
    key = keys[0]
    with store.session() as session:
        found = {c.fingerprint: c for c in session.scalars(select(Campaign).where(Campaign.fingerprint.in_(keys)))}
        for known in keys:
            if known in found:
                return found[known]
    configs = space.configs(base_config(model_dir, workload), draft,
                            max_parallel=max_parallel or os.cpu_count() or 1,
                            model=ModelConfig.from_dir(model_dir))
    rows = [config_row(store, c) for c in configs]
    campaign = store.get_or_create(Campaign, key, hardware_id=hardware.id, model_id=model.id,
                                   workload_id=load.id, space=space.model_dump(mode="json"))
    with store.session() as session:
        if session.scalar(select(Experiment.id).where(Experiment.campaign_id == campaign.id).limit(1)) is None:
            position = 0
            for row in rows:
                for level in space.load.levels:
                    for _ in range(repeats):
                        session.add(Experiment(campaign_id=campaign.id, position=position,
                                               engine_config_id=row.id, load_kind=space.load.kind,
                                               load_value=level))
                        position += 1
            try:
                session.commit()
            except IntegrityError:  # another profiler planned it first: same plan, keep theirs
                session.rollback()
    return campaign


def plan_again(store: Store, campaign: Campaign, fraction: float, repeats: int = 1,
               seed: int = 0, sitting: int = 2) -> Campaign:
    """A later sitting (the `sitting`-th, the campaign itself being the first) for a random
    `fraction` of `campaign`'s finished measurements (each configuration and load level with all
    its repeats run, or where none has, with a run), `repeats` runs each, found if it exists.
    Every later sitting with the same `seed` measures the same share, so each of those
    measurements has a median over all the sittings.

    Repeats back to back share whatever spell the host is in, so their spread understates how
    far a measurement moves from one sitting to the next; measuring some again later shows it
    (`noise_floor.sitting_noise_floor`). The runs join the same measurements in the store."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if sitting < 2:
        raise ValueError(f"sitting must be >= 2 (the campaign is the first), got {sitting}")
    # The second sitting keeps the key it had before later ones existed, so it resumes.
    key = fingerprint({"again": campaign.fingerprint, "fraction": fraction, "repeats": repeats, "seed": seed}
                      | ({"sitting": sitting} if sitting > 2 else {}))
    with store.session() as session:
        existing = session.scalar(select(Campaign).where(Campaign.fingerprint == key))
        if existing is not None:
            return existing
        finished = func.sum(case((Experiment.status == "done", 1), else_=0))
        measured = session.execute(
            select(Experiment.engine_config_id, Experiment.load_kind, Experiment.load_value,
                   func.min(Experiment.position), finished, func.count())
            .where(Experiment.campaign_id == campaign.id)
            .group_by(Experiment.engine_config_id, Experiment.load_kind, Experiment.load_value)
            .having(finished > 0)).all()
    if not measured:
        raise ValueError(f"campaign {campaign.id} has no finished measurement to measure again")
    # Measurements with all their repeats, where there are any: one the budget cut short has a
    # first sitting of fewer runs, which the sittings' floor cannot pair with a full one.
    whole = [row[:4] for row in measured if row[4] == row[5]]
    done = whole or [row[:4] for row in measured]
    picked = random.Random(seed).sample(range(len(done)), max(1, round(fraction * len(done))))
    # In the first sitting's order, so one engine serves a configuration's load levels in turn.
    chosen = sorted((done[i] for i in picked), key=lambda row: row[3])
    again = store.get_or_create(Campaign, key, hardware_id=campaign.hardware_id, model_id=campaign.model_id,
                                workload_id=campaign.workload_id, space=campaign.space)
    with store.session() as session:
        if session.scalar(select(Experiment.id).where(Experiment.campaign_id == again.id).limit(1)) is None:
            session.add_all(Experiment(campaign_id=again.id, position=i * repeats + r, engine_config_id=config_id,
                                       load_kind=kind, load_value=value)
                            for i, (config_id, kind, value, _) in enumerate(chosen) for r in range(repeats))
            try:
                session.commit()
            except IntegrityError:  # planned by another profiler first: the same sample
                session.rollback()
    return again


class InProcess:
    """Measures a configuration by driving its engine in this process (`--via engine`)."""

    def __init__(self, config: EngineConfig, workload: Workload) -> None:
        self.llm = LLM(config)
        try:
            warm_up(self.llm, workload)
        except BaseException:
            self.llm.close()
            raise

    def measure(self, workload: Workload, load_kind: str, load_value: float) -> LoadResult:
        engine = self.llm.engine
        return run_load(engine, workload, load_kind, load_value, engine.model_config.vocab_size,
                        _device_type(engine.config))

    def close(self) -> None:
        self.llm.close()


VIA = ("engine", "http")
FRESH_READING_S = 1.0  # a reading of the host's speed this recent stands for now


def profile(store: Store, campaign: Campaign, workload: Workload, budget_s: float,
            slos: list[SLO] | None = None,
            on_progress: Callable[[str, float], None] | None = None,
            via: str = "engine", max_runs: int | None = None, rank: Rank | None = None,
            after_run: Callable[[float], bool] | None = None) -> ProfileResult:
    """Run the campaign's experiments in order until they are done, `budget_s` is spent, or
    `max_runs` experiments have been measured (or failed) by this call: a count, so that a
    profile can be sized the same on any host.
    `on_progress(description, elapsed_s)` is called as experiments start and finish.

    `via="engine"` drives the engine in this process; `via="http"` launches `pilot serve` for
    each configuration and measures it as a client does, through the OpenAI API on loopback.

    `rank` picks the order experiments are taken in (default: the campaign's); `after_run(elapsed_s)`
    is called after each recorded run and stops the profile by returning True (a stop rule)."""
    if via not in VIA:
        raise FieldError(f"must be one of {', '.join(VIA)}, got {via!r}", field="via")
    if max_runs is not None and max_runs < 1:
        raise FieldError(f"must be >= 1, got {max_runs}", field="max_runs")
    if via == "http":
        from planner.measure.http import OverHTTP as Measurer
    else:
        Measurer = InProcess
    with store.session() as session:
        counts = _count(session, campaign.id)
    result = ProfileResult(campaign.id, sum(counts.values()), counts.get("done", 0))
    start = time.monotonic()
    durations: list[float] = []
    measurer: InProcess | None = None
    measurer_config_id: int | None = None
    last_reading: tuple[float, tuple[float, float]] | None = None  # when, and the two probes' readings
    try:
        while True:
            elapsed = time.monotonic() - start
            # The next experiment is expected to take as long as the mean so far; the first
            # always runs, so that any budget makes progress.
            if durations and elapsed + sum(durations) / len(durations) > budget_s:
                break
            if max_runs is not None and len(durations) >= max_runs:
                break
            experiment = claim_next(store, campaign.id, rank)
            if experiment is None:
                break
            with Heartbeat(store, experiment.id):
                began = time.monotonic()
                with store.session() as session:
                    config_data = session.get(EngineConfigRow, experiment.engine_config_id).config
                    model_path = session.get(Model, campaign.model_id).path
                config = EngineConfig(model=model_path, **config_data)
                label = (f"{_summary(config)} @ {experiment.load_kind} {experiment.load_value:g}")
                if on_progress:
                    on_progress(label, elapsed)
                if measurer_config_id != experiment.engine_config_id:
                    last_reading = None
                    if measurer is not None:
                        measurer.close()
                    measurer, measurer_config_id = None, None
                    try:
                        measurer = Measurer(config, workload)
                    except (ValueError, RuntimeError, NotImplementedError, MemoryError) as err:
                        # A configuration this model or host cannot run is a finding, not a crash.
                        error = f"{type(err).__name__}: {err}"[:2000]
                        result.failed += [(i, str(err)) for i in fail_config(store, experiment, error)]
                        durations.append(time.monotonic() - began)
                        continue
                    except BaseException:
                        release(store, experiment.id)
                        raise
                    measurer_config_id = experiment.engine_config_id
                try:
                    # The reading after the run before serves as this one's before, when it is
                    # fresh: on a small model the probes took longer than the runs.
                    fresh = last_reading is not None and time.monotonic() - last_reading[0] < FRESH_READING_S
                    before = last_reading[1] if fresh else (host_speed.probe(), host_speed.parallel_probe())
                    with hw.GpuSampler() as sampler:
                        measured = measurer.measure(workload, experiment.load_kind, experiment.load_value)
                    after = host_speed.probe(), host_speed.parallel_probe()
                    last_reading = time.monotonic(), after
                    result.run_ids.append(record_run(store, experiment, campaign, measured, slos,
                                                     sampler.summary(), host_speed.around(before[0], after[0]),
                                                     host_speed.around(before[1], after[1])))
                except (ValueError, RuntimeError, NotImplementedError, MemoryError) as err:
                    release(store, experiment.id, "failed", f"{type(err).__name__}: {err}"[:2000])
                    result.failed.append((experiment.id, str(err)))
                except BaseException:
                    release(store, experiment.id)  # Ctrl-C: give the experiment back, keep the rest
                    raise
                durations.append(time.monotonic() - began)
            if on_progress:
                on_progress(label, time.monotonic() - start)
            if after_run is not None and result.run_ids and after_run(time.monotonic() - start):
                result.stopped_by_rule = True
                break
    finally:
        if measurer is not None:
            measurer.close()
        with store.session() as session:
            result.remaining = _count(session, campaign.id).get("pending", 0)
    return result


def warm_up(llm: LLM, workload: Workload) -> None:
    """A few of the workload's requests, unmeasured, on a freshly loaded engine: first calls
    pay for page faults, kernel and allocator caches, and would otherwise be charged to the
    configuration's first load level (serving benchmarks warm up for the same reason)."""
    few = workload.model_copy(update={"num_requests": min(4, workload.num_requests)})
    run_load(llm.engine, few, "concurrency", few.num_requests, llm.engine.model_config.vocab_size,
             _device_type(llm.engine.config))


def _count(session: Session, campaign_id: int) -> dict[str, int]:
    rows = session.execute(select(Experiment.status, func.count()).where(
        Experiment.campaign_id == campaign_id).group_by(Experiment.status)).all()
    return {status: n for status, n in rows}


def _device_type(config: EngineConfig) -> str:
    from engine.device import resolve_device

    return resolve_device(config.device).type


def _summary(config: EngineConfig) -> str:
    parts = [config.quantization or config.dtype, f"seqs {config.max_num_seqs}",
             f"batch {config.max_num_batched_tokens}"]
    if not config.enable_chunked_prefill:
        parts.append("no chunking")
    if config.tensor_parallel_size > 1:
        parts.append(f"tp {config.tensor_parallel_size}")
    if config.data_parallel_size > 1:
        parts.append(f"dp {config.data_parallel_size}")
    if config.num_speculative_tokens:
        parts.append(f"spec k={config.num_speculative_tokens}")
    return ", ".join(parts)
