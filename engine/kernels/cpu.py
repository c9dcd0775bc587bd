"""The engine's CPU kernels, compiled from C on first use and loaded through ctypes.

- Paged decode attention: without it, decode attention gathers every sequence's keys and values
  into a padded copy, converts it to fp32 and lets PyTorch's attention read it again; at 64
  sequences that was as much time as all the linears. The kernel reads the block cache in place
  (AVX-512 or AVX2 where the CPU has them, portable C otherwise).
- Linear layers on panel-packed weights (AVX-512, and AVX512-BF16 for bfloat16; else AVX2 with
  FMA, widening bf16 in registers): batch-1
  decode streams the weights at the machine's read bandwidth, where oneDNN's packed GEMM reached
  ~75% of it; at prefill sizes the two run level. Where the CPU has AMX, bf16 at 3 rows or more
  runs on its tile unit from the same packed weights (`linear_uses_amx`): on a 2-core Xeon
  1.2x oneDNN's GEMM at 256 rows (more at 8-64) and 4-7x the AVX-512 tile.

Quantized linears on AVX2 without AVX-512 multiply integers (quant_dot_cpu.c): activations are
rounded to int8 in groups of 32, as llama.cpp's are.

Building needs a C compiler (`cc`); without one, or with PILOT_CPU_KERNELS=0, the engine keeps
the PyTorch and oneDNN paths.
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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from engine.quantization import QuantizedWeight

logger = logging.getLogger(__name__)
KERNEL_DIR = Path(__file__).parent
SOURCES = [KERNEL_DIR / name for name in
           ("paged_attention_cpu.c", "linear_cpu.c", "quant_linear_cpu.c", "quant_dot_cpu.c",
            "elementwise_cpu.c", "decoder_layer_cpu.c", "shm_allreduce_cpu.c")]
HEADERS = [KERNEL_DIR / "simd_math.h"]
# Below this much work (sequences x kv heads x context) waking a second thread costs more.
PARALLEL_ATTENTION_WORK = 8192


def _cache_dir() -> Path:
    """Where the built library goes: never beside the sources, which in an installed package may
    be read-only or shared. $PILOT_CACHE/kernels where set; else the user's cache
    ($XDG_CACHE_HOME/pilot/kernels, ~/.cache/pilot/kernels); else, where that cannot be written,
    a folder of this user's own in the temp dir. The file name carries the sources' and this
    CPU's digest, so one folder serves several versions and machines."""
    if os.environ.get("PILOT_CACHE"):
        return Path(os.environ["PILOT_CACHE"]) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        user = (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "pilot" / "kernels"
        user.mkdir(parents=True, exist_ok=True)
        if os.access(user, os.W_OK | os.X_OK):
            return user
    except (OSError, RuntimeError):  # RuntimeError: no home directory
        pass
    uid = os.getuid()
    scratch = Path(tempfile.gettempdir()) / f"pilot-kernels-{uid}"
    try:
        scratch.mkdir(mode=0o700, exist_ok=True)
        # A library found here gets loaded: only a folder this user owns and no one else can write.
        info = scratch.stat()
        if info.st_uid == uid and not info.st_mode & 0o022:
            return scratch
    except OSError:
        pass
    raise OSError("no writable cache folder for the CPU kernels (set PILOT_CACHE)")


def _build(sources: list[Path], target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", tmp, *map(str, sources), "-lm"]
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
        logger.info("no C compiler found: the CPU kernels are off, PyTorch paths are used")
        return None
    try:
        # Built with -march=native: key it by this CPU as well as by the source.
        digest = hashlib.sha256(_cpu_signature().encode())
        for source in SOURCES + HEADERS:
            digest.update(source.read_bytes())
        target = _cache_dir() / f"pilot_cpu-{digest.hexdigest()[:16]}.so"
        if not target.is_file():
            _build(SOURCES, target, compiler)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("building the CPU kernels failed (%s): using the PyTorch paths", err)
        return None
    fn = lib.paged_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 3
                   + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int])
    lib.pilot_elementwise_caps.restype = ctypes.c_int
    lib.pilot_rms_norm.restype = ctypes.c_int
    lib.pilot_rms_norm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float] + [ctypes.c_int] * 2
    lib.pilot_silu_mul.restype = ctypes.c_int
    lib.pilot_silu_mul.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 2
    lib.pilot_rope_and_cache.restype = ctypes.c_int
    lib.pilot_rope_and_cache.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3
                                         + [ctypes.c_int] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2)
    lib.pilot_quant_linear_caps.restype = ctypes.c_int
    lib.pilot_quant_dot_caps.restype = ctypes.c_int
    for fn in (lib.pilot_quant_linear, lib.pilot_quant_dot):
        fn.restype = ctypes.c_int
        fn.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
                       + [ctypes.c_int, ctypes.c_int64] + [ctypes.c_int] * 2)
    lib.pilot_shm_allreduce.restype = ctypes.c_int64
    lib.pilot_shm_allreduce.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_double]
    lib.pilot_shm_wait.restype = ctypes.c_int
    lib.pilot_shm_wait.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_double]
    lib.pilot_shm_publish.restype = None
    lib.pilot_shm_publish.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.pilot_linear_caps.restype = ctypes.c_int
    lib.pilot_linear.restype = ctypes.c_int
    lib.pilot_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_int, ctypes.c_int]
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
    threads = torch.get_num_threads() if work > PARALLEL_ATTENTION_WORK else 1
    status = lib.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(q.dtype == torch.bfloat16),
        block_tables.data_ptr(), context_lens.data_ptr(), out.data_ptr(), num_seqs, heads,
        kv_heads, head_dim, block_size, block_tables.shape[1], scale, threads)
    if status != 0:
        raise ValueError(f"CPU attention kernel: unsupported heads={heads}, kv_heads={kv_heads}, "
                         f"head_dim={head_dim}")
    return out


