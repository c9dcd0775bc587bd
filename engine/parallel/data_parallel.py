"""Data parallelism: N independent engine replicas behind one front that spreads requests.

Each replica is a whole `LLMEngine` in an engine core process of its own (`engine.core`), with
the CPU threads and the default KV budget divided between replicas (`replica_configs`). The
front sends each new request to the replica with the fewest outstanding ones; replicas step on
their own, so N of them overlap where one engine would run serially.
"""

from __future__ import annotations

from engine.config import EngineConfig
from engine.core.client import EngineCoreClient, replica_configs

__all__ = ["DataParallelEngine", "replica_configs"]


class DataParallelEngine(EngineCoreClient):
    """The engine core front with two or more replicas (offline use through `LLM`)."""

    def __init__(self, config: EngineConfig) -> None:
        if config.data_parallel_size < 2:
            raise ValueError(f"data_parallel_size={config.data_parallel_size}: a front needs 2 or more")
        super().__init__(config)
