"""`EngineCore`: one `LLMEngine` stepping in a process of its own, driven over a connection.

The loop reads commands between steps (blocking only when idle) and, after every step, sends one
`CoreOutputs` message: each advanced request's new token ids, the step's `StepStats`, and the
replica's load. Text is the front's business, so a step costs the core no detokenizing and the
front one message to read however many requests the batch holds.

Cores start as `python -m engine.core ADDRESS INDEX` and connect back over a local authenticated
socket: unlike multiprocessing's spawn this never re-imports the caller's main module, so scripts
need no `if __name__ == "__main__"` guard.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from multiprocessing.connection import Client, Connection
from typing import Any, NamedTuple

from engine.llm_engine import InvalidRequestError, LLMEngine
from engine.observer import StepStats
from engine.sequence import RequestMetrics, Sequence

AUTHKEY_ENV = "PILOT_CORE_AUTHKEY"


class CoreLoad(NamedTuple):
    """What a replica holds right now, sent with every message so the front's view is fresh."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_touched: int
    kv_blocks_total: int


@dataclass
class CoreOutput:
    """One request's news from one step: the tokens it gained, and on its last output how it
    finished and its timings."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None


@dataclass
class CoreOutputs:
    outputs: list[CoreOutput]
    stats: list[StepStats]
    load: CoreLoad


class EngineCore:
    def __init__(self, engine: LLMEngine, conn: Connection, index: int) -> None:
        self.engine, self.conn, self.index = engine, conn, index
        self._sent: dict[str, int] = {}  # output tokens already sent, per request
        self._stats: list[StepStats] = []
        engine.add_step_observer(lambda stats: self._stats.append(replace(stats, replica=index)))

    def run(self) -> None:
        """Serve until told to stop."""
        engine = self.engine
        while True:
            while self.conn.poll(0 if engine.has_unfinished_requests() else None):
                if not self.handle(*self.conn.recv()):
                    return
            if engine.has_unfinished_requests():
                advanced = engine.step_sequences()
                if advanced or self._stats:
                    self.send(advanced)

    def handle(self, kind: str, payload: Any) -> bool:
        """Carry out one command; False once told to stop."""
        if kind == "stop":
            return False
        if kind == "add":
            request_id, token_ids, params, arrival_time, priority = payload
            try:
                self.engine.add_request(request_id, token_ids, params, arrival_time, priority)
            except InvalidRequestError as err:  # the front validated it: a mismatch is a bug
                self.conn.send(("rejected", (request_id, err.field, err.message)))
        elif kind == "abort":
            aborted = [seq for seq in map(self.engine.abort_sequence, payload) if seq is not None]
            self.send(aborted)  # also when none was left: the load after the abort is news
        elif kind == "reset_prefix_cache":
            self.conn.send(("reset_prefix_cache", self.engine.reset_prefix_cache()))
        elif kind == "score":
            try:
                # As an array: a tensor would travel through torch's shared-memory pickling.
                self.conn.send(("score", self.engine.score(payload).numpy()))
            except (InvalidRequestError, RuntimeError) as err:
                self.conn.send(("score", err))
        else:
            raise ValueError(f"unknown engine core command {kind!r}")
        return True

    def send(self, sequences: list[Sequence]) -> None:
        outputs = []
        for seq in sequences:
            start = self._sent.get(seq.request_id, 0)
            new = seq.token_ids[seq.num_prompt_tokens + start:]
            if seq.is_finished:
                self._sent.pop(seq.request_id, None)
                outputs.append(CoreOutput(seq.request_id, new, seq.finish_reason, seq.metrics))
            else:
                self._sent[seq.request_id] = start + len(new)
                outputs.append(CoreOutput(seq.request_id, new))
        stats, self._stats = self._stats, []
        self.conn.send(("outputs", CoreOutputs(outputs, stats, self.load())))

    def load(self) -> CoreLoad:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        return CoreLoad(len(scheduler.running), len(scheduler.waiting), blocks.num_used_blocks,
                        blocks.num_touched_blocks, blocks.num_blocks)


def main() -> None:
    """Core process entry: connect to the front, receive the config, start the engine, serve."""
    address, index = sys.argv[1], int(sys.argv[2])
    conn = Client(address, authkey=bytes.fromhex(os.environ.pop(AUTHKEY_ENV)))
    conn.send(index)
    config = conn.recv()
    try:
        try:
            engine = LLMEngine(config)
        except Exception as err:  # reported to the front, which raises it
            conn.send(("failed", f"{type(err).__name__}: {err}"))
            return
        conn.send(("ready", engine.max_model_len))
        try:
            EngineCore(engine, conn, index).run()
        except Exception as err:
            conn.send(("failed", f"{type(err).__name__}: {err}"))
            raise
        finally:
            engine.close()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the front went away