# -- linear layers -----------------------------------------------------------------------------

_LINEAR_CAPS = {torch.float32: 1, torch.bfloat16: 2}


def linear_supported(dtype: torch.dtype, device: torch.device, in_features: int) -> bool:
    """Whether `linear` runs this dtype on this machine (bf16 pairs need an even K)."""
    lib = load() if device.type == "cpu" else None
    if lib is None or dtype not in _LINEAR_CAPS or not lib.pilot_linear_caps() & _LINEAR_CAPS[dtype]:
        return False
    return dtype != torch.bfloat16 or in_features % 2 == 0


def linear_uses_amx() -> bool:
    """Whether bf16 linears of 3 rows or more (prefill, decode batches, speculative verification) run on AMX tiles."""
    lib = load()
    return lib is not None and bool(lib.pilot_linear_caps() & 4)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> blocks of 32 outputs, their two 16-output halves interleaved along K:
    fp32 [ceil(N/32), K, 2, 16], bf16 [ceil(N/32), K/2, 2, 16, 2] (pairs along K)."""
    n, k = weight.shape
    padded = -n % 32
    if padded:
        weight = torch.cat([weight, weight.new_zeros(padded, k)])
    blocks = weight.shape[0] // 32
    if weight.dtype == torch.bfloat16:
        return weight.view(blocks, 2, 16, k // 2, 2).permute(0, 3, 1, 2, 4).contiguous()
    return weight.view(blocks, 2, 16, k).permute(0, 3, 1, 2).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) with W packed by `pack_linear_weight`; returns [..., N] in x's dtype."""
    # Kept lean: at batch 1 a layer's weights stream in ~15 us, and every microsecond of Python
    # here is paid 49 times a step.
    if x.dim() != 2:
        return linear(x.reshape(-1, x.shape[-1]), packed, bias, out_features).view(*x.shape[:-1], out_features)
    rows, k = x.shape
    if x.stride(1) != 1 or (rows > 1 and x.stride(0) < k):
        x = x.contiguous()
    out = torch.empty((rows, out_features), dtype=x.dtype)
    status = _lib().pilot_linear(x.data_ptr(), x.stride(0), packed.data_ptr(),
                                 None if bias is None else bias.data_ptr(), out.data_ptr(), rows,
                                 out_features, k, x.dtype == torch.bfloat16, torch.get_num_threads())
    if status != 0:
        raise ValueError(f"CPU linear kernel: unsupported dtype={x.dtype} or in_features={k}")
    return out


def _lib() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available (no compiler, or PILOT_CPU_KERNELS=0)")
    return lib


# -- weight-only quantized linear layers -------------------------------------------------------

@dataclass
class PackedQuantized:
    """A QuantizedWeight in one of the kernels' 32-output block layouts: a step per k
    (quant_linear_cpu.c), or with `dot` four k of one output together, for the integer dot
    products of quant_dot_cpu.c (AVX2 without AVX-512)."""

    # uint8: int8 [blocks, K, 32], dot [blocks, K/4, 32, 4]; int4 [blocks, K, 16], dot [blocks, K/8, 32, 4]
    qweight: torch.Tensor
    scales: torch.Tensor  # float32 [blocks, groups, 32]
    mins: torch.Tensor | None
    bits: int
    group_size: int
    dot: bool = False


def quant_linear_supported(dtype: torch.dtype, device: torch.device, weight: QuantizedWeight) -> bool:
    """Whether `quant_linear` runs this dtype on this machine: AVX-512 (borrowing the dense
    kernel's register tiles) or AVX2 with FMA (8 lanes, its own)."""
    lib = load() if device.type == "cpu" else None
    if lib is None or dtype not in _LINEAR_CAPS or not lib.pilot_quant_linear_caps() & _LINEAR_CAPS[dtype]:
        return False
    return dtype != torch.bfloat16 or weight.shape[1] % 2 == 0


