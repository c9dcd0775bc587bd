"""`Scheduler`: decides which tokens of which sequences go through the model in each step.

Continuous batching with one token budget per step, as in vLLM's v1 scheduler: running sequences
are served first (one token each when decoding, a chunk when their prefill is unfinished), then
waiting sequences are admitted while the budget, `max_num_seqs` and the KV cache allow. When the
cache runs out a running sequence is preempted and later recomputed from its tokens.

The scheduler never touches a model or a clock of its own: the engine passes it the sampled
tokens and the time, so the planner's simulator can drive this same class with predicted step
times on a virtual clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.observer import StepComposition
from engine.sequence import Sequence, SequenceStatus


def _is_decoding(seq: Sequence) -> bool:
    """Past its prompt, with one token to compute (a prompt's last token is still prefill)."""
    return seq.num_uncomputed_tokens == 1 and len(seq.token_ids) > seq.num_prompt_tokens


class ScheduledSequence:
    """One sequence's share of a step: `num_new_tokens` from position `start` (attention reads
    the context up to `context_len`). With speculative decoding, `spec_token_ids` are draft
    tokens after the sequence's last one, verified in this step (the last of the new tokens).

    `samples` and `is_decode` are fixed when scheduled, since the sequence grows afterwards: the
    step computes the sequence's last token (so it yields new tokens), and it is a decode after
    earlier output. A plain slotted class: the simulator makes millions of these."""

    __slots__ = ("seq", "num_new_tokens", "start", "spec_token_ids", "context_len", "samples", "is_decode")

    def __init__(self, seq: Sequence, num_new_tokens: int, start: int,
                 spec_token_ids: list[int] | None = None) -> None:
        self.seq, self.num_new_tokens, self.start = seq, num_new_tokens, start
        self.spec_token_ids = spec_token_ids if spec_token_ids is not None else []
        drafts = len(self.spec_token_ids)
        self.context_len = start + num_new_tokens
        self.samples = self.context_len == len(seq.token_ids) + drafts
        self.is_decode = (num_new_tokens == 1 + drafts and self.samples
                          and len(seq.token_ids) > seq.num_prompt_tokens)

    def __repr__(self) -> str:
        return (f"ScheduledSequence({self.seq.request_id!r}, num_new_tokens={self.num_new_tokens}, "
                f"start={self.start}, drafts={len(self.spec_token_ids)})")

    @property
    def token_ids(self) -> list[int]:
        """The tokens this step computes: the sequence's, then drafts past its end."""
        n = self.seq.num_tokens
        if self.context_len <= n:
            return self.seq.token_ids[self.start:self.context_len]
        head = self.seq.token_ids[self.start:n] if self.start < n else []
        return head + self.spec_token_ids[max(0, self.start - n):self.context_len - n]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def composition(self) -> StepComposition:
        """The step's shape: the engine reports it, the planner's simulator prices it."""
        num_decode = decode_tokens = decode_context = prefill_tokens = context = drafts = 0
        for s in self.scheduled:  # one pass: the simulator asks this of every step
            context += s.context_len
            drafts += len(s.spec_token_ids)
            if s.is_decode:
                num_decode += 1
                decode_tokens += s.num_new_tokens
                decode_context += s.context_len
            else:
                prefill_tokens += s.num_new_tokens
        return StepComposition(
            num_seqs=len(self.scheduled), num_prefill_seqs=len(self.scheduled) - num_decode,
            num_decode_seqs=num_decode, num_prefill_tokens=prefill_tokens,
            num_decode_tokens=decode_tokens, context_tokens=context, num_draft_tokens=drafts,
            decode_context_tokens=decode_context)


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"
    # Speculative decoding: KV slots reserved past each scheduled token for the draft's proposals.
    num_lookahead_tokens: int = 0
    # SGLang's default schedule rather than vLLM's: a step prefills or decodes, never both, and
    # prefills whenever a prompt can start or go on (decodes wait meanwhile).
    prefill_first: bool = False

    @classmethod
    def for_engine(cls, config: EngineConfig, max_model_len: int) -> SchedulerConfig:
        """The scheduler an engine with `config` runs (the simulator builds the same one)."""
        return cls(max_num_seqs=config.max_num_seqs,
                   max_num_batched_tokens=config.max_num_batched_tokens,
                   max_model_len=max_model_len, enable_chunked_prefill=config.enable_chunked_prefill,
                   policy=config.scheduling_policy,
                   num_lookahead_tokens=config.num_speculative_tokens or 0)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 eos_token_ids: Iterable[int] = ()) -> None:
        if config.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {config.policy!r}")
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queues -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self._enqueue_waiting(seq, front=False)

    def abort(self, request_id: str, now: float | None = None) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, "abort", now)
                    return seq
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _rank(self, seq: Sequence) -> tuple:
        if self.config.policy == "priority":
            return (seq.priority, seq.metrics.arrival_time)
        return (seq.metrics.arrival_time,)

    def _enqueue_waiting(self, seq: Sequence, front: bool) -> None:
        if self.config.policy == "priority":
            items = sorted([*self.waiting, seq], key=self._rank)
            self.waiting = deque(items)
        elif front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    # -- one step -----------------------------------------------------------------------------

    def schedule(self, now: float = 0.0) -> SchedulerOutput:
        if self.config.policy == "priority":
            self.running.sort(key=self._rank)
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.config.prefill_first:
            self._schedule_prefills(out, now)
            if out.is_empty:  # no prompt can run: a decode step (decodes may preempt for room)
                self._schedule_running(out, budget, now, decodes_only=True)
            if not out.is_empty:
                return out
            # Nothing can run at all: the general rule below preempts for the stuck prompt.
        budget = self._schedule_running(out, budget, now)
        if not out.preempted:
            self._admit_waiting(out, budget, now)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, now: float,
                          decodes_only: bool = False) -> int:
        """Running sequences in order, each a decode token (with drafts) or its next prefill
        chunk, preempting from the back when the KV cache is full. Returns the budget left."""
        scheduled_ids: set[int] = set()
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            if decodes_only and not _is_decoding(seq):
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            spec = self._drafts_to_verify(seq, budget) if n == 1 and seq.spec_token_ids else None
            n += len(spec) if spec else 0
            slots = n + self._lookahead(seq, n)
            needed = self.block_manager.blocks_needed(seq, slots)
            while needed > self.block_manager.num_free_blocks:
                victim = next(s for s in reversed(self.running) if id(s) not in scheduled_ids)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self._schedule_seq(out, seq, n, slots if needed else 0, now, spec)
            scheduled_ids.add(id(seq))
            budget -= n
        return budget

    def _schedule_prefills(self, out: SchedulerOutput, now: float) -> None:
        """A prefill-only step: prompts already started go on, then waiting ones start, within
        the budget and the free KV blocks (nothing is preempted for a prefill). Left empty when
        no prompt can run."""
        budget = self.config.max_num_batched_tokens
        for seq in self.running:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or _is_decoding(seq):
                continue  # a decode waits for a decode step
            n = min(seq.num_uncomputed_tokens, budget)
            slots = n + self._lookahead(seq, n)
            if not self.block_manager.can_allocate(seq, slots):
                break
            self._schedule_seq(out, seq, n, slots, now)
            budget -= n
        self._admit_waiting(out, budget, now)

    def _admit_waiting(self, out: SchedulerOutput, budget: int, now: float) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.block_manager.match_prefix(seq)
            remaining = seq.num_uncomputed_tokens
            if not self.config.enable_chunked_prefill and remaining > budget:
                self._undo_prefix_match(seq)
                break
            n = min(remaining, budget)
            slots = n + self._lookahead(seq, n)
            if not self.block_manager.can_allocate(seq, slots):
                self._undo_prefix_match(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._schedule_seq(out, seq, n, slots, now)
            budget -= n

    def _schedule_seq(self, out: SchedulerOutput, seq: Sequence, n: int, slots: int, now: float,
                      spec: list[int] | None = None) -> None:
        """`n` new tokens of `seq` in this step, with KV room made for `slots` (n plus lookahead;
        0 where its blocks already hold them, as a decode's mostly do)."""
        if slots:
            self.block_manager.allocate(seq, slots)
        if seq.metrics.first_scheduled_time is None:
            seq.metrics.first_scheduled_time = now
        out.scheduled.append(ScheduledSequence(seq, n, seq.num_computed_tokens, spec))

    def _drafts_to_verify(self, seq: Sequence, budget: int) -> list[int]:
        """The draft tokens a decode can verify this step: within the token budget, the
        context limit and the tokens the request still wants (past those they are wasted)."""
        if not seq.spec_token_ids:
            return []
        room = min(budget - 1, self.config.max_model_len - seq.num_tokens)
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
        return seq.spec_token_ids[:max(0, room)]

    def _lookahead(self, seq: Sequence, n: int) -> int:
        if not self.config.num_lookahead_tokens:
            return 0
        return max(0, min(self.config.num_lookahead_tokens,
                          self.config.max_model_len - seq.num_computed_tokens - n))

    def _undo_prefix_match(self, seq: Sequence) -> None:
        # A waiting sequence must not pin cached blocks while it cannot run.
        if seq.block_table:
            self.block_manager.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.spec_token_ids, seq.draft_probs, seq.num_draft_computed = [], None, 0
        seq.status = SequenceStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue_waiting(seq, front=True)

    # -- after the step -----------------------------------------------------------------------

    def update(self, out: SchedulerOutput, sampled: list[int | list[int] | None],
               now: float) -> list[Sequence]:
        """Advance each scheduled sequence by its computed tokens and append its sampled tokens.

        `sampled[i]` belongs to `out.scheduled[i]`: None where the step ended mid-prefill, else a
        token, or with speculative decoding the accepted drafts followed by one more token.
        Returns the sequences that finished in this step.
        """
        finished = []
        for item, result in zip(out.scheduled, sampled):
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            tokens = (result,) if isinstance(result, int) else result
            drafts = len(item.spec_token_ids)
            if drafts:
                # Rejected drafts' keys and values stay in the cache as garbage past the
                # computed tokens; the next step writes over them.
                accepted = len(tokens) - 1 if tokens else 0
                seq.num_computed_tokens = item.context_len - drafts + accepted
                seq.metrics.num_draft_tokens += drafts
                seq.metrics.num_accepted_tokens += accepted
            else:
                seq.num_computed_tokens = item.context_len
            if seq.spec_token_ids or seq.draft_probs is not None:
                seq.spec_token_ids, seq.draft_probs = [], None
            if seq.num_draft_computed > seq.num_computed_tokens:
                seq.num_draft_computed = seq.num_computed_tokens
            self.block_manager.register_full_blocks(seq)
            if not item.samples:
                continue
            assert tokens, f"no token sampled for {seq.request_id}"
            for token in tokens:
                seq.token_ids.append(token)
                if seq.metrics.first_token_time is None:
                    seq.metrics.first_token_time = now
                seq.metrics.token_times.append(now)
                reason = self._stop_reason(seq, token)
                if reason is not None:
                    self.running.remove(seq)
                    self._finish(seq, reason, now)
                    finished.append(seq)
                    break
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        num_tokens = len(seq.token_ids)
        if params.max_tokens is not None and num_tokens - seq.num_prompt_tokens >= params.max_tokens:
            return "length"
        if num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, now: float | None = None) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if now is not None:
            seq.metrics.finished_time = now
