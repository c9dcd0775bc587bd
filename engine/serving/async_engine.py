"""`AsyncLLMEngine`: the server's view of the engine cores, read on the server's event loop.

The engines run in processes of their own (`engine.core`); this process does HTTP, tokenization
and detokenization. Requests go to a core as soon as they are admitted; each core sends one
message per step, which the event loop reads the moment the core's connection is readable
(`loop.add_reader`), so no thread stands between a step and the streams it feeds and no step
waits on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from typing import AsyncIterator, Callable

from engine.config import EngineConfig
from engine.core.client import EngineCoreClient, EngineCoreDiedError
from engine.observer import StepStats
from engine.sampling_params import SamplingParams
from engine.sequence import RequestOutput

logger = logging.getLogger(__name__)

# Completions counted for the Retry-After estimate: those of the last this many seconds.
RATE_WINDOW_S = 30.0


class EngineOverloadedError(RuntimeError):
    """Too many requests in flight; the caller should retry after `retry_after_s`."""

    def __init__(self, in_flight: int, limit: int, retry_after_s: int) -> None:
        super().__init__(f"the server has {in_flight} requests in flight, its limit is {limit}; "
                         f"retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineDeadError(RuntimeError):
    """The engine has stopped (shut down, or a core died); no request can be served."""


class RequestStream:
    """One request's outputs, as the event loop reads them from its core. `close()`
    (idempotent) gives the request up: the core aborts it unless it finished. The reason says
    why to the abort listeners: "abort" (the client went away) or "stop" (the server cut it at a
    stop string, which the engine does not see)."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str) -> None:
        self.engine, self.request_id = engine, request_id
        self.outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False  # the final output was read
        self.ended = False  # the core sent the final output, read or not
        self.closed = False

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput) and item.finished:
            self.ended = True
        self.outputs.put_nowait(item)

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
            # a request the core already finished was counted by its final output, even when
            # its client hung up before reading it: no abort to send, none to count
            self.engine._release(self.request_id, self.ended, reason)


class AsyncLLMEngine:
    """`add_request()` admits a request and returns the stream of its outputs; closing the stream
    early (a client that went away) aborts the request and frees its KV blocks before the core's
    next step. `generate()` is the same as one async generator.

    `max_in_flight` bounds the requests admitted (running plus waiting); past it `add_request`
    raises `EngineOverloadedError` rather than queueing without end. Everything but `shutdown`
    runs on one event loop, the one `start()` attaches to (the first request's, by default).
    """

    def __init__(self, engine: EngineCoreClient, max_in_flight: int) -> None:
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
        self._streams: dict[str, RequestStream] = {}
        self._finished_times: deque[float] = deque()
        self._promised_until = 0.0  # the last time a refused request was told to come back at
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        engine.add_step_observer(self._on_step)

    @classmethod
    def from_config(cls, config: EngineConfig, max_waiting: int) -> AsyncLLMEngine:
        return cls(EngineCoreClient(config), config.max_num_seqs * config.data_parallel_size + max_waiting)

    def start(self) -> None:
        """Watch the cores from the running event loop (idempotent)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for index, conn in enumerate(self.engine.connections):
            self._loop.add_reader(conn.fileno(), self._on_readable, index)

    def stop(self) -> None:
        """Stop watching the cores and fail what is in flight (on the loop, before `shutdown`)."""
        self._stopping = True
        self._detach()
        self._fail_streams(EngineDeadError(self.dead_reason()))

    def shutdown(self) -> None:
        """Stop the cores (any thread; after `stop` if a loop was watching them)."""
        self._stopping = True
        self.engine.close()

    # -- callers ----------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self.error is None and not self._stopping and self.engine.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

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
        self.start()
        if not self.is_running:
            raise EngineDeadError(self.dead_reason())
        if len(self._streams) >= self.max_in_flight:
            raise EngineOverloadedError(len(self._streams), self.max_in_flight, self.promise_retry_s())
        request_id = request_id or f"req-{next(self._ids)}"
        self.engine.add_request(request_id, prompt, params, arrival_time, priority)
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        return stream

    async def generate(self, prompt: str | list[int], params: SamplingParams, priority: int = 0,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request, the last with `finished` set; leaving early aborts it."""
        stream = await self.add_request(prompt, params, priority, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    async def reset_prefix_cache(self) -> int:
        """Every replica's cached prefixes not in use dropped; the blocks forgotten in all."""
        self.start()
        if not self.is_running:
            raise EngineDeadError(self.dead_reason())
        done = [asyncio.wrap_future(f) for f in self.engine.reset_prefix_cache_calls()]
        return sum(await asyncio.gather(*done))

    def _release(self, request_id: str, finished: bool, reason: str = "abort") -> None:
        """A stream is done with: count it out and, unless it finished, abort it."""
        now = time.monotonic()
        self._finished_times.append(now)
        self._forget_old_finishes(now)  # a long-running server keeps only the window
        if self._streams.pop(request_id, None) is None or finished:
            return
        if self.is_running:
            self.engine.abort_request(request_id)
        for listener in self.abort_listeners:
            listener(request_id, reason)

    def stats(self) -> dict[str, float]:
        """Requests running and waiting, and the shares of KV blocks in use and ever written
        (resident in memory), over all replicas as of each one's latest message."""
        loads = self.engine.load()
        total = sum(load.kv_blocks_total for load in loads)
        return {"num_running": sum(load.num_running for load in loads),
                "num_waiting": sum(load.num_waiting for load in loads),
                "kv_cache_usage": sum(load.kv_blocks_used for load in loads) / total if total else 0.0,
                "kv_cache_touched": sum(load.kv_blocks_touched for load in loads) / total if total else 0.0}

    def kv_blocks_used(self) -> int:
        """Blocks the replicas hold, as of each one's latest message."""
        return sum(load.kv_blocks_used for load in self.engine.load())

    def _forget_old_finishes(self, now: float) -> None:
        while self._finished_times and self._finished_times[0] < now - RATE_WINDOW_S:
            self._finished_times.popleft()

    def dead_reason(self) -> str:
        if self.error is not None:
            return f"the engine stopped after an error: {self.error}"
        if not self._stopping and not self.engine.is_alive():
            return "an engine core process exited"
        return "the engine is shutting down"

    # -- the event loop's reading of the cores ------------------------------------------------

    def _on_readable(self, index: int) -> None:
        try:
            outputs = self.engine.receive(index)
        except EngineCoreDiedError as err:
            logger.error("%s", err)
            self.error = err
            self._detach()
            self._fail_streams(EngineDeadError(self.dead_reason()))
            return
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # given up already: its abort was counted when it was released
            for listener in self.output_listeners:
                listener(output)
            stream.put(output)

    def _on_step(self, stats: StepStats) -> None:
        for observer in self.observers:
            observer(stats)

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            for conn in self.engine.connections:
                self._loop.remove_reader(conn.fileno())

    def _fail_streams(self, error: EngineDeadError) -> None:
        for stream in self._streams.values():
            stream.put(error)
