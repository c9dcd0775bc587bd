"""Where the engine runs: the device and dtype a config names, and the host's free memory."""

from __future__ import annotations

import functools
import math
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.model_config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, model_config: ModelConfig) -> torch.dtype:
    if name == "auto":
        name = model_config.torch_dtype if model_config.torch_dtype in DTYPES else "float32"
    return DTYPES[name]


CGROUP = "/sys/fs/cgroup"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _number(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def cgroup_memory_free(root: str = CGROUP) -> int | None:
    """What this process's memory cgroup still allows (limit less usage), or None without a
    limit. In a container /proc/meminfo is the node's: a pod limited to 8 GiB on a 512 GiB node
    would size its KV cache for the node and be killed."""
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        limit = _number(_read(f"{root}/{limit_file}"))
        if limit is not None and limit < 1 << 60:  # v1 writes "no limit" as a huge number
            return max(0, limit - (_number(_read(f"{root}/{usage_file}")) or 0))
    return None


def available_host_memory(root: str = CGROUP) -> int:
    """Memory free for this process: the host's available memory, or less where a cgroup (a
    container's limit) allows less."""
    host = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if host is None:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    allowed = cgroup_memory_free(root)
    return host if allowed is None else min(host, allowed)


def cgroup_cpu_quota(root: str = CGROUP) -> float | None:
    """CPUs this process's cgroup may use per period (a container's CPU limit), or None."""
    quota, period = None, None
    v2 = _read(f"{root}/cpu.max")
    if v2 is not None and len(v2.split()) == 2:
        quota, period = (_number(part) for part in v2.split())  # "max 100000" has no quota
    else:
        quota = _number(_read(f"{root}/cpu/cpu.cfs_quota_us"))  # -1 (no limit) is not a number here
        period = _number(_read(f"{root}/cpu/cpu.cfs_period_us"))
    return quota / period if quota and period else None


def usable_cpus(root: str = CGROUP) -> int:
    """Threads worth running: the CPUs this process may run on (affinity), at most its cgroup's
    CPU quota rounded up. os.cpu_count() is the whole node's even in a container of two CPUs,
    where a thread per node core would thrash."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(root)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic oneDNN uses (AVX-512 BW/VL/DQ or AVX-NE-CONVERT).
    Elsewhere (an AVX2 host) bf16 matmuls are emulated, many times slower than fp32, and oneDNN
    cannot pack bf16 weights."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return check is not None and torch.backends.mkldnn.is_available() and bool(check())
