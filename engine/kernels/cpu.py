"""The CPU paged decode-attention kernel: compiled from C on first use, loaded through ctypes.

Without it, decode attention gathers every sequence's keys and values into a padded copy,
converts it to fp32 and lets PyTorch's attention read it again; at 64 sequences that was as much
time as all the linears. The kernel reads the block cache in place (AVX-512 where the CPU has it,
portable C otherwise). Building needs a C compiler (`cc`); without one, or with
PILOT_CPU_KERNELS=0, the engine keeps the PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("paged_attention_cpu.c")
# Below this much work (sequences x kv heads x context) waking a second thread costs more.
_PARALLEL_WORK = 8192


def _cache_dir() -> Path:
    root = os.environ.get("PILOT_CACHE") or Path.home() / ".cache" / "pilot"
    return Path(root) / "kernels"


def _build(source: Path, target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", tmp, str(source), "-lm"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be had (the reason is logged)."""
    if os.environ.get("PILOT_CPU_KERNELS", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.info("no C compiler found: CPU decode attention uses the PyTorch path")
        return None
    # Built with -march=native: key it by this CPU as well as by the source.
    key = hashlib.sha256(SOURCE.read_bytes() + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"paged_attention_cpu-{key}.so"
    try:
        if not target.is_file():
            _build(SOURCE, target, compiler)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("building the CPU attention kernel failed (%s): using the PyTorch path", err)
        return None
    fn = lib.paged_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 3
                   + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int])
    return lib


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and load() is not None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           block_size: int, scale: float, max_context: int) -> torch.Tensor:
    """q: [B, H, D]; caches: [num_slots, KVH * D] (q's dtype); block_tables: [B, max_blocks]
    and context_lens: [B], both int64 and contiguous. Returns [B, H, D] in q's dtype."""
    lib = load()
    assert lib is not None, "CPU attention kernel unavailable"
    q = q.contiguous()
    num_seqs, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1] // head_dim
    out = torch.empty_like(q)
    work = num_seqs * kv_heads * max_context
    threads = torch.get_num_threads() if work > _PARALLEL_WORK else 1
    status = lib.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(q.dtype == torch.bfloat16),
        block_tables.data_ptr(), context_lens.data_ptr(), out.data_ptr(), num_seqs, heads,
        kv_heads, head_dim, block_size, block_tables.shape[1], scale, threads)
    if status != 0:
        raise ValueError(f"CPU attention kernel: unsupported heads={heads}, kv_heads={kv_heads}, "
                         f"head_dim={head_dim}")
    return out


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags
