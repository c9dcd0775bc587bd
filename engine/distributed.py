"""Tensor parallelism's shared state: which shard this process holds, and its collectives.

Megatron-style: q/k/v and gate/up are split along their outputs (each rank computes whole heads
and a slice of the intermediate features), o and down along their inputs, so each rank's o/down
output is a partial sum and one all-reduce after attention and one after the MLP make it whole.
Embedding, norms and the LM head are replicated: every rank then holds the same hidden states,
and rank 0 alone samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# How long ranks wait for each other to join: workers start a Python with torch first.
JOIN_TIMEOUT = timedelta(seconds=300)


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; the identity without tensor parallelism."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def part(self, total: int, what: str) -> slice:
        """This rank's slice of `total` features (or heads) split evenly over the ranks."""
        if total % self.size:
            raise ValueError(f"tensor_parallel_size={self.size} must divide the model's {what} "
                             f"({total})")
        n = total // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def local(self, total: int, what: str) -> int:
        piece = self.part(total, what)
        return piece.stop - piece.start


def check_shardable(num_heads: int, num_kv_heads: int, intermediate_size: int, size: int) -> None:
    """Raise (naming the field) unless `size` ranks can split the model evenly."""
    tp = TensorParallel(0, size)
    tp.part(num_heads, "num_attention_heads")
    tp.part(num_kv_heads, "num_key_value_heads")
    tp.part(intermediate_size, "intermediate_size")


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def under_torchrun() -> bool:
    """Started by torchrun (or another launcher that sets torch.distributed's env://)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def join(rank: int, size: int, device_type: str, init_method: str | None = None) -> None:
    """Join the default process group unless this process is already in one (torchrun users
    may have made it)."""
    if dist.is_initialized():
        if dist.get_world_size() != size:
            raise ValueError(f"tensor_parallel_size={size}, but this process group has "
                             f"{dist.get_world_size()} ranks")
        return
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(backend_for(device_type), init_method=init_method or "env://",
                            rank=rank, world_size=size, timeout=JOIN_TIMEOUT)


def broadcast(obj: Any = None) -> Any:
    """Rank 0 sends `obj` to every rank; every rank returns it."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, on every rank, in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
