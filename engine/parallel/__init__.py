"""Parallel execution: tensor parallelism (`distributed`, `tensor_parallel`, `tp_worker`) and
data parallelism (`data_parallel`, over `engine.core`).

`distributed` holds a process's shard and its collectives, the step broadcast included;
`tensor_parallel` starts and serves the other ranks (it builds a rank's `ModelRunner`, the runner
never imports it); `data_parallel` runs whole engine replicas behind one front. Worker processes
start as `python -m engine.parallel.tp_worker`; data-parallel replicas are engine cores
(`python -m engine.core`).
"""
