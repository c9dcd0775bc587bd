"""Measuring the real engine: the profiler's campaigns (`profiler`), driving the engine in
process (`in_process`) or through `pilot serve` over HTTP (`http`), how fast the host is
meanwhile (`host_speed`), and flat exports of what was measured (`export`)."""

from planner._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "profile": "profiler",
    "plan_campaign": "profiler",
    "plan_again": "profiler",
    "ProfileResult": "profiler",
    "run_load": "in_process",
    "LoadResult": "in_process",
    "OverHTTP": "http",
    "ServerProcess": "http",
    "export": "export",
})
