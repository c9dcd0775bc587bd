"""What each engine step reports to observers: the profiler's raw material."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StepComposition:
    """What went through the model in one step: all a model of step time may depend on."""

    num_seqs: int
    num_prefill_seqs: int
    num_decode_seqs: int
    num_prefill_tokens: int
    num_decode_tokens: int  # with speculative decoding, the drafts verified too
    context_tokens: int  # keys/values attention read, summed over sequences
    num_draft_tokens: int = 0
    # Of context_tokens, those of decoding sequences: a GPU prices decode and prefill attention
    # with different kernels.
    decode_context_tokens: int = 0


@dataclass(frozen=True)
class StepStats:
    step: int
    start_time: float  # time.perf_counter() at the start of the step
    duration_s: float  # schedule + forward + sampling + bookkeeping
    forward_s: float  # model forward and sampling alone
    num_seqs: int
    num_prefill_seqs: int
    num_decode_seqs: int
    num_prefill_tokens: int
    num_decode_tokens: int
    context_tokens: int  # keys/values attention read, summed over sequences
    num_preempted: int
    num_finished: int
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    # Speculative decoding: drafts verified in this step and how many the target accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    replica: int = 0  # which data-parallel replica ran the step
    kv_blocks_touched: int = 0  # blocks ever written: the resident part of the (untouched) cache

    @property
    def num_batched_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


StepObserver = Callable[[StepStats], None]
