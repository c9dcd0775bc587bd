"""Prometheus metrics of a serving engine, under vLLM's names with a `pilot:` prefix, so that
dashboards built for vLLM need only the prefix changed.

Counters and histograms are fed on the event loop as the cores report (every step, every finished
request); gauges are read when `/metrics` is scraped. Each server has its own registry, so several servers
in one process (the tests) do not share figures.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from engine.observer import StepStats
from engine.sequence import RequestOutput
from engine.serving.async_engine import AsyncLLMEngine

# A `_created` timestamp series per metric doubles the page and no dashboard reads it.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Tokens per second is averaged over this window: short enough to follow load changes, long
# enough to span many steps.
THROUGHPUT_WINDOW_S = 10.0

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.engine = engine
        labels = {"model_name": model_name}
        r = self.registry

        def gauge(name: str, doc: str, read) -> None:
            Gauge(name, doc, list(labels), registry=r).labels(**labels).set_function(read)

        gauge("pilot:num_requests_running", "Requests in the running batch.",
              lambda: engine.stats()["num_running"])
        gauge("pilot:num_requests_waiting", "Requests waiting to be scheduled.",
              lambda: engine.stats()["num_waiting"])
        gauge("pilot:kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = full).",
              lambda: engine.stats()["kv_cache_usage"])
        gauge("pilot:kv_cache_resident_perc", "Share of KV-cache blocks ever written (1 = all): the "
              "cache is reserved untouched at start, and the process's memory grows by this share "
              "of it as blocks are first used.", lambda: engine.stats()["kv_cache_touched"])
        gauge("pilot:generation_tokens_per_second",
              f"Output tokens per second over the last {THROUGHPUT_WINDOW_S:g} s.", self._throughput)
        gauge("pilot:spec_decode_acceptance_rate",
              "Draft tokens accepted / draft tokens verified, since start (0 without drafts).",
              self._acceptance_rate)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, list(labels), registry=r).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, list(labels), registry=r, buckets=buckets).labels(**labels)

        self.prompt_tokens = counter("pilot:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("pilot:generation_tokens", "Output tokens produced.")
        self.preemptions = counter("pilot:num_preemptions", "Sequences preempted for KV space.")
        self.draft_tokens = counter("pilot:spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.accepted_tokens = counter("pilot:spec_decode_num_accepted_tokens",
                                       "Draft tokens the target accepted.")
        self.finished = Counter("pilot:request_success", "Finished requests by finish reason.",
                                [*labels, "finished_reason"], registry=r)
        self.rejected = Counter("pilot:request_rejected", "Requests refused before running, by "
                                "HTTP status.", [*labels, "status"], registry=r)
        self.ttft = histogram("pilot:time_to_first_token_seconds", "Time to first token.",
                              _LATENCY_BUCKETS)
        self.itl = histogram("pilot:inter_token_latency_seconds", "Time between output tokens.",
                             _ITL_BUCKETS)
        self.tpot = histogram("pilot:request_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", _ITL_BUCKETS)
        self.e2e = histogram("pilot:e2e_request_latency_seconds", "Arrival to last token.",
                             _LATENCY_BUCKETS)
        self.queue_time = histogram("pilot:request_queue_time_seconds",
                                    "Arrival to first scheduled.", _LATENCY_BUCKETS)
        self.labels = labels
        self._emitted: dict[str, int] = {}  # output tokens already counted, per request
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._drafted = self._accepted = 0
        engine.observers.append(self.on_step)
        engine.output_listeners.append(self.on_output)
        engine.abort_listeners.append(self.on_abort)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def reject(self, status: int) -> None:
        self.rejected.labels(**self.labels, status=str(status)).inc()

    # -- fed on the event loop ------------------------------------------------------------------

    def on_step(self, stats: StepStats) -> None:
        if stats.num_preempted:
            self.preemptions.inc(stats.num_preempted)
        if stats.num_draft_tokens:
            self.draft_tokens.inc(stats.num_draft_tokens)
            self.accepted_tokens.inc(stats.num_accepted_tokens)
            with self._lock:
                self._drafted += stats.num_draft_tokens
                self._accepted += stats.num_accepted_tokens

    def on_output(self, output: RequestOutput) -> None:
        new = len(output.token_ids) - self._emitted.get(output.request_id, 0)
        if new > 0:
            self.generation_tokens.inc(new)
            with self._lock:
                self._recent.append((time.monotonic(), new))
        if not output.finished:
            self._emitted[output.request_id] = len(output.token_ids)
            return
        self._emitted.pop(output.request_id, None)
        m = output.metrics
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.finished.labels(**self.labels, finished_reason=output.finish_reason or "unknown").inc()
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        for gap in m.itls:
            self.itl.observe(gap)
        if m.tpot is not None:
            self.tpot.observe(m.tpot)
        if m.e2e is not None:
            self.e2e.observe(m.e2e)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, m.first_scheduled_time - m.arrival_time))

    def on_abort(self, request_id: str, reason: str) -> None:
        """A request ended before the engine finished it (it sends no final output): given up by
        its client ("abort"), or cut by the server at a stop string ("stop")."""
        self._emitted.pop(request_id, None)
        self.finished.labels(**self.labels, finished_reason=reason).inc()

    # -- read at scrape time --------------------------------------------------------------------

    def _throughput(self) -> float:
        cutoff = time.monotonic() - THROUGHPUT_WINDOW_S
        with self._lock:
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S

    def _acceptance_rate(self) -> float:
        with self._lock:
            return self._accepted / self._drafted if self._drafted else 0.0
