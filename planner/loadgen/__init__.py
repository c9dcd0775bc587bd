"""The OpenAI-compatible load generator behind `pilot bench serve` and `--via http`: an SSE
client, arrival profiles and the summary of what a client saw."""

from planner._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Target": "http_load",
    "run_load": "http_load",
    "LoadResult": "http_load",
    "LoadSummary": "http_load",
    "BenchError": "http_load",
    "summarize_records": "http_load",
})
