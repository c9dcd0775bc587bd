"""Where the engine runs: the device and dtype a config names, and the host's free memory."""

from __future__ import annotations

import functools
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


def available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic oneDNN uses (AVX-512 BW/VL/DQ or AVX-NE-CONVERT).
    Elsewhere (an AVX2 host) bf16 matmuls are emulated, many times slower than fp32, and oneDNN
    cannot pack bf16 weights."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return check is not None and torch.backends.mkldnn.is_available() and bool(check())
