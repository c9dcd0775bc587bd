"""Tensor parallelism's processes: rank 0 is the engine, ranks 1..T-1 follow its steps.

Rank 0 runs the scheduler, prepares every step and broadcasts the step's inputs; every rank
then runs the same forward pass on its shard of the weights, meeting at the all-reduces inside
the model, and rank 0 alone samples. Workers are started by the engine as
`python -m engine.parallel.tp_worker` and meet rank 0 through a file-backed rendezvous in a
private directory (no port to collide on). Under torchrun every rank runs the caller's script: rank 0
becomes the engine and the other ranks serve it from inside `LLMEngine(...)`, exiting when it
closes.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.device import available_host_memory, resolve_device, usable_cpus
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner
from engine.parallel import distributed
from engine.parallel.distributed import TensorParallel, map_leaves


def rank_config(config: EngineConfig) -> EngineConfig:
    """One rank's config: on the CPU, its share of the threads and of the default KV memory
    (ranks share one host); on CUDA each rank has a GPU of its own."""
    if resolve_device(config.device).type == "cuda":
        return config
    size = config.tensor_parallel_size
    update: dict[str, Any] = {"num_threads": max(1, (config.num_threads or usable_cpus()) // size)}
    if config.num_kv_blocks is None and config.kv_cache_memory_bytes is None:
        update["kv_cache_memory_bytes"] = max(1, available_host_memory() // 4 // size)
    return config.model_copy(update=update)


def follow(runner: Any) -> None:
    """Ranks 1..T-1: run every forward pass rank 0 sends (`distributed.send_step`) until it
    says stop."""
    device = runner.device
    with torch.inference_mode():
        while True:
            kind, payload = distributed.broadcast()
            if kind == "stop":
                return
            runner.run_model(*map_leaves(payload, np.ndarray, lambda a: torch.from_numpy(a).to(device)))


def serve_rank(rank: int, size: int, device_type: str, init_method: str | None) -> None:
    """A worker rank's life: join, take its config from rank 0, load its shard, follow."""
    distributed.join(rank, size, device_type, init_method)
    config: EngineConfig | None = distributed.broadcast()
    if config is None:  # rank 0 could not load its own shard
        distributed.leave()
        return
    try:
        model_config = ModelConfig.from_dir(config.model)
        runner = ModelRunner(config, model_config, config.max_model_len or model_config.max_position_embeddings,
                             tp=TensorParallel(rank, size))
        status = None
    except Exception as err:  # reported to rank 0, which raises it
        status = repr(err)
    if not any(distributed.gather(status)):  # all loaded: otherwise rank 0 raises, and all leave
        follow(runner)
    distributed.leave()


def _die_with_parent() -> None:
    """A worker the engine started goes when the engine does, even if it is killed outright."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> None:
    """`python -m engine.parallel.tp_worker INIT_METHOD RANK SIZE DEVICE_TYPE`, started by rank 0."""
    _die_with_parent()
    init_method, rank, size, device_type = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    serve_rank(rank, size, device_type, init_method)


class TensorParallelWorkers:
    """Rank 0's handle on the other ranks: start them, hand them their config, stop them."""

    def __init__(self, config: EngineConfig) -> None:
        self.size = config.tensor_parallel_size
        self.device_type = resolve_device(config.device).type
        self.processes: list[subprocess.Popen] = []
        self._store_dir: str | None = None
        self._owns_group = not dist.is_initialized()
        self.joined = False  # in the group, the other ranks waiting for their config
        self.connected = False  # the other ranks loaded and following
        if distributed.under_torchrun():
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            if world != self.size:
                raise ValueError(f"tensor_parallel_size={self.size}, but torchrun started {world} ranks")
            self.init_method = None
            if rank != 0:
                serve_rank(rank, self.size, self.device_type, None)
                raise SystemExit(0)  # rank 0 has closed: this rank's work is done
            distributed.join(0, self.size, self.device_type, None)
            self.joined = True
            return
        self._store_dir = tempfile.mkdtemp(prefix="pilot-tp-")
        self.init_method = f"file://{self._store_dir}/rendezvous"
        for rank in range(1, self.size):
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "engine.parallel.tp_worker", self.init_method, str(rank),
                 str(self.size), self.device_type]))
        try:
            # Before rank 0 loads anything: its decoder-layer kernels need the shared memory
            # the group sets up.
            distributed.join(0, self.size, self.device_type, self.init_method)
        except BaseException:
            self.close()
            raise
        self.joined = True

    def connect(self, runner: Any) -> None:
        """Have every rank load its shard, with rank 0's KV-cache size."""
        self.connected = True
        worker_config = runner.config.model_copy(update={
            "num_kv_blocks": runner.num_kv_blocks, "speculative_model": None,
            "num_speculative_tokens": None})
        distributed.broadcast(worker_config)
        failures = [(rank, status) for rank, status in enumerate(distributed.gather(None)) if status]
        if failures:
            self.connected = self.joined = False  # every rank saw the failure and is leaving
            self.close()
            rank, status = failures[0]
            raise RuntimeError(f"tensor-parallel rank {rank} failed to load its shard: {status}")

    def close(self) -> None:
        stopping = self.connected or self.joined
        try:
            if self.connected:
                distributed.broadcast(("stop", None))
            elif self.joined:
                distributed.broadcast(None)  # no config: rank 0 failed to load, all leave
        except RuntimeError:
            pass  # a rank is gone already
        self.connected = self.joined = False
        for process in self.processes:
            if not stopping:
                process.terminate()  # never joined: nothing to finish
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes = []
        if self._owns_group:
            distributed.leave()
            self._owns_group = False
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)
            self._store_dir = None
