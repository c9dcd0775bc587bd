"""Measuring a configuration as a client sees it: `pilot serve` in a child process on loopback,
driven through the OpenAI API by the load generator (`profile --via http`, `recommend --verify
--via http`).

What the profiler stores is the same as in process: each request's latencies (from the times its
chunks arrived) and the engine's steps (from the server's `/pilot/steps`), so the fit learns from
these runs too. The difference measured is the serving stack's own cost: HTTP, JSON and SSE,
and the hand-off between the server process and its engine core.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from engine import EngineConfig, StepStats
from planner.loadgen.http_load import Target, run_load
from planner.measure.delivery import delivery_samples, summarize_delivery
from planner.measure.in_process import LoadResult, MeasuredRequest
from planner.spec.workload import PoissonArrival, Workload

STARTUP_TIMEOUT_S = 600.0


class ServerProcess:
    """`pilot serve` for one engine config, on a free loopback port, behind a one-off API key."""

    def __init__(self, config: EngineConfig, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.config = config
        self.api_key = secrets.token_hex(16)
        self._dir = tempfile.TemporaryDirectory(prefix="pilot-serve-")
        config_file = Path(self._dir.name) / "engine.yaml"
        config_file.write_text(config.to_yaml())
        self._log = open(Path(self._dir.name) / "server.log", "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "planner", "serve", "--config", str(config_file), "--port", "0",
             "--log-level", "warning"],
            env={**os.environ, "PILOT_API_KEY": self.api_key}, stdout=subprocess.PIPE,
            stderr=self._log, text=True)
        try:
            self.url = self._wait_for_url(timeout_s)
        except BaseException:
            self.close()
            raise
        self.client = httpx.Client(base_url=self.url, timeout=60,
                                   headers={"Authorization": f"Bearer {self.api_key}"})

    def _wait_for_url(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        assert self.process.stdout is not None
        for line in self.process.stdout:  # the server prints one line when it listens
            if "serving on " in line:
                return line.split("serving on ", 1)[1].split()[0]
            if time.monotonic() > deadline:
                break
        self.process.wait(timeout=10)
        raise RuntimeError(f"pilot serve did not start (exit code {self.process.returncode}): "
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 8) -> str:
        self._log.flush()
        self._log.seek(0)
        return " | ".join(self._log.read().strip().splitlines()[-lines:]) or "no output"

    def steps_since(self, first: int) -> tuple[list[StepStats], int]:
        log = self.client.get("/pilot/steps", params={"since": first}).raise_for_status().json()
        return [StepStats(**s) for s in log["steps"]], log["next"]

    def requests_since(self, first: int) -> tuple[list[dict], int]:
        log = self.client.get("/pilot/requests", params={"since": first}).raise_for_status().json()
        return log["requests"], log["next"]

    def reset_prefix_cache(self) -> None:
        self.client.post("/pilot/reset_prefix_cache").raise_for_status()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self, "client"):
            self.client.close()
        self._log.close()
        self._dir.cleanup()


class OverHTTP:
    """The profiler's measurer for `via="http"`: one server per configuration."""

    def __init__(self, config: EngineConfig, workload: Workload) -> None:
        self.server = ServerProcess(config)
        try:
            info = self.server.client.get("/v1/models").raise_for_status().json()["data"][0]
            self.vocab_size = int(info["pilot"]["vocab_size"])
            self.target = Target(self.server.url, info["id"], api_key=self.server.api_key)
            few = workload.model_copy(update={"num_requests": min(4, workload.num_requests)})
            self._run(few, "concurrency", few.num_requests)  # warm-up, as in process
        except BaseException:
            self.server.close()
            raise

    def _run(self, workload: Workload, load_kind: str, load_value: float):
        if load_kind == "rate":
            workload = workload.model_copy(update={"arrival": PoissonArrival(rate=load_value)})
            concurrency = None
        elif load_kind == "concurrency":
            concurrency = int(load_value)
        else:
            raise ValueError(f"load_kind must be 'concurrency' or 'rate', got {load_kind!r}")
        return run_load(self.target, workload, self.vocab_size, concurrency=concurrency,
                        max_requests=workload.num_requests)

    def measure(self, workload: Workload, load_kind: str, load_value: float) -> LoadResult:
        self.server.reset_prefix_cache()  # every run starts cold, as in process
        _, first_step = self.server.steps_since(10**12)
        _, first_request = self.server.requests_since(10**12)
        result = self._run(workload, load_kind, load_value)
        failed = [r for r in result.records if not r.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(result.records)} requests failed over HTTP, "
                               f"the first: {failed[0].error or 'no output'}; server log: "
                               f"{self.server.log_tail(3)}")
        steps, _ = self.server.steps_since(first_step)
        engine_requests, _ = self.server.requests_since(first_request)
        delivery = summarize_delivery(delivery_samples(result.records, engine_requests))
        specs = workload.sample()
        requests = [MeasuredRequest(specs[r.index], r.send_time, r.latency(), r.output_tokens,
                                    r.finish_reason) for r in result.records]
        requests.sort(key=lambda r: r.spec.index)
        return LoadResult(result.duration_s, [r.spec for r in requests], [],
                          [r.arrival for r in requests], steps, result.start_time, None, requests,
                          delivery, path="http")

    def close(self) -> None:
        self.server.close()
