"""Drive the real engine, in process, with a workload at one load level on the wall clock.

Closed loop (concurrency C): C requests in flight, a new one the moment one finishes. Open loop
(rate R): Poisson arrivals at R req/s; a request's arrival is its scheduled time, so time spent
waiting behind a step counts toward its TTFT, as it would for a real client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from engine import SamplingParams, StepStats
from engine.sequence import RequestOutput
from planner.spec.slo import RequestLatency
from planner.spec.workload import PoissonArrival, RequestSpec, Workload


@dataclass
class MeasuredRequest:
    """One request as a run saw it, measured in process or by an HTTP client."""

    spec: RequestSpec
    arrival: float  # perf_counter time it arrived (or was sent)
    latency: RequestLatency
    output_tokens: int
    finish_reason: str | None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @classmethod
    def from_output(cls, spec: RequestSpec, arrival: float, output: RequestOutput) -> MeasuredRequest:
        m = output.metrics
        return cls(spec, arrival, RequestLatency.from_token_times(arrival, m.token_times),
                   len(output.token_ids), output.finish_reason, m.num_preemptions,
                   m.num_cached_prompt_tokens, m.num_draft_tokens, m.num_accepted_tokens)


@dataclass
class LoadResult:
    duration_s: float
    specs: list[RequestSpec]
    outputs: list[RequestOutput]  # in spec order; empty when measured over HTTP
    arrivals: list[float]  # perf_counter time each request arrived
    steps: list[StepStats] = field(default_factory=list)
    start_time: float = 0.0
    peak_memory_bytes: int | None = None
    requests: list[MeasuredRequest] = field(default_factory=list)  # in spec order
    # Served runs: what serving added (planner.measure.delivery.summarize_delivery); None in process.
    delivery: dict | None = None
    path: str = "engine"  # "engine": in process; "http": through `pilot serve`

    def __post_init__(self) -> None:
        if not self.requests and self.outputs:
            self.requests = [MeasuredRequest.from_output(spec, arrival, output) for spec, arrival, output
                             in zip(self.specs, self.arrivals, self.outputs)]


def _reset_peak_memory(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # "5": reset this process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory(device_type: str) -> int | None:
    if device_type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_load(engine, workload: Workload, load_kind: str, load_value: float, vocab_size: int,
             device_type: str = "cpu", on_finish: Callable[[int], None] | None = None) -> LoadResult:
    """Run every request of `workload` through `engine` (an LLMEngine or DataParallelEngine)
    at `load_kind` ("concurrency" | "rate") = `load_value`; returns when all have finished."""
    if load_kind not in ("concurrency", "rate"):
        raise ValueError(f"load_kind must be 'concurrency' or 'rate', got {load_kind!r}")
    if load_value <= 0:
        raise ValueError(f"load_value must be > 0, got {load_value}")
    # Every run starts cold: the profiler sends the same prompts at each load level, and
    # prefixes cached by the previous level would make the next one look faster than it is.
    engine.reset_prefix_cache()
    specs = workload.sample()
    rng = np.random.default_rng(workload.seed)
    prompts = [workload.prompt_token_ids(spec, vocab_size, rng) for spec in specs]
    offsets = (PoissonArrival(rate=load_value).arrival_times(len(specs), rng)
               if load_kind == "rate" else None)
    steps: list[StepStats] = []
    engine.add_step_observer(steps.append)
    ids = [f"load-{i}" for i in range(len(specs))]
    index = {request_id: i for i, request_id in enumerate(ids)}
    outputs: list[RequestOutput | None] = [None] * len(specs)
    arrivals = [0.0] * len(specs)
    in_flight, next_request, done = 0, 0, 0
    _reset_peak_memory(device_type)
    start = time.perf_counter()

    def add(i: int, arrival: float) -> None:
        params = SamplingParams(temperature=0, max_tokens=specs[i].output_tokens, ignore_eos=True)
        engine.add_request(ids[i], prompts[i], params, arrival_time=arrival)
        arrivals[i] = arrival

    try:
        while done < len(specs):
            now = time.perf_counter()
            if offsets is None:
                while next_request < len(specs) and in_flight < load_value:
                    add(next_request, now)
                    next_request, in_flight = next_request + 1, in_flight + 1
            else:
                while next_request < len(specs) and start + offsets[next_request] <= now:
                    add(next_request, start + float(offsets[next_request]))
                    next_request, in_flight = next_request + 1, in_flight + 1
                if in_flight == 0 and next_request < len(specs):
                    time.sleep(max(0.0, start + float(offsets[next_request]) - time.perf_counter()))
                    continue
            for output in engine.step():
                if output.finished and output.request_id in index:
                    outputs[index[output.request_id]] = output
                    in_flight, done = in_flight - 1, done + 1
                    if on_finish is not None:
                        on_finish(done)
    finally:
        observers = getattr(engine, "observers", None)
        if observers is not None and steps.append in observers:
            observers.remove(steps.append)
        for request_id in ids:  # an interrupted run leaves nothing running in the engine
            if request_id in engine.requests:
                engine.abort_request(request_id)
    duration = time.perf_counter() - start
    return LoadResult(duration, specs, outputs, arrivals, steps, start,  # type: ignore[arg-type]
                      _peak_memory(device_type))
