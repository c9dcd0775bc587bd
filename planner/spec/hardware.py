"""Hardware: spec files (profiles/hardware/*.yaml), detection of this machine, a GPU sampler
and a CPU microbenchmark that turns the generic `cpu-host` entry into this host's spec."""

from __future__ import annotations

import os
import platform
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from planner.spec.files import builtin_data, read_mapping

# The repository's profiles/hardware/, shipped in a wheel as package data (planner/data/profiles).
BUILTIN_DIR = builtin_data("profiles") / "hardware"

Dtype = Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8"]


class HardwareSpecError(ValueError):
    """A hardware spec file is unreadable or invalid, or a spec name is unknown."""


class Interconnect(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["nvlink3", "nvlink4", "nvlink5", "pcie3", "pcie4", "pcie5", "infinity_fabric"]
    bandwidth_gbs: float = Field(gt=0)  # per device, as the datasheet states it


class HardwareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    vendor: Literal["nvidia", "amd", "cpu"]
    kind: Literal["gpu", "cpu"]
    memory_gb: float = Field(gt=0)
    memory_bandwidth_gbs: float = Field(gt=0)
    peak_tflops: dict[Dtype, Annotated[float, Field(gt=0)]]  # dense, never sparsity figures
    interconnect: Interconnect | None = None
    max_devices_per_node: int = Field(ge=1)
    price_per_hour_usd: float = Field(ge=0)  # per device
    price_source: str
    source: str
    tdp_watts: float | None = Field(default=None, gt=0)
    # True where the numbers come from measuring the host rather than from a datasheet.
    measured: bool = False

    @field_validator("peak_tflops")
    @classmethod
    def _bf16(cls, peaks: dict[str, float]) -> dict[str, float]:
        if "bf16" not in peaks:
            raise ValueError("bf16 is required (the planner's reference dtype)")
        return peaks

    @model_validator(mode="after")
    def _consistent(self) -> HardwareSpec:
        if (self.vendor == "cpu") != (self.kind == "cpu"):
            raise ValueError(f"vendor {self.vendor!r} does not go with kind {self.kind!r}")
        if self.kind == "gpu" and self.interconnect is None:
            raise ValueError("interconnect is required for a gpu (it prices tensor parallelism)")
        return self


def _validate(fields: dict[str, Any], where: object) -> HardwareSpec:
    try:
        return HardwareSpec.model_validate(fields)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}"
            + ("" if e["type"] == "missing" else f" (got {e['input']!r})") for e in err.errors())
        raise HardwareSpecError(f"{where}: {problems}") from err


def load_spec_file(path: Path) -> HardwareSpec:
    raw = read_mapping(path, HardwareSpecError, "hardware-spec fields")
    spec = _validate(raw, path)
    if spec.name != path.stem:
        # The file name is the id users type; a mismatch would make two names for one device.
        raise HardwareSpecError(f"{path}: name {spec.name!r} must equal the file stem "
                                f"{path.stem!r}")
    return spec


def load_specs(dirs: list[Path] | None = None) -> dict[str, HardwareSpec]:
    """Built-in specs, then each user dir in order; a later file with the same name wins."""
    specs: dict[str, HardwareSpec] = {}
    for d in [BUILTIN_DIR, *(Path(p) for p in dirs or [])]:
        if not d.is_dir():
            raise HardwareSpecError(f"{d}: hardware spec directory does not exist")
        for path in sorted(d.glob("*.yaml")):
            specs[path.stem] = load_spec_file(path)
    return specs


def get_spec(name: str, dirs: list[Path] | None = None) -> HardwareSpec:
    specs = load_specs(dirs)
    if name not in specs:
        raise HardwareSpecError(f"unknown hardware {name!r}; known: {', '.join(sorted(specs))}")
    return specs[name]


# (spec name, tokens that must appear, tokens that must not). Variants whose speeds differ a lot
# from the spec (H100 PCIe/NVL, H200 NVL) match nothing rather than borrow wrong numbers; A100
# PCIe parts are within a few percent of SXM on compute and bandwidth, so they match.
_NAME_RULES = [("h100-sxm", "H100", "PCIE NVL"), ("h200", "H200", "NVL"),
               ("a100-80gb", "A100 80GB", ""), ("a100-40gb", "A100 40GB", ""),
               ("l40s", "L40S", ""), ("l4", "L4", ""), ("a10g", "A10G", ""), ("t4", "T4", "")]


