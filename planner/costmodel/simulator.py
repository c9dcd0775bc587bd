"""The digital twin: a workload replayed through the engine's own `Scheduler` on a virtual clock.

Nothing here decides what runs in a step. The engine's `Scheduler` and `BlockManager` do, as
they do when the engine serves; a model of step time (planner/costmodel/step_model.py) stands in for the
forward pass, and the clock advances by what it predicts. Sequences get placeholder tokens (no
sampling), speculative decoding accepts drafts at the pair's measured acceptance rate, and
data-parallel replicas each get a scheduler of their own behind the front's routing rule
(fewest outstanding requests), so a change to the engine's batching changes the simulation too.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable
from typing import Sequence as Seq

import numpy as np

from engine.block_manager import BlockManager
from engine.observer import StepComposition
from engine.rules import draft_budget
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence
from planner.costmodel.delivery import DeliveryModel
from planner.spec.slo import SLO, RequestLatency, goodput, summarize

# (a step's composition, how many other replicas are working meanwhile) -> seconds
StepTime = Callable[[StepComposition, int], float]
PLACEHOLDER_TOKEN = 0


@dataclass(frozen=True)
class SimRequest:
    prompt_token_ids: tuple[int, ...]
    output_tokens: int
    arrival_s: float | None = None  # None under a closed loop


@dataclass
class SimulationResult:
    latencies: list[RequestLatency]
    duration_s: float
    output_tokens: int
    num_steps: int
    num_preemptions: int
    kv_peak_fraction: float  # most of the KV cache any replica used at once
    kv_mean_fraction: float  # step-weighted mean use
    compositions: list[StepComposition] = field(default_factory=list)  # when recorded

    @property
    def throughput_tok_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def request_rate(self) -> float:
        return len(self.latencies) / self.duration_s if self.duration_s > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """Latency percentiles (as `planner.spec.slo.summarize`), throughput and KV pressure."""
        return {**summarize(self.latencies), "throughput_tok_s": self.throughput_tok_s,
                "request_rate": self.request_rate, "kv_peak_fraction": self.kv_peak_fraction,
                "num_preemptions": float(self.num_preemptions)}

    def goodput(self, slos: list[SLO]) -> float:
        return goodput(self.latencies, slos, self.duration_s)


@dataclass
class _Replica:
    scheduler: Scheduler
    clock: float = 0.0
    outstanding: int = 0


class Simulator:
    """One deployment (a scheduler configuration, its KV cache, replicas, a draft's acceptance)
    and a model of its step time; `run` replays requests through it."""

    def __init__(self, step_time: StepTime, scheduler_config: SchedulerConfig, num_kv_blocks: int,
                 block_size: int = 16, enable_prefix_caching: bool = True, data_parallel_size: int = 1,
                 num_speculative_tokens: int = 0, acceptance_rate: float | None = None,
                 seed: int = 0, delivery: DeliveryModel | None = None) -> None:
        if num_speculative_tokens and acceptance_rate is None:
            raise ValueError("acceptance_rate is required with num_speculative_tokens")
        if acceptance_rate is not None and not 0.0 <= acceptance_rate <= 1.0:
            raise ValueError(f"acceptance_rate must be in [0, 1], got {acceptance_rate}")
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        self.step_time = step_time
        self.scheduler_config = scheduler_config
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.data_parallel_size = data_parallel_size
        self.k = num_speculative_tokens
        self.acceptance = (per_position_acceptance(acceptance_rate, num_speculative_tokens)
                           if num_speculative_tokens else 0.0)
        self.seed = seed
        # Served through `pilot serve`: requests reach the engine late and clients read tokens
        # late, by the delays the served runs measured. None: as the engine in process.
        self.delivery = delivery if delivery is not None and delivery.is_fitted else None

    def run(self, requests: Seq[SimRequest], concurrency: int | None = None,
            record: bool = False, stagger_s: float = 0.0) -> SimulationResult:
        """Replay `requests`: at their `arrival_s` (open loop), or `concurrency` at a time, a new
        one the moment one finishes (closed loop), as `planner.measure.in_process.run_load` drives the engine.

        `stagger_s` spreads the closed loop's first requests evenly over that many seconds: clients
        of equal requests that all start at once stay in lockstep forever in a deterministic replay,
        where real ones drift apart (a long benchmark's steady state has them evenly out of phase)."""
        if concurrency is None and any(r.arrival_s is None for r in requests):
            raise ValueError("requests need arrival_s unless a concurrency is given")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        rng = np.random.default_rng(self.seed)
        # Delays come from a stream of their own, so the engine's replay stays as without them.
        delays = np.random.default_rng(self.seed + 1)
        sent: dict[int, float] = {}  # served: when each request's client sent it
        # A cache larger than every block these requests could ever take behaves exactly like
        # one of that size (never-used blocks go first, so nothing cached is evicted earlier),
        # and a CPU engine's default cache has 10^5 blocks: cap it, so setting up is cheap.
        bound = sum(-(-(len(r.prompt_token_ids) + r.output_tokens + self.k) // self.block_size) + 1
                    for r in requests)
        blocks = min(self.num_kv_blocks, bound)
        replicas = [_Replica(Scheduler(self.scheduler_config,
                                       BlockManager(blocks, self.block_size, self.enable_prefix_caching)))
                    for _ in range(self.data_parallel_size)]
        seqs: list[Sequence] = []
        # Open loop: arrivals in time order. Closed loop: a request arrives when one finishes.
        pending = ([] if concurrency is not None else
                   sorted((r.arrival_s, i) for i, r in enumerate(requests)))  # type: ignore[misc]
        heapq.heapify(pending)
        next_closed = 0
        if concurrency is not None:
            first = min(concurrency, len(requests))
            for i in range(first):
                heapq.heappush(pending, (stagger_s * i / first, next_closed))
                next_closed += 1
        steps, preemptions, kv_peak, kv_sum, finished, in_flight_sum = 0, 0, 0.0, 0.0, 0, 0
        compositions: list[StepComposition] = []
        end = 0.0

        while finished < len(requests):
            busy = [r for r in replicas if r.scheduler.has_unfinished()]
            replica = min(busy, key=lambda r: r.clock) if busy else None
            if pending and (replica is None or pending[0][0] <= replica.clock):
                arrival, index = heapq.heappop(pending)
                if self.delivery is not None and index not in sent:
                    # Sent now; it reaches the engine once the server has taken it.
                    sent[index] = arrival
                    width = sum(r.outstanding for r in replicas)
                    admit = float(self.delivery.sampler(width, delays)("admit_s"))
                    heapq.heappush(pending, (arrival + max(0.0, admit), index))
                    continue
                target = min(replicas, key=lambda r: r.outstanding)
                if not target.scheduler.has_unfinished():  # an idle replica waits for it
                    target.clock = max(target.clock, arrival)
                seq = _sequence(index, requests[index], arrival)
                seqs.append(seq)
                target.outstanding += 1
                target.scheduler.add(seq)
                continue
            assert replica is not None, "nothing to run and nothing to arrive"
            out = replica.scheduler.schedule(now=replica.clock)
            if out.is_empty:
                raise RuntimeError("the scheduler made no progress (a request larger than the KV cache?)")
            composition = out.composition()
            if record:
                compositions.append(composition)
            # Peers working during this step: those with work, and those whose last step ran
            # past this replica's clock (finished "later", so busy for part of this step).
            peers = sum(1 for r in replicas if r is not replica
                        and (r.clock > replica.clock or r.scheduler.has_unfinished()))
            replica.clock += self.step_time(composition, peers)
            in_flight_sum += sum(r.outstanding for r in replicas)
            done = replica.scheduler.update(out, self._sample(out, rng), replica.clock)
            self._propose(replica.scheduler)
            steps += 1
            preemptions += len(out.preempted)
            used = replica.scheduler.block_manager.num_used_blocks / self.num_kv_blocks
            kv_peak, kv_sum = max(kv_peak, used), kv_sum + used
            for _ in done:
                replica.outstanding -= 1
                finished += 1
                end = max(end, replica.clock)
                if concurrency is not None and next_closed < len(requests):
                    # A served client sends its next request once it has read the last token.
                    read = 0.0 if self.delivery is None else float(self.delivery.sampler(
                        sum(r.outstanding for r in replicas), delays)("token_s"))
                    heapq.heappush(pending, (replica.clock + max(0.0, read), next_closed))
                    next_closed += 1

        ordered = sorted(seqs, key=lambda s: int(s.request_id))
        if self.delivery is None:
            latencies = [RequestLatency.from_token_times(s.metrics.arrival_time, s.metrics.token_times)
                         for s in ordered]
            start = min((s.metrics.arrival_time for s in seqs), default=0.0)
        else:
            sampler = self.delivery.sampler(in_flight_sum / steps if steps else 1.0, delays)
            latencies = [RequestLatency.from_token_times(sent[int(s.request_id)],
                                                         sampler.client_times(s.metrics.token_times))
                         for s in ordered]
            start = min(sent.values(), default=0.0)
        return SimulationResult(
            latencies, end - start, sum(s.num_output_tokens for s in seqs), steps, preemptions,
            kv_peak, kv_sum / steps if steps else 0.0, compositions)

    def _sample(self, out: SchedulerOutput, rng: np.random.Generator) -> list[int | list[int] | None]:
        """A placeholder token per sampling sequence; with drafts, the accepted ones plus one."""
        sampled: list[int | list[int] | None] = []
        for item in out.scheduled:
            if not item.samples:
                sampled.append(None)
            elif item.spec_token_ids:
                accepted = 0
                while accepted < len(item.spec_token_ids) and rng.random() < self.acceptance:
                    accepted += 1
                sampled.append([PLACEHOLDER_TOKEN] * (accepted + 1))
            else:
                sampled.append(PLACEHOLDER_TOKEN)
        return sampled

    def _propose(self, scheduler: Scheduler) -> None:
        """Drafts for every decoding sequence, by the engine's rule (`LLMEngine.step`)."""
        if not self.k:
            return
        for seq in scheduler.running:
            if seq.num_uncomputed_tokens == 1 and not seq.spec_token_ids:
                n = draft_budget(seq, self.k, self.scheduler_config.max_model_len)
                seq.spec_token_ids = [PLACEHOLDER_TOKEN] * n


def _sequence(index: int, request: SimRequest, arrival: float) -> Sequence:
    params = SamplingParams(temperature=0.0, max_tokens=request.output_tokens, ignore_eos=True)
    return Sequence(str(index), list(request.prompt_token_ids), params, arrival)


def per_position_acceptance(rate: float, k: int) -> float:
    """The chance p that the target accepts one draft, such that drafts accepted one after
    another until the first rejection average `rate` of k proposed:
    (p + p^2 + ... + p^k) / k = rate."""
    if k < 1 or rate <= 0.0:
        return 0.0
    if rate >= 1.0:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(50):  # the mean is increasing in p: bisect
        p = (low + high) / 2
        mean = sum(p ** j for j in range(1, k + 1)) / k
        low, high = (p, high) if mean < rate else (low, p)
    return (low + high) / 2


def unique_prompts(input_tokens: Seq[int], vocab_size: int = 256) -> list[tuple[int, ...]]:
    """Prompts of the given lengths that share no prefix (no accidental cache hits)."""
    prompts = []
    for i, n in enumerate(input_tokens):
        head = (i // vocab_size % vocab_size, i % vocab_size)
        prompts.append(tuple(head[: min(2, n)]) + (1,) * max(0, n - 2))
    return prompts

