"""pilot's planner: profiler, store, cost model, simulator, search and the `pilot` CLI."""