def match_gpu_name(nvml_name: str) -> str | None:
    """Spec name for an NVML device name ("NVIDIA A100-SXM4-40GB" -> "a100-40gb"), else None."""
    # Whole tokens, so that "L4" does not match "L40S" nor "H200" match "GH200".
    tokens = set(re.split(r"[^A-Z0-9]+", nvml_name.upper()))
    for spec, required, excluded in _NAME_RULES:
        if set(required.split()) <= tokens and not set(excluded.split()) & tokens:
            return spec
    return None


@dataclass
class GpuInfo:
    name: str
    memory_gb: float  # GiB, as nvidia-smi counts
    spec_name: str | None


@dataclass
class CpuInfo:
    model: str
    physical_cores: int
    logical_threads: int
    usable_threads: int  # what this process may run on (affinity, containers)
    memory_gb: float  # GiB
    avx512: bool
    avx512_bf16: bool


@dataclass
class DetectedHardware:
    cpu: CpuInfo
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None

    @property
    def kind(self) -> str:
        return "gpu" if self.gpus else "cpu"

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    @property
    def spec_name(self) -> str | None:
        return self.gpus[0].spec_name if self.gpus else "cpu-host"

    @property
    def name(self) -> str:
        """What this machine's runs are stored under: its built-in spec's name, or an unknown
        GPU's own name (never taken for the CPU host)."""
        return self.spec_name or self.gpus[0].name


