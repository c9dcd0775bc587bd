"""`LLMEngine`: the request loop. `add_request`, then `step` until nothing is left.

The server drives this loop directly; `LLM` wraps it for offline use.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Container, Iterator

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner
from engine.observer import StepObserver, StepStats
from engine.parallel.distributed import TensorParallel
from engine.parallel.tensor_parallel import TensorParallelWorkers, rank_config
from engine.rules import check_shardable
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence, Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import RequestOutput, Sequence
from engine.tokenizer import IncrementalDetokenizer, load_tokenizer

logger = logging.getLogger(__name__)


class InvalidRequestError(ValueError):
    """A request the engine refuses; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validate_request(prompt: str | list[int], params: SamplingParams, priority: int, tokenizer: Any,
                     vocab_size: int, max_model_len: int) -> list[int]:
    """The prompt's token ids, or an `InvalidRequestError` naming what is wrong. One function for
    every front that takes requests, so a data-parallel front refuses exactly what a replica would."""
    token_ids = validate_prompt(prompt, tokenizer, vocab_size, max_model_len)
    try:
        params.validate()
    except (TypeError, ValueError) as err:
        field = str(err).split(" ", 1)[0]
        raise InvalidRequestError(field, str(err)) from err
    if not isinstance(priority, int):
        raise InvalidRequestError("priority", f"must be an integer, got {priority!r}")
    return token_ids


def admit_request(request_id: str | None, new_ids: Iterator[str], taken: Container[str],
                  prompt: str | list[int], params: SamplingParams | None, priority: int, tokenizer: Any,
                  vocab_size: int, max_model_len: int) -> tuple[str, SamplingParams, list[int]]:
    """A new request's id (the caller's, or the next of `new_ids` not `taken`), its parameters
    and its prompt's token ids; `InvalidRequestError` for an id in use or a bad request."""
    if request_id is None:
        request_id = next(new_ids)
        while request_id in taken:  # never collide with a caller-chosen id
            request_id = next(new_ids)
    request_id = str(request_id)
    if request_id in taken:
        raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
    params = params if params is not None else SamplingParams()
    token_ids = validate_request(prompt, params, priority, tokenizer, vocab_size, max_model_len)
    return request_id, params, token_ids


