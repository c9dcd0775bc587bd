"""`EngineCoreClient`: the front of one engine core per data-parallel replica.

It has the `LLMEngine` interface that `LLM` and the server use (`add_request`, `step`,
`abort_request`, `score`, step observers), but the engines run in their own processes
(`engine_core`). The front validates and tokenizes each request itself, sends it to the replica
with the fewest outstanding ones without waiting for a reply (a busy core reads it between
steps), and turns the cores' per-step token messages into `RequestOutput`s with their text.

Two ways to read the cores: `step()` waits on them (offline use), or an event loop watches
`connections` and calls `receive(index)` when one is readable (the server).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Listener, wait
from typing import Any

import torch

from engine.config import EngineConfig
from engine.core.engine_core import AUTHKEY_ENV, CoreLoad, CoreOutputs
from engine.device import available_host_memory, usable_cpus
from engine.llm_engine import admit_request
from engine.model_config import ModelConfig
from engine.observer import StepObserver
from engine.sampling_params import SamplingParams
from engine.sequence import RequestMetrics, RequestOutput
from engine.tokenizer import IncrementalDetokenizer, load_tokenizer

logger = logging.getLogger(__name__)

# How long one `step()` waits for the cores before returning nothing.
POLL_S = 0.05
# How long a core may take to load its model and say it is ready.
STARTUP_TIMEOUT_S = 600.0


class EngineCoreDiedError(RuntimeError):
    """An engine core process exited or failed; no request on it can finish."""


def replica_configs(config: EngineConfig, host_memory: int | None = None) -> list[EngineConfig]:
    """Each replica's own config: one replica's share of threads and default KV memory (a
    quarter of `host_memory`, default this host's available memory; the planner passes
    another machine's)."""
    n = config.data_parallel_size
    threads = config.num_threads or usable_cpus()
    update: dict[str, Any] = {"data_parallel_size": 1, "num_threads": max(1, threads // n)}
    if config.num_kv_blocks is None and config.kv_cache_memory_bytes is None:
        memory = available_host_memory() if host_memory is None else host_memory
        update["kv_cache_memory_bytes"] = max(1, memory // 4 // n)
    return [config.model_copy(update={**update, "seed": config.seed + i}) for i in range(n)]


@dataclass
class _Core:
    process: subprocess.Popen
    conn: Connection  # commands out, outputs back
    outstanding: set[str] = field(default_factory=set)
    load: CoreLoad = CoreLoad(0, 0, 0, 0, 0)
    replies: deque[tuple[str, Future]] = field(default_factory=deque)  # answered in order


@dataclass
class _Tracked:
    """What the front keeps of a request the cores are running."""

    core: int
    prompt: str | None
    prompt_token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)


class EngineCoreClient:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = ModelConfig.for_engine(config.model)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model, self.model_config.bos_token_id)
        self.requests: dict[str, _Tracked] = {}
        self.observers: list[StepObserver] = []
        self._new_ids = (f"core-{i}" for i in itertools.count())
        self._cores: list[_Core] = []
        self._undelivered: list[RequestOutput] = []  # read while a sync call waited for its reply
        authkey = secrets.token_bytes(16)
        with Listener(family="AF_UNIX", authkey=authkey) as listener:
            env = {**os.environ, AUTHKEY_ENV: authkey.hex()}
            configs = replica_configs(config)
            # All started before any is waited for: each spends a second or more importing torch.
            processes = [subprocess.Popen([sys.executable, "-m", "engine.core", str(listener.address), str(i)],
                                          env=env) for i in range(len(configs))]
            conns: dict[int, Connection] = {}
            for _ in processes:
                conn = listener.accept()
                conns[conn.recv()] = conn  # each says which it is: they connect in any order
            for i, core_config in enumerate(configs):
                conns[i].send(core_config)
                self._cores.append(_Core(processes[i], conns[i]))
        limits = []
        for i, core in enumerate(self._cores):
            kind, detail = self._first_message(core)
            if kind != "ready":
                self.close()
                raise RuntimeError(f"engine core {i} failed to start: {detail}")
            limits.append(detail)
        # What every replica's KV cache holds, so the front refuses what a replica would.
        self.max_model_len: int = min(limits)

    @staticmethod
    def _first_message(core: _Core) -> tuple[str, Any]:
        if not core.conn.poll(STARTUP_TIMEOUT_S):
            return "failed", f"no answer in {STARTUP_TIMEOUT_S:.0f} s"
        try:
            return core.conn.recv()
        except EOFError:
            return "failed", f"the process exited with code {core.process.wait()}"

    @property
    def connections(self) -> list[Connection]:
        """One per core, in replica order: readable when `receive(index)` has something to read."""
        return [core.conn for core in self._cores]

    def is_alive(self) -> bool:
        return bool(self._cores) and all(core.process.poll() is None for core in self._cores)

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams | None = None, arrival_time: float | None = None,
                    priority: int = 0) -> str:
        request_id, params, token_ids = admit_request(
            request_id, self._new_ids, self.requests, prompt, params, priority, self.tokenizer,
            self.model_config.vocab_size, self.max_model_len)
        # perf_counter is the system-wide monotonic clock on Linux, so the core can keep it.
        arrival_time = arrival_time if arrival_time is not None else time.perf_counter()
        index = min(range(len(self._cores)), key=lambda i: len(self._cores[i].outstanding))
        self._cores[index].conn.send(("add", (request_id, token_ids, params, arrival_time, priority)))
        self._cores[index].outstanding.add(request_id)
        self.requests[request_id] = _Tracked(
            index, prompt if isinstance(prompt, str) else None, token_ids,
            IncrementalDetokenizer(self.tokenizer), RequestMetrics(arrival_time=arrival_time))
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Ask the request's core to drop it; its last output (finished as "abort") comes back
        through `step()` / `receive()`."""
        tracked = self.requests.get(request_id)
        if tracked is not None:
            self._cores[tracked.core].conn.send(("abort", [request_id]))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._undelivered)

    def add_step_observer(self, observer: StepObserver) -> None:
        self.observers.append(observer)

    def load(self) -> list[CoreLoad]:
        """Each replica's load as of its latest message."""
        return [core.load for core in self._cores]

    # -- calls with a reply ---------------------------------------------------------------------

    def send_call(self, kind: str, payload: Any, index: int) -> Future:
        """Send a command that the core answers; the future resolves when the answer is read."""
        done: Future = Future()
        self._cores[index].replies.append((kind, done))
        self._cores[index].conn.send((kind, payload))
        return done

    def reset_prefix_cache_calls(self) -> list[Future]:
        """Every replica's `reset_prefix_cache`, as futures of the blocks each forgot."""
        return [self.send_call("reset_prefix_cache", None, i) for i in range(len(self._cores))]

    def reset_prefix_cache(self) -> int:
        return sum(self._wait(f) for f in self.reset_prefix_cache_calls())

    def score(self, token_ids: list[int]) -> torch.Tensor:
        result = self._wait(self.send_call("score", list(token_ids), 0))
        if isinstance(result, Exception):
            raise result
        return torch.from_numpy(result)

    def _wait(self, done: Future) -> Any:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not done.done():
            if time.monotonic() > deadline:
                raise TimeoutError("an engine core did not answer in time")
            self._undelivered += self._read(POLL_S)
        return done.result()

    # -- outputs --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Outputs the cores produced since the last call (waits briefly for the first)."""
        outputs, self._undelivered = self._undelivered, []
        return outputs + self._read(0 if outputs else POLL_S)

    def _read(self, timeout: float) -> list[RequestOutput]:
        by_conn = {id(core.conn): i for i, core in enumerate(self._cores)}
        outputs: list[RequestOutput] = []
        for conn in wait(self.connections, timeout=timeout):
            outputs += self.receive(by_conn[id(conn)])
        return outputs

    def receive(self, index: int) -> list[RequestOutput]:
        """Read every message waiting from core `index`; the outputs they carry. Raises
        `EngineCoreDiedError` if the core has gone."""
        core = self._cores[index]
        outputs: list[RequestOutput] = []
        try:
            while core.conn.poll():
                kind, detail = core.conn.recv()
                if kind == "outputs":
                    outputs += self._outputs(core, detail)
                elif kind == "rejected":
                    outputs.append(self._rejected(core, index, *detail))
                elif kind == "failed":
                    raise EngineCoreDiedError(f"engine core {index} failed: {detail}")
                else:
                    expected, done = core.replies.popleft()
                    if expected != kind:
                        raise EngineCoreDiedError(f"engine core {index} answered {kind!r} to {expected!r}")
                    done.set_result(detail)
        except (EOFError, OSError) as err:
            code = core.process.poll()
            raise EngineCoreDiedError(f"engine core {index} exited (code {code}): "
                                      f"{type(err).__name__}") from None
        return outputs

    def _outputs(self, core: _Core, message: CoreOutputs) -> list[RequestOutput]:
        core.load = message.load
        outputs = []
        for new in message.outputs:
            tracked = self.requests.get(new.request_id)
            if tracked is None:
                continue
            tracked.token_ids += new.new_token_ids
            finished = new.finish_reason is not None
            if finished:
                del self.requests[new.request_id]
                core.outstanding.discard(new.request_id)
                tracked.metrics = new.metrics or tracked.metrics
                # Flush a trailing partial character as U+FFFD rather than dropping it.
                text = self.tokenizer.decode(tracked.token_ids)
            else:
                tracked.detokenizer.update(tracked.token_ids)
                text = tracked.detokenizer.text
            outputs.append(RequestOutput(
                request_id=new.request_id, prompt=tracked.prompt,
                prompt_token_ids=tracked.prompt_token_ids, token_ids=list(tracked.token_ids),
                text=text, finished=finished, finish_reason=new.finish_reason,
                metrics=tracked.metrics))
        for stats in message.stats:
            for observer in self.observers:
                observer(stats)
        return outputs

    def _rejected(self, core: _Core, index: int, request_id: str, field_name: str,
                  message: str) -> RequestOutput:
        # Validated here first, so a core refusing is a bug: said loudly, and the request ends.
        logger.error("engine core %d refused request %s: %s: %s", index, request_id, field_name, message)
        tracked = self.requests.pop(request_id, None)
        core.outstanding.discard(request_id)
        return RequestOutput(request_id, tracked.prompt if tracked else None,
                             tracked.prompt_token_ids if tracked else [], [], "", True, "abort",
                             RequestMetrics(arrival_time=time.perf_counter()))

    def close(self) -> None:
        for core in self._cores:
            try:
                core.conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for core in self._cores:
            try:
                core.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                core.process.terminate()
                core.process.wait()
            core.conn.close()
        self._cores = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
