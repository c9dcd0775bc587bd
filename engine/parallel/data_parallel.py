"""Data parallelism: N independent engine replicas behind one front that spreads requests.

Each replica is a whole `LLMEngine` in its own process, with the CPU threads and the default KV
budget divided between replicas. Replicas are started as `python -m engine.parallel.dp_worker`
and connect back over a local authenticated socket: unlike multiprocessing's spawn, this never
re-imports the caller's main module, so scripts need no `if __name__ == "__main__"` guard. The front
has the `LLMEngine` interface the `LLM` class and the server use (`add_request`, `step`,
`abort_request`, `score`, step observers); it validates each new request itself and sends it to
the replica with the fewest outstanding ones without waiting for a reply (a busy replica reads it
between steps), and `step()` returns whatever outputs the replicas have produced.
Replicas step on their own, so N of them overlap where one engine would run serially.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Client, Connection, Listener, wait
from typing import Any

import torch

from engine.config import EngineConfig
from engine.device import available_host_memory
from engine.llm_engine import InvalidRequestError, LLMEngine, validate_request
from engine.model_config import ModelConfig
from engine.observer import StepObserver
from engine.sampling_params import SamplingParams
from engine.sequence import RequestMetrics, RequestOutput
from engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

# How long one `step()` waits for the replicas before returning nothing.
POLL_S = 0.05


@dataclass
class _Replica:
    process: subprocess.Popen
    conn: Connection  # commands out, results back
    outstanding: set[str]


def replica_configs(config: EngineConfig, host_memory: int | None = None) -> list[EngineConfig]:
    """Each replica's own config: one replica's share of threads and default KV memory (a
    quarter of `host_memory`, default this host's available memory; the planner passes
    another machine's)."""
    n = config.data_parallel_size
    threads = config.num_threads or os.cpu_count() or 1
    update: dict[str, Any] = {"data_parallel_size": 1, "num_threads": max(1, threads // n)}
    if config.num_kv_blocks is None and config.kv_cache_memory_bytes is None:
        memory = available_host_memory() if host_memory is None else host_memory
        update["kv_cache_memory_bytes"] = max(1, memory // 4 // n)
    return [config.model_copy(update={**update, "seed": config.seed + i}) for i in range(n)]


def _serve(config: EngineConfig, conn: Connection, index: int) -> None:
    """A replica's loop: take commands, step while there is work, send outputs back."""
    try:
        engine = LLMEngine(config)
    except Exception as err:  # reported to the front, which raises it
        conn.send(("failed", repr(err)))
        return
    engine.add_step_observer(lambda stats: conn.send(("stats", replace(stats, replica=index))))
    conn.send(("ready", engine.max_model_len))
    while True:
        # Block for a command only when idle; between steps just look.
        while conn.poll(0 if engine.has_unfinished_requests() else None):
            kind, payload = conn.recv()
            if kind == "stop":
                engine.close()
                return
            if kind == "add":
                # No acknowledgement: the front validated the request already, and waiting for
                # one would hold the front for a whole step whenever this replica is busy.
                request_id, prompt, params, arrival_time, priority = payload
                try:
                    engine.add_request(request_id, prompt, params, arrival_time, priority)
                except InvalidRequestError as err:
                    conn.send(("rejected", (request_id, err.field, err.message)))
            elif kind == "abort":
                output = engine.abort_request(payload)
                if output is not None:
                    conn.send(("output", output))
            elif kind == "reset_prefix_cache":
                conn.send(("reset", engine.reset_prefix_cache()))
            elif kind == "score":
                try:
                    # As an array: a tensor would travel through torch's shared-memory pickling.
                    conn.send(("scored", engine.score(payload).numpy()))
                except (InvalidRequestError, RuntimeError) as err:
                    conn.send(("scored", err))
        for output in engine.step():
            conn.send(("output", output))


def main() -> None:
    """Replica process entry: connect to the front, receive the config, serve."""
    address, index = sys.argv[1], int(sys.argv[2])
    authkey = bytes.fromhex(os.environ.pop("PILOT_DP_AUTHKEY"))
    conn = Client(address, authkey=authkey)
    config = conn.recv()
    try:
        _serve(config, conn, index)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the front went away


class DataParallelEngine:
    def __init__(self, config: EngineConfig) -> None:
        if config.data_parallel_size < 2:
            raise ValueError(f"data_parallel_size={config.data_parallel_size}: a front needs 2 or more")
        self.config = config
        self.model_config = ModelConfig.for_engine(config.model)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model, self.model_config.bos_token_id)
        self.requests: dict[str, int] = {}  # outstanding request id -> replica
        self.observers: list[StepObserver] = []
        self._ids = 0
        self._replicas: list[_Replica] = []
        self._pending: list[tuple[str, int, Any]] = []  # replies read while waiting for another
        authkey = secrets.token_bytes(16)
        with Listener(family="AF_UNIX", authkey=authkey) as listener:
            env = {**os.environ, "PILOT_DP_AUTHKEY": authkey.hex()}
            for i, replica_config in enumerate(replica_configs(config)):
                process = subprocess.Popen(
                    [sys.executable, "-m", "engine.parallel.dp_worker", str(listener.address), str(i)],
                    env=env)
                conn = listener.accept()
                conn.send(replica_config)
                self._replicas.append(_Replica(process, conn, set()))
        limits = []
        for i, replica in enumerate(self._replicas):
            kind, detail = replica.conn.recv()
            if kind == "failed":
                self.close()
                raise RuntimeError(f"data-parallel replica {i} failed to start: {detail}")
            limits.append(detail)
        # What every replica's KV cache holds, so the front refuses what a replica would.
        self.max_model_len: int = min(limits)

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams | None = None, arrival_time: float | None = None,
                    priority: int = 0) -> str:
        if request_id is None:
            request_id = f"dp-{self._ids}"
            self._ids += 1
        request_id = str(request_id)
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        validate_request(prompt, params, priority, self.tokenizer, self.model_config.vocab_size,
                         self.max_model_len)
        arrival_time = arrival_time if arrival_time is not None else time.perf_counter()
        index = min(range(len(self._replicas)), key=lambda i: len(self._replicas[i].outstanding))
        replica = self._replicas[index]
        # perf_counter is the system-wide monotonic clock on Linux, so the replica can keep it.
        replica.conn.send(("add", (request_id, prompt, params, arrival_time, priority)))
        replica.outstanding.add(request_id)
        self.requests[request_id] = index
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        index = self.requests.get(request_id)
        if index is None:
            return None
        self._replicas[index].conn.send(("abort", request_id))
        return None  # the replica's final output arrives through step()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_step_observer(self, observer: StepObserver) -> None:
        self.observers.append(observer)

    def reset_prefix_cache(self) -> int:
        """Every replica's (see `LLMEngine.reset_prefix_cache`); the blocks forgotten in all."""
        for replica in self._replicas:
            replica.conn.send(("reset_prefix_cache", None))
        return sum(self._wait("reset", i, lambda detail: True) for i in range(len(self._replicas)))

    def score(self, token_ids: list[int]) -> torch.Tensor:
        self._replicas[0].conn.send(("score", list(token_ids)))
        result = self._wait("scored", 0, lambda detail: True)
        if isinstance(result, Exception):
            raise result
        return torch.from_numpy(result)

    # -- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Outputs the replicas produced since the last call (waits briefly for the first)."""
        messages, self._pending = self._pending, []
        messages += self._receive(POLL_S if not messages else 0)
        outputs = []
        for kind, index, detail in messages:
            if kind == "output":
                outputs.append(detail)
                if detail.finished:
                    self.requests.pop(detail.request_id, None)
                    self._replicas[index].outstanding.discard(detail.request_id)
            elif kind == "stats":
                for observer in self.observers:
                    observer(detail)
            elif kind == "rejected":  # validated here first, so a replica refusing is a bug
                request_id, field, message = detail
                logger.error("data-parallel replica %d refused request %s: %s: %s", index, request_id,
                             field, message)
                self.requests.pop(request_id, None)
                self._replicas[index].outstanding.discard(request_id)
                outputs.append(RequestOutput(request_id, None, [], [], "", True, "abort",
                                             RequestMetrics(arrival_time=time.perf_counter())))
            else:
                self._pending.append((kind, index, detail))
        return outputs

    def _receive(self, timeout: float) -> list[tuple[str, int, Any]]:
        """Every message waiting on any replica's connection (after up to `timeout` s)."""
        by_conn = {id(r.conn): i for i, r in enumerate(self._replicas)}
        messages = []
        for conn in wait([r.conn for r in self._replicas], timeout=timeout):
            index = by_conn[id(conn)]
            try:
                while conn.poll():
                    kind, detail = conn.recv()
                    messages.append((kind, index, detail))
            except EOFError:
                raise RuntimeError(f"data-parallel replica {index} exited") from None
        return messages

    def _wait(self, kind: str, index: int, match) -> Any:
        """The next `kind` reply from replica `index`, keeping everything else for step()."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            for i, message in enumerate(self._pending):
                if message[0] == kind and message[1] == index and match(message[2]):
                    return self._pending.pop(i)[2]
            if self._replicas[index].process.poll() is not None:
                raise RuntimeError(f"data-parallel replica {index} exited")
            self._pending += self._receive(1.0)
        raise TimeoutError(f"data-parallel replica {index} did not answer {kind!r}")

    def close(self) -> None:
        for replica in self._replicas:
            try:
                replica.conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for replica in self._replicas:
            try:
                replica.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                replica.process.terminate()
            replica.conn.close()
        self._replicas = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