def dot_products_supported(in_features: int, group_size: int) -> bool:
    """Whether quantized linears of this shape take the integer dot-product kernel here: AVX2
    without AVX-512, K and the group multiples of 32 (the activations' int8 groups)."""
    lib = load()
    return (lib is not None and bool(lib.pilot_quant_dot_caps())
            and in_features % 32 == 0 and group_size % 32 == 0)


def pack_quantized(weight: QuantizedWeight) -> PackedQuantized:
    n, k = weight.shape
    pad = -n % 32
    q, scales, mins = weight.qweight, weight.scales, weight.mins
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
        scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])
        mins = None if mins is None else torch.cat([mins, mins.new_zeros(pad, mins.shape[1])])
    blocks = q.shape[0] // 32
    dot = dot_products_supported(k, weight.group_size)
    if dot and weight.bits == 8:  # [blocks, K/4, 32, 4]: four k of one output a 32-bit lane
        packed = q.view(blocks, 32, k // 4, 4).permute(0, 2, 1, 3).contiguous().view(torch.uint8)
    elif dot:  # [blocks, K/8, 32, 4]: k 8s+b in the low nibble of byte b, 8s+4+b in the high one
        eighths = q.to(torch.uint8).view(blocks, 32, k // 8, 2, 4)
        packed = (eighths[:, :, :, 0] | (eighths[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()
    elif weight.bits == 8:
        packed = q.view(blocks, 32, k).transpose(1, 2).contiguous().view(torch.uint8)
    else:
        halves = q.to(torch.uint8).view(blocks, 2, 16, k)
        packed = (halves[:, 0] | (halves[:, 1] << 4)).transpose(1, 2).contiguous()

    def by_block(t: torch.Tensor) -> torch.Tensor:
        return t.float().view(blocks, 32, -1).transpose(1, 2).contiguous()

    return PackedQuantized(packed, by_block(scales), None if mins is None else by_block(mins),
                           weight.bits, weight.group_size, dot)


def quant_linear(x: torch.Tensor, weight: PackedQuantized, bias: torch.Tensor | None,
                 out_features: int) -> torch.Tensor:
    """x [..., K] @ dequant(W)^T (+ bias); returns [..., N] in x's dtype."""
    if x.dim() != 2:
        return quant_linear(x.reshape(-1, x.shape[-1]), weight, bias, out_features).view(
            *x.shape[:-1], out_features)
    rows, k = x.shape
    if x.stride(1) != 1 or (rows > 1 and x.stride(0) < k):
        x = x.contiguous()
    out = torch.empty((rows, out_features), dtype=x.dtype)
    lib = _lib()
    status = (lib.pilot_quant_dot if weight.dot else lib.pilot_quant_linear)(
        x.data_ptr(), x.stride(0), weight.qweight.data_ptr(), weight.scales.data_ptr(),
        None if weight.mins is None else weight.mins.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), rows, out_features, k,
        weight.bits, weight.group_size, x.dtype == torch.bfloat16, torch.get_num_threads())
    if status != 0:
        raise ValueError(f"CPU quantized linear: unsupported dtype={x.dtype}, in_features={k} "
                         f"or group_size={weight.group_size}")
    return out


# -- fused element-wise steps ------------------------------------------------------------------

_FUSABLE = (torch.float32, torch.bfloat16)


@lru_cache(maxsize=None)
def _fused_supported(dtype: torch.dtype, device_type: str) -> bool:
    lib = load() if device_type == "cpu" else None
    return lib is not None and dtype in _FUSABLE and bool(lib.pilot_elementwise_caps())


def fused_supported(x: torch.Tensor) -> bool:
    """Whether rms_norm, silu_mul and rope_and_cache run for tensors like x on this machine;
    never inside torch.compile, which cannot trace a foreign call."""
    return not torch.compiler.is_compiling() and _fused_supported(x.dtype, x.device.type)


def _check(status: int, what: str) -> None:
    if status != 0:
        raise ValueError(f"CPU kernel {what}: unsupported shape or dtype")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm(x) * weight over the last dim. With `residual`, normalises x + residual instead
    and leaves that sum in `residual` (updated in place), the stream the next layer adds to."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    _check(_lib().pilot_rms_norm(
        x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
        out.data_ptr(), x.numel() // dim, dim, eps, int(x.dtype == torch.bfloat16),
        torch.get_num_threads()), "rms_norm")
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [..., 2 * inter] (gate first); returns [..., inter]."""
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    _check(_lib().pilot_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter),
                                 inter, int(gate_up.dtype == torch.bfloat16), torch.get_num_threads()),
           "silu_mul")
    return out


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   signed_sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Rotate the q and k heads of qkv [T, (heads + 2 kv_heads) * head_dim] in place and write
    each token's k and v into its cache slot. Tables [max_pos, head_dim] in qkv's dtype."""
    assert qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    _check(_lib().pilot_rope_and_cache(
        qkv.data_ptr(), qkv.shape[0], positions.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(),
        heads, kv_heads, head_dim, k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
        int(qkv.dtype == torch.bfloat16), torch.get_num_threads()), "rope_and_cache")


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags
