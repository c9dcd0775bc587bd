"""How fast this host is right now: a 50 ms probe read around every profiled run and at plan time.

A shared host's speed swings: other tenants take cores, caches and memory bandwidth, and on the
2-core machines pilot is tested on one run of a configuration can take 1.3x as long as the same run
a minute later. The probe times a fixed piece of work shaped like an engine step (a small bf16
matmul, fp32 where bf16 is emulated, and a streaming read of 16 MiB); its reading, stored with
each run, lets the step-time model tell a slow configuration from a slow moment, and a reading
taken when planning lets a prediction say what the host will do now.

A reading is the median time of one piece of work on one thread, in seconds; a `slowdown`
divides it by the host's typical reading (the median over the runs a cost model was fitted on),
so 1.0 is a typical moment and 1.3 a host running 30% slow. A second reading, `parallel_probe`,
runs a prefill-sized matmul on every core: it sees a single slowed core, which the first misses.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from typing import Callable, Iterable

import numpy as np
import torch

from engine.device import native_bf16

PROBE_SECONDS = 0.05
PLANNING_SECONDS = 0.2  # a reading to plan on: four probes' worth, so one disturbed moment weighs less
MIN_REPEATS = 5


@lru_cache(maxsize=1)
def _dtype() -> torch.dtype:
    """bf16 where the CPU multiplies it natively; else fp32, since emulated bf16 matmuls take
    50x as long and would make a probe cost seconds. A reading is only ever compared with
    readings of the same host, so the choice only has to be the same each time."""
    return torch.bfloat16 if native_bf16() else torch.float32


@lru_cache(maxsize=1)
def _operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(256, 256, generator=generator).to(_dtype())
    b = torch.randn(256, 256, generator=generator).to(_dtype())
    return a, b, torch.ones(4 << 20)  # 16 MiB of fp32: more than a core's share of cache


@lru_cache(maxsize=1)
def _prefill_operands() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(160, 1024, generator=generator).to(_dtype()),
            torch.randn(1024, 2048, generator=generator).to(_dtype()))


def _median_time(work: Callable[[], object], threads: int, seconds: float) -> float:
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    times: list[float] = []
    # A fixed thread count, whatever the process uses: an engine sets its own (a tensor-parallel
    # rank keeps half the cores, and the count outlives the engine), and a reading must measure
    # the host, not the last engine's setting.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            work()  # untimed: a first call pays for allocation and set-up
            end = time.perf_counter() + seconds
            while time.perf_counter() < end or len(times) < MIN_REPEATS:
                began = time.perf_counter()
                work()
                times.append(time.perf_counter() - began)
    finally:
        torch.set_num_threads(previous)
    return float(np.median(times))


def probe(seconds: float = PROBE_SECONDS) -> float:
    """The median time of one piece of probe work on one thread over about `seconds` (at least
    MIN_REPEATS): how fast one core runs, what a small model's decode step mostly waits on."""
    a, b, stream = _operands()
    return _median_time(lambda: (torch.mm(a, b), stream.sum()), 1, seconds)


def parallel_probe(seconds: float = PROBE_SECONDS) -> float:
    """The median time of a prefill-sized matmul on every core over about `seconds`.

    A parallel region waits for its slowest thread, so one core slowed by a neighbour (a busy
    hyperthread sibling, another process) slows the whole region, while a one-thread `probe`
    simply runs on the other core and reads as usual. Measured on a 2-core VM: a busy loop
    pinned to one core could make a two-thread prefill-sized matmul 4.4x slower (depending on
    how the scheduler placed the threads) and left `probe` where it was; with the machine idle,
    8% of one-second samples over 8 minutes showed two threads less than 1.43x as fast as one,
    uncorrelated with `probe` (r = 0.03). The engine's prefill and batched steps are such regions."""
    x, w = _prefill_operands()
    return _median_time(lambda: torch.mm(x, w), os.cpu_count() or 1, seconds)


def around(before: float, after: float) -> float:
    """One reading for a run from the probes before and after it (their geometric mean)."""
    return float(np.sqrt(before * after))


def typical(readings: Iterable[float | None]) -> float | None:
    """The host's typical reading: the median of those taken, None when none was."""
    taken = [r for r in readings if r is not None and r > 0]
    return float(np.median(taken)) if taken else None


def slowdown(reading: float | None, reference: float | None) -> float:
    """`reading` relative to the typical one; 1.0 when either is unknown."""
    if reading is None or reference is None or reading <= 0 or reference <= 0:
        return 1.0
    return float(reading / reference)
