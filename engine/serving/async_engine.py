"""`AsyncLLMEngine`: the engine's step loop on a thread of its own, fed by asyncio callers.

The HTTP server handles many connections on one event loop, while the engine must step without
pause. So one thread owns the engine (an `LLMEngine`, or a `DataParallelEngine` front) and is the
only code that touches it: callers put commands on a queue and await the outputs, which the thread
hands back to the event loop. A step's model forward releases the GIL, so the event loop keeps
accepting and streaming while the engine computes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.observer import StepStats
from engine.parallel.data_parallel import DataParallelEngine
from engine.sampling_params import SamplingParams
from engine.sequence import RequestOutput

logger = logging.getLogger(__name__)

# How long the idle loop waits for a command before checking whether it should stop.
IDLE_POLL_S = 0.1
# Completions counted for the Retry-After estimate: those of the last this many seconds.
RATE_WINDOW_S = 30.0


class EngineOverloadedError(RuntimeError):
    """Too many requests in flight; the caller should retry after `retry_after_s`."""

    def __init__(self, in_flight: int, limit: int, retry_after_s: int) -> None:
        super().__init__(f"the server has {in_flight} requests in flight, its limit is {limit}; "
                         f"retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineDeadError(RuntimeError):
    """The step loop has stopped (shut down, or crashed); no request can be served."""


class RequestStream:
    """One request's outputs on their way from the engine thread to the awaiting caller.
    `close()` (idempotent) gives the request up: the engine aborts it unless it finished. The
    reason says why to the abort listeners: "abort" (the client went away) or "stop" (the server
    cut it at a stop string, which the engine does not see)."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str) -> None:
        self.engine, self.request_id = engine, request_id
        self.loop = asyncio.get_running_loop()
        self.outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False
        self.closed = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the engine thread."""
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self.closed:
            raise StopAsyncIteration
        item = await self.outputs.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self.finished = True
            self.close()
        return item

    def close(self, reason: str = "abort") -> None:
        if not self.closed:
            self.closed = True
            self.engine._release(self.request_id, self.finished, reason)


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    arrival_time: float
    stream: RequestStream
    accepted: Future


@dataclass
class _Abort:
    request_id: str
    reason: str = "abort"


@dataclass
class _Call:
    function: Callable[[LLMEngine | DataParallelEngine], Any]
    done: Future


class AsyncLLMEngine:
    """`add_request()` admits a request and returns the stream of its outputs; closing the stream
    early (a client that went away) aborts the request and frees its KV blocks before the next
    step. `generate()` is the same as one async generator.

    `max_in_flight` bounds the requests admitted (running plus waiting); past it `generate`
    raises `EngineOverloadedError` rather than queueing without end.
    """

    def __init__(self, engine: LLMEngine | DataParallelEngine, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.engine = engine
        self.config: EngineConfig = engine.config
        self.max_in_flight = max_in_flight
        self.max_model_len: int = engine.max_model_len
        self.observers: list[Callable[[StepStats], None]] = []
        self.output_listeners: list[Callable[[RequestOutput], None]] = []
        self.abort_listeners: list[Callable[[str, str], None]] = []  # (request id, reason)
        self.error: BaseException | None = None
        self._commands: queue.Queue[_Add | _Abort | _Call | None] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}  # touched by the engine thread only
        self._in_flight = 0  # admitted and not yet finished; touched by the event loop only
        self._finished_times: deque[float] = deque()
        self._promised_until = 0.0  # the last time a refused request was told to come back at
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._last_stats: dict[int, StepStats] = {}
        engine.add_step_observer(self._on_step)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, max_waiting: int) -> AsyncLLMEngine:
        engine = DataParallelEngine(config) if config.data_parallel_size > 1 else LLMEngine(config)
        return cls(engine, config.max_num_seqs * config.data_parallel_size + max_waiting)

    # -- callers (the event loop) ---------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping.is_set()

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def promise_retry_s(self) -> int:
        """When a refused request should come back: each refusal is promised the next slot not
        yet promised to another, one completion interval (from the recent completion rate, else
        1 s) after the last, so clients that wait as told do not all return at once to be refused
        again. At least 1 s, at most 60."""
        now = time.monotonic()
        self._forget_old_finishes(now)
        interval = RATE_WINDOW_S / len(self._finished_times) if self._finished_times else 1.0
        self._promised_until = min(max(self._promised_until, now) + interval, now + 60)
        return int(min(60, max(1, math.ceil(self._promised_until - now))))

    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          priority: int = 0, request_id: str | None = None,
                          arrival_time: float | None = None) -> RequestStream:
        """Admit one request; its outputs come through the returned stream. Raises
        `InvalidRequestError` (bad prompt or parameters), `EngineOverloadedError` or
        `EngineDeadError`, so a server can answer with an error before sending anything."""
        if not self.is_running:
            raise EngineDeadError(self.dead_reason())
        if self._in_flight >= self.max_in_flight:
            raise EngineOverloadedError(self._in_flight, self.max_in_flight, self.promise_retry_s())
        request_id = request_id or f"req-{next(self._ids)}"
        stream = RequestStream(self, request_id)
        accepted: Future = Future()
        self._in_flight += 1
        self._commands.put(_Add(request_id, prompt, params, priority,
                                arrival_time if arrival_time is not None else time.perf_counter(),
                                stream, accepted))
        try:
            await asyncio.wrap_future(accepted)
        except BaseException:
            stream.close()
            raise
        return stream

    async def call(self, function: Callable[[LLMEngine | DataParallelEngine], Any]) -> Any:
        """Run `function(engine)` on the engine thread, between steps, and return its result."""
        if not self.is_running:
            raise EngineDeadError(self.dead_reason())
        done: Future = Future()
        self._commands.put(_Call(function, done))
        return await asyncio.wrap_future(done)

    async def generate(self, prompt: str | list[int], params: SamplingParams, priority: int = 0,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request, the last with `finished` set; leaving early aborts it."""
        stream = await self.add_request(prompt, params, priority, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def _release(self, request_id: str, finished: bool, reason: str = "abort") -> None:
        """A stream is done with: count it out and, unless it finished, abort it."""
        self._in_flight -= 1
        now = time.monotonic()
        self._finished_times.append(now)
        self._forget_old_finishes(now)  # a long-running server keeps only the window
        if not finished:
            self._commands.put(_Abort(request_id, reason))

    def stats(self) -> dict[str, float]:
        """Requests running and waiting, and the shares of KV blocks in use and ever written
        (resident in memory): read live from one
        engine, or from each data-parallel replica's latest step."""
        scheduler = getattr(self.engine, "scheduler", None)
        if scheduler is not None:
            manager = self.engine.block_manager
            return {"num_running": len(scheduler.running), "num_waiting": len(scheduler.waiting),
                    "kv_cache_usage": manager.num_used_blocks / manager.num_blocks,
                    "kv_cache_touched": manager.num_touched_blocks / manager.num_blocks}
        latest = list(self._last_stats.values())
        total = sum(s.kv_blocks_total for s in latest)
        return {"num_running": sum(s.num_running for s in latest),
                "num_waiting": sum(s.num_waiting for s in latest),
                "kv_cache_usage": sum(s.kv_blocks_used for s in latest) / total if total else 0.0,
                "kv_cache_touched": sum(s.kv_blocks_touched for s in latest) / total if total else 0.0}

    def kv_blocks_used(self) -> int | None:
        """Blocks held right now by one engine (None behind a data-parallel front)."""
        manager = getattr(self.engine, "block_manager", None)
        return None if manager is None else manager.num_used_blocks

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop, fail whatever is in flight, and release the engine's processes."""
        self._stopping.set()
        self._commands.put(None)
        self._thread.join(timeout)
        self.engine.close()

    def _forget_old_finishes(self, now: float) -> None:
        while self._finished_times and self._finished_times[0] < now - RATE_WINDOW_S:
            self._finished_times.popleft()

    def dead_reason(self) -> str:
        if self.error is not None:
            return f"the engine stopped after an error: {type(self.error).__name__}: {self.error}"
        return "the engine is shutting down"

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._take_commands(block=not self.engine.has_unfinished_requests())
                if self._stopping.is_set() or not self.engine.has_unfinished_requests():
                    continue
                for output in self.engine.step():
                    self._deliver(output)
        except BaseException as err:  # noqa: BLE001 - every waiter must hear of it
            logger.exception("engine loop failed")
            self.error = err
        finally:
            dead = EngineDeadError(self.dead_reason())
            for stream in self._streams.values():
                stream.put(dead)
            self._streams.clear()
            self._fail_queued(dead)

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Call):
                try:
                    command.done.set_result(command.function(self.engine))
                except Exception as err:  # the caller's to handle
                    command.done.set_exception(err)
            else:
                self._abort(command.request_id, command.reason)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params,
                                    arrival_time=command.arrival_time, priority=command.priority)
        except Exception as err:  # the caller's bad input, raised in the caller
            command.accepted.set_exception(err)
            return
        self._streams[command.request_id] = command.stream
        command.accepted.set_result(None)

    def _abort(self, request_id: str, reason: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)
            for listener in self.abort_listeners:
                listener(request_id, reason)

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return  # aborted while the step ran
        if output.finished:
            del self._streams[output.request_id]
        for listener in self.output_listeners:
            listener(output)
        stream.put(output)

    def _on_step(self, stats: StepStats) -> None:
        self._last_stats[stats.replica] = stats
        for observer in self.observers:
            observer(stats)

    def _fail_queued(self, error: EngineDeadError) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add) and not command.accepted.done():
                command.accepted.set_exception(error)
            elif isinstance(command, _Call) and not command.done.done():
                command.done.set_exception(error)