def _nvml() -> Any | None:
    """Initialised pynvml, or None: no NVIDIA driver is the normal case, not an error."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, NVMLError (library or driver missing), OSError
        return None


def _detect_gpus() -> tuple[list[GpuInfo], str | None]:
    nvml = _nvml()
    if nvml is None:
        return [], None
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = str(nvml.nvmlDeviceGetName(handle))  # str since nvidia-ml-py 11.515
            total = nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
            gpus.append(GpuInfo(name, round(total, 2), match_gpu_name(name)))
        return gpus, str(nvml.nvmlSystemGetDriverVersion())
    except Exception:
        return [], None
    finally:
        nvml.nvmlShutdown()


def _detect_cpu() -> CpuInfo:
    cpuinfo, meminfo = (Path(p).read_text() if Path(p).is_file() else ""
                        for p in ("/proc/cpuinfo", "/proc/meminfo"))
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    # Physical cores are the distinct (socket, core) pairs; hyperthreads share a pair.
    ids = [dict(re.findall(r"^(physical id|core id)\s*:\s*(\d+)", block, re.M))
           for block in cpuinfo.split("\n\n")]
    cores = {(i["physical id"], i["core id"]) for i in ids if len(i) == 2}
    logical = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    mem = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo, re.M)
    return CpuInfo(
        model=model.group(1).strip() if model else (platform.processor() or "unknown"),
        physical_cores=len(cores) or logical,
        logical_threads=logical,
        usable_threads=usable,
        memory_gb=round(int(mem.group(1)) / 2**20, 2) if mem else 0.0,
        avx512="avx512f" in flags,
        avx512_bf16="avx512_bf16" in flags,
    )


def detect() -> DetectedHardware:
    gpus, driver = _detect_gpus()
    return DetectedHardware(cpu=_detect_cpu(), gpus=gpus, driver_version=driver)


def energy_joules(times: Sequence[float], watts: Sequence[float]) -> float:
    """Trapezoid integral of power over time; samples are not evenly spaced under load."""
    if len(times) != len(watts):
        raise ValueError(f"times and watts differ in length: {len(times)} != {len(watts)}")
    return sum((t1 - t0) * (w0 + w1) / 2
               for t0, t1, w0, w1 in zip(times, times[1:], watts, watts[1:]))


def summarize_samples(samples: Sequence[tuple[float, float, float, float]]) -> dict[str, float]:
    """Summary of (time s, utilization %, memory used GiB, power W) samples; {} for none."""
    if not samples:
        return {}
    t, util, mem, watts = (list(col) for col in zip(*samples))
    return {
        "samples": len(samples),
        "duration_s": t[-1] - t[0],
        "util_mean_pct": sum(util) / len(util),
        "util_max_pct": max(util),
        "mem_max_gb": max(mem),
        "power_mean_w": sum(watts) / len(watts),
        "energy_j": energy_joules(t, watts),
    }


class GpuSampler:
    """Samples NVIDIA GPUs on a background thread while in a `with` block. Across devices,
    utilization is averaged and memory and power are summed (energy is what the run cost).
    Without NVIDIA it does nothing and summary() is {}."""

    def __init__(self, interval_s: float = 0.1, indices: list[int] | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.interval_s, self.indices = interval_s, indices
        self.samples: list[tuple[float, float, float, float]] = []
        self._nvml: Any | None = None
        self._handles: list[Any] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        self._nvml = _nvml()
        if self._nvml is not None:
            indices = self.indices or range(self._nvml.nvmlDeviceGetCount())
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        nvml, handles = self._nvml, self._handles
        try:
            while True:
                util = [nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
                mem = sum(nvml.nvmlDeviceGetMemoryInfo(h).used for h in handles) / 2**30
                watts = sum(nvml.nvmlDeviceGetPowerUsage(h) for h in handles) / 1000  # mW
                self.samples.append((time.perf_counter(), sum(util) / len(util), mem, watts))
                # One more sample after stop, so the tail of the run counts toward energy.
                if self._stop.is_set():
                    break
                self._stop.wait(self.interval_s)
        except Exception:
            pass  # a device that stops answering ends sampling, not the run being measured

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None

    def summary(self) -> dict[str, float]:
        return summarize_samples(self.samples)


@dataclass
class CpuMeasurement:
    read_bandwidth_gbs: float
    matmul_tflops_fp32: float
    matmul_tflops_bf16: float
    threads: int


def measure_cpu(seconds: float = 3.0, threads: int | None = None) -> CpuMeasurement:
    """Read bandwidth (sum over 256 MiB fp32) and 1024^3 matmul throughput, in about `seconds`."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")

    def best_time(fn: Any, deadline: float) -> float:
        # Best, not mean: on a shared machine noise only ever adds time. Run 1 also warms up.
        best, runs = float("inf"), 0
        while runs < 2 or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            fn()
            best, runs = min(best, time.perf_counter() - t0), runs + 1
        return best

    start, previous = time.perf_counter(), torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        # 256 MiB dwarfs any last-level cache, so sum() streams from DRAM.
        big = torch.ones(64 * 2**20, dtype=torch.float32)
        read = best_time(big.sum, start + seconds * 0.5)
        bandwidth = big.numel() * big.element_size() / read / 1e9
        del big
        n, tflops = 1024, {}
        for dtype, share in ((torch.float32, 0.75), (torch.bfloat16, 1.0)):
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            best = best_time(lambda: torch.mm(a, b), start + seconds * share)
            tflops[dtype] = 2 * n**3 / best / 1e12
        return CpuMeasurement(bandwidth, tflops[torch.float32], tflops[torch.bfloat16],
                              threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(previous)


def host_spec(measurement: CpuMeasurement, detected: DetectedHardware,
              dirs: list[Path] | None = None) -> HardwareSpec:
    """The cpu-host spec with this machine's memory size and measured rates (price kept)."""
    base = get_spec("cpu-host", dirs)
    fields = base.model_dump() | {
        "memory_gb": detected.cpu.memory_gb or base.memory_gb,  # 0 where /proc/meminfo is absent
        "memory_bandwidth_gbs": measurement.read_bandwidth_gbs,
        "peak_tflops": base.peak_tflops | {"fp32": measurement.matmul_tflops_fp32,
                                           "bf16": measurement.matmul_tflops_bf16},
        "measured": True,
        "source": f"measured on {detected.cpu.model} with {measurement.threads} threads",
    }
    # Validated again, so a zero or negative measurement is an error rather than a spec.
    return _validate(fields, "cpu-host measured on this machine")
