"""Tensor parallelism's shared state: which shard this process holds, and its collectives.

Megatron-style: q/k/v and gate/up are split along their outputs (each rank computes whole heads
and a slice of the intermediate features), o and down along their inputs, so each rank's o/down
output is a partial sum and one all-reduce after attention and one after the MLP make it whole.
Embedding, norms and the LM head are replicated: every rank then holds the same hidden states,
and rank 0 alone samples.

Ranks on one host all-reduce CPU tensors through shared memory (engine/kernels/
shm_allreduce_cpu.c, ~10x faster than gloo here, as vLLM's CPU backend also does); anything
else goes through torch.distributed (gloo, or NCCL on CUDA). Rank 0 hands each forward pass's
inputs to the other ranks with `send_step` (`tensor_parallel.follow` takes them).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import tempfile
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from engine.kernels import cpu as cpu_kernels
from engine.rules import split_evenly

# How long ranks wait for each other to join: workers start a Python with torch first.
JOIN_TIMEOUT = timedelta(seconds=300)
# How long a shared-memory all-reduce waits for a peer before deciding it has died.
PEER_TIMEOUT_S = 120.0


class SharedMemoryAllReduce:
    """Sums fp32/bf16 CPU tensors over the ranks of one host through a shared mapping."""

    SLOT_BYTES = 4 << 20  # larger tensors go through in slot-sized chunks

    def __init__(self, path: str, rank: int, size: int) -> None:
        self.lib = cpu_kernels.load()
        self.rank, self.size = rank, size
        header = (size * 64 + 4095) // 4096 * 4096
        nbytes = header + 2 * size * self.SLOT_BYTES
        if rank == 0:
            with open(path, "wb") as f:
                f.truncate(nbytes)  # zero-filled: every generation counter starts at 0
        self.region = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self.slots = header
        self.generation = 1

    def supports(self, x: torch.Tensor) -> bool:
        return (self.lib is not None and x.device.type == "cpu" and x.is_contiguous()
                and x.dtype in (torch.float32, torch.bfloat16))

    def __call__(self, x: torch.Tensor) -> None:
        generation = self.lib.pilot_shm_allreduce(  # type: ignore[union-attr]
            x.data_ptr(), x.numel(), int(x.dtype == torch.bfloat16), self.region.data_ptr(),
            self.rank, self.size, self.SLOT_BYTES, self.generation, PEER_TIMEOUT_S)
        if generation < 0:
            raise _peer_timeout("all-reduce")
        self.generation = generation

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj`, pickled through its slot (one generation); a payload larger than
        the slot follows through torch.distributed."""
        g, lib = self.generation, self.lib
        start = self.slots + (g % 2) * self.size * self.SLOT_BYTES  # rank 0's slot in bank g % 2
        header, capacity = self.region[start:start + 8], self.SLOT_BYTES - 8
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            if lib.pilot_shm_wait(self.region.data_ptr(), self.size, -1, g - 1, PEER_TIMEOUT_S):
                raise _peer_timeout("broadcast")
            header.view(torch.int64)[0] = len(data)
            if len(data) <= capacity:
                self.region[start + 8:start + 8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            lib.pilot_shm_publish(self.region.data_ptr(), 0, g)
        else:
            if lib.pilot_shm_wait(self.region.data_ptr(), self.size, 0, g, PEER_TIMEOUT_S):
                raise _peer_timeout("broadcast")
            n = int(header.view(torch.int64)[0])
            data = self.region[start + 8:start + 8 + n].numpy().tobytes() if n <= capacity else b""
            lib.pilot_shm_publish(self.region.data_ptr(), self.rank, g)
        self.generation = g + 1
        if len(data) > capacity or (self.rank != 0 and n > capacity):
            return broadcast(obj, through_shared_memory=False)
        return obj if self.rank == 0 else pickle.loads(data)


def _peer_timeout(what: str) -> RuntimeError:
    return RuntimeError(f"tensor-parallel {what}: a rank did not arrive within {PEER_TIMEOUT_S:.0f} s "
                        "(it has most likely exited)")


_shared_memory: SharedMemoryAllReduce | None = None


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
            if _shared_memory is not None and _shared_memory.supports(x):
                _shared_memory(x)
            else:
                dist.all_reduce(x)
        return x

    def part(self, total: int, what: str) -> slice:
        """This rank's slice of `total` features (or heads) split evenly over the ranks."""
        n = split_evenly(total, self.size, what)
        return slice(self.rank * n, (self.rank + 1) * n)

    def local(self, total: int, what: str) -> int:
        piece = self.part(total, what)
        return piece.stop - piece.start


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
    if device_type == "cpu":
        _share_memory(rank, size)


def _share_memory(rank: int, size: int) -> None:
    """Set up the shared-memory all-reduce if every rank is on this host and can run it."""
    global _shared_memory
    here = f"{socket.gethostname()}:{_boot_id()}"
    if len(set(gather(here))) != 1:
        return
    shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = broadcast(os.path.join(shm_dir, f"pilot-tp-{uuid.uuid4().hex}") if rank == 0 else None)
    if rank != 0:
        dist.barrier()  # rank 0 has created the file
    try:
        comm: SharedMemoryAllReduce | None = SharedMemoryAllReduce(path, rank, size)
    except (OSError, RuntimeError):
        comm = None
    if rank == 0:
        dist.barrier()
    ok = gather(comm is not None and comm.lib is not None)
    if rank == 0 and os.path.exists(path):
        os.unlink(path)  # every rank has mapped it; the mappings outlive the name
    _shared_memory = comm if all(ok) else None


def shared_memory() -> SharedMemoryAllReduce | None:
    """This process's shared-memory all-reduce, once it has joined a group on one host."""
    return _shared_memory


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def leave() -> None:
    """Leave the process group this module joined, and drop the shared-memory mapping."""
    global _shared_memory
    _shared_memory = None
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any = None, through_shared_memory: bool = True) -> Any:
    """Rank 0 sends `obj` to every rank; every rank returns it."""
    if through_shared_memory and _shared_memory is not None:
        return _shared_memory.broadcast(obj)
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, on every rank, in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def map_leaves(obj: Any, kind: type, fn: Callable[[Any], Any]) -> Any:
    """`obj` with `fn` applied to every `kind` inside it (dataclasses, lists, tuples)."""
    if isinstance(obj, kind):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_leaves(getattr(obj, f.name), kind, fn)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_leaves(x, kind, fn) for x in obj)
    return obj


def send_step(*inputs: Any) -> None:
    """Rank 0: hand a forward pass's inputs to the other ranks, tensors as NumPy arrays (they
    pickle in a fifth of the time a tensor takes)."""
    broadcast(("forward", map_leaves(inputs, torch.Tensor, lambda t: t.cpu().numpy())))