def validate_prompt(prompt: str | list[int], tokenizer: Any, vocab_size: int, max_model_len: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        token_ids = tokenizer.encode(prompt)
        field = "prompt"
    else:
        token_ids = list(prompt)
        field = "prompt_token_ids"
        if not token_ids:
            raise InvalidRequestError(field, "must not be empty")
        for i, t in enumerate(token_ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise InvalidRequestError(
                    f"{field}[{i}]", f"token id {t!r} is outside the vocabulary (0..{vocab_size - 1})")
    if len(token_ids) > max_model_len:
        raise InvalidRequestError(field, f"has {len(token_ids)} tokens, more than max_model_len={max_model_len}")
    return token_ids


@dataclass
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        if config.data_parallel_size > 1:
            raise ValueError(f"data_parallel_size={config.data_parallel_size} in one LLMEngine: an "
                             "LLMEngine is one replica; LLM and DataParallelEngine run several")
        for knob, value in (("quantization", config.quantization), ("kv_cache_dtype", config.kv_cache_dtype)):
            if value == "fp8":  # fp8 GEMMs and caches need Hopper-class GPUs and their kernels
                raise ValueError(f"{knob}='fp8' is for plans served by vLLM or SGLang on a GPU with "
                                 "fp8; pilot's engine does not run it (export the plan's command)")
        self.config = config
        self.model_config = ModelConfig.for_engine(config.model)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model, self.model_config.bos_token_id)
        model_max = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's "
                f"max_position_embeddings={model_max}")
        self.runner = self._start_runner(config, config.max_model_len or model_max)
        self.max_model_len = self._resolve_max_model_len(model_max)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={config.max_num_batched_tokens} is smaller than "
                f"max_model_len={self.max_model_len}; with enable_chunked_prefill=false a whole "
                "prompt must fit in one step")
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig.for_engine(config, self.max_model_len),
            self.block_manager,
            eos_token_ids=self.model_config.eos_token_ids,
        )
        self.requests: dict[str, _Request] = {}
        self.observers: list[StepObserver] = []
        self.step_count = 0
        self._ids = itertools.count()
        self._new_ids = (str(i) for i in self._ids)  # request ids, from the counter scores use too

    def _start_runner(self, config: EngineConfig, max_positions: int) -> ModelRunner:
        """This process's runner; with tensor parallelism rank 0's, once the other ranks
        (started here, or by torchrun) hold their shards."""
        self.tp_workers: TensorParallelWorkers | None = None
        if config.tensor_parallel_size == 1:
            return ModelRunner(config, self.model_config, max_positions)
        cfg = self.model_config
        check_shardable(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
                        config.tensor_parallel_size)  # before any process starts
        self.tp_workers = TensorParallelWorkers(config)
        try:
            runner = ModelRunner(rank_config(config), self.model_config, max_positions,
                                 tp=TensorParallel(0, config.tensor_parallel_size))
            self.tp_workers.connect(runner)
        except BaseException:
            self.tp_workers.close()
            raise
        return runner

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any (one process holds nothing else to release)."""
        if self.tp_workers is not None:
            self.tp_workers.close()
            self.tp_workers = None

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _resolve_max_model_len(self, model_max: int) -> int:
        capacity = self.runner.num_kv_blocks * self.config.block_size
        if self.config.max_model_len is not None:
            if capacity < self.config.max_model_len:
                raise ValueError(
                    f"the KV cache holds {capacity} tokens ({self.runner.num_kv_blocks} blocks), fewer "
                    f"than max_model_len={self.config.max_model_len}; raise kv_cache_memory_bytes or "
                    "lower max_model_len")
            return self.config.max_model_len
        if capacity < model_max:
            logger.info("max_model_len set to %d, what the KV cache holds", capacity)
        return min(model_max, capacity)

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams | None = None, arrival_time: float | None = None,
                    priority: int = 0) -> str:
        request_id, params, token_ids = admit_request(
            request_id, self._new_ids, self.requests, prompt, params, priority, self.tokenizer,
            self.model_config.vocab_size, self.max_model_len)
        seq = Sequence(request_id, token_ids, params,
                       arrival_time if arrival_time is not None else time.perf_counter(),
                       priority=priority, prompt=prompt if isinstance(prompt, str) else None)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        self.requests[request_id] = _Request(seq, IncrementalDetokenizer(self.tokenizer))
        self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self._abort(request_id)
        return None if request is None else self._output(request)

    def abort_sequence(self, request_id: str) -> Sequence | None:
        """Abort, and return the request's sequence (finished as "abort") rather than an output:
        for an engine core whose front does the detokenizing."""
        request = self._abort(request_id)
        return None if request is None else request.seq

    def _abort(self, request_id: str) -> _Request | None:
        seq = self.scheduler.abort(request_id, now=time.perf_counter())
        request = self.requests.pop(request_id, None)
        return None if seq is None else request

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def add_step_observer(self, observer: StepObserver) -> None:
        self.observers.append(observer)

    def reset_prefix_cache(self) -> int:
        """Drop cached prefixes not in use (see `BlockManager.reset_prefix_cache`)."""
        return self.block_manager.reset_prefix_cache()

    # -- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; return an output for every request that got a token or finished."""
        return [self._output(request) for request in self._advance()]

    def step_sequences(self) -> list[Sequence]:
        """Run one step; return the sequences that got a token or finished, undetokenized: an
        engine core sends their new tokens to a front that detokenizes."""
        return [request.seq for request in self._advance()]

    def _advance(self) -> list[_Request]:
        start = time.perf_counter()
        out = self.scheduler.schedule(now=start)
        if out.is_empty:
            return []
        forward_start = time.perf_counter()
        sampled = self.runner.execute(out)
        now = time.perf_counter()
        forward_s = now - forward_start
        finished = self.scheduler.update(out, sampled, now)
        if self.runner.proposer is not None:
            self.runner.propose([s for s in self.scheduler.running
                                 if s.num_uncomputed_tokens == 1 and not s.spec_token_ids])
        advanced = []
        for item, token in zip(out.scheduled, sampled):
            if token is None:
                continue
            request = self.requests.get(item.seq.request_id)
            if request is None:
                continue
            advanced.append(request)
            if item.seq.is_finished:
                del self.requests[item.seq.request_id]
        self.step_count += 1
        if self.observers:
            self._notify(out, sampled, start, forward_s, len(finished))
        return advanced

    def _output(self, request: _Request) -> RequestOutput:
        seq = request.seq
        request.detokenizer.update(seq.output_token_ids)
        if seq.is_finished:
            # Flush a trailing partial character as U+FFFD rather than dropping it.
            request.detokenizer.text = self.tokenizer.decode(seq.output_token_ids)
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt,
            prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
            token_ids=seq.output_token_ids, text=request.detokenizer.text,
            finished=seq.is_finished, finish_reason=seq.finish_reason, metrics=seq.metrics)

    def _notify(self, out: SchedulerOutput, sampled: list[list[int] | None], start: float,
                forward_s: float, num_finished: int) -> None:
        composition = asdict(out.composition())
        # The step log keeps the totals its store has columns for; the decode share of the
        # context is for the planner's GPU pricing, which reads compositions, not logs.
        composition.pop("decode_context_tokens")
        stats = StepStats(
            step=self.step_count - 1, start_time=start, duration_s=time.perf_counter() - start,
            forward_s=forward_s, **composition, num_preempted=len(out.preempted),
            num_finished=num_finished, num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running), kv_blocks_used=self.block_manager.num_used_blocks,
            kv_blocks_total=self.block_manager.num_blocks,
            kv_blocks_touched=self.block_manager.num_touched_blocks,
            num_accepted_tokens=sum(len(t) - 1 for s, t in zip(out.scheduled, sampled)
                                    if t is not None and s.spec_token_ids))
        for observer in self.observers:
            observer(stats)

    # -- scoring ------------------------------------------------------------------------------

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one prompt, [len, vocab] float32.

        Uses free KV blocks and returns them; it may evict cached prefixes, never running requests.
        """
        token_ids = validate_prompt(list(token_ids), self.tokenizer, self.model_config.vocab_size,
                                    self.max_model_len)
        seq = Sequence(f"score-{next(self._ids)}", token_ids, SamplingParams(max_tokens=1), 0.0)
        if not self.block_manager.can_allocate(seq, len(token_ids)):
            raise RuntimeError(
                f"not enough free KV blocks to score {len(token_ids)} tokens while other requests run")
        self.block_manager.allocate(seq, len(token_ids))
        try:
            return self.runner.logits_all(ScheduledSequence(seq, len(token_ids), 0))
        finally:
            self.block_manager.free(seq)
