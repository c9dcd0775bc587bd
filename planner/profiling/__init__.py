"""Profiling to an accuracy: the cross-validated error of what is measured so far
(`estimate`), a stop rule on it (`until`), an order that measures next where the cost model is
least sure (`adaptive`), and the watch that ties them to `planner.measure.profiler.profile`."""
