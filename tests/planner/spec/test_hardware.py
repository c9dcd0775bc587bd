"""Hardware specs, detection, GPU sampling (no-op path and a fake NVML) and the CPU benchmark."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from planner.spec import hardware
from planner.spec.hardware import (
    BUILTIN_DIR,
    CpuMeasurement,
    GpuSampler,
    HardwareSpecError,
    detect,
    energy_joules,
    get_spec,
    host_spec,
    load_spec_file,
    load_specs,
    match_gpu_name,
    measure_cpu,
    summarize_samples,
)

REQUIRED = {"h100-sxm", "h200", "a100-40gb", "a100-80gb", "l40s", "l4", "a10g", "t4", "mi300x",
            "cpu-host"}

VALID = {
    "name": "my-gpu",
    "vendor": "nvidia",
    "kind": "gpu",
    "memory_gb": 24,
    "memory_bandwidth_gbs": 500,
    "peak_tflops": {"bf16": 100, "fp16": 100},
    "interconnect": {"kind": "pcie4", "bandwidth_gbs": 64},
    "max_devices_per_node": 4,
    "price_per_hour_usd": 1.0,
    "price_source": "test",
    "source": "test",
}


def write(directory: Path, stem: str, fields: object) -> Path:
    path = directory / f"{stem}.yaml"
    path.write_text(fields if isinstance(fields, str) else yaml.safe_dump(fields))
    return path


# --- spec files ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(BUILTIN_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_builtin_file_loads_and_is_named_by_its_stem(path):
    spec = load_spec_file(path)
    assert spec.name == path.stem
    assert spec.source and spec.price_source


def test_required_entries_present():
    assert REQUIRED <= set(load_specs())


def test_spec_numbers_are_sane():
    s = load_specs()
    assert s["h100-sxm"].peak_tflops["bf16"] > s["a100-80gb"].peak_tflops["bf16"] > \
        s["t4"].peak_tflops["fp16"]
    assert s["h200"].memory_gb == 141
    assert s["h200"].memory_bandwidth_gbs > s["h100-sxm"].memory_bandwidth_gbs
    assert s["a100-80gb"].memory_bandwidth_gbs > s["a100-40gb"].memory_bandwidth_gbs
    assert s["mi300x"].vendor == "amd" and s["mi300x"].memory_gb == 192
    assert s["cpu-host"].kind == "cpu" and s["cpu-host"].measured
    for spec in s.values():
        if spec.kind == "gpu":
            # Dense numbers: no datasheet lists a dense bf16 peak above ~2.5 PFLOPS for these.
            assert 5 < spec.peak_tflops["bf16"] < 2500, spec.name
            assert 100 < spec.memory_bandwidth_gbs < 10_000, spec.name
            assert spec.interconnect is not None and spec.price_per_hour_usd > 0
            # fp8 and int8 run at least as fast as bf16 wherever the device has them.
            for fast in ("fp8", "int8"):
                assert spec.peak_tflops.get(fast, 1e9) >= spec.peak_tflops["bf16"], spec.name


def test_user_dir_adds_and_overrides(tmp_path):
    write(tmp_path, "my-gpu", VALID)
    cheaper = load_specs()["t4"].model_dump() | {"price_per_hour_usd": 0.1}
    write(tmp_path, "t4", cheaper)
    specs = load_specs([tmp_path])
    assert specs["my-gpu"].memory_gb == 24
    assert specs["t4"].price_per_hour_usd == 0.1
    assert load_specs()["t4"].price_per_hour_usd != 0.1  # the built-in file is untouched
    assert get_spec("my-gpu", [tmp_path]).name == "my-gpu"


def test_get_spec_unknown_lists_known_names():
    with pytest.raises(HardwareSpecError, match="known: .*h100-sxm"):
        get_spec("h900")


def test_missing_user_dir_is_an_error(tmp_path):
    with pytest.raises(HardwareSpecError, match="does not exist"):
        load_specs([tmp_path / "nope"])


@pytest.mark.parametrize("stem, content, expected", [
    ("my-gpu", VALID | {"memory_gb": -1}, ["memory_gb", "-1"]),
    ("my-gpu", VALID | {"bogus_field": 3}, ["bogus_field"]),
    ("my-gpu", VALID | {"peak_tflops": {"fp16": 100}}, ["peak_tflops", "bf16"]),
    ("my-gpu", VALID | {"peak_tflops": {"bf16": 100, "fp16": 0}}, ["peak_tflops.fp16"]),
    ("my-gpu", VALID | {"peak_tflops": {"bf16": 100, "fp4": 9}}, ["peak_tflops.fp4"]),
    ("my-gpu", VALID | {"vendor": "intel"}, ["vendor", "intel"]),
    ("my-gpu", VALID | {"interconnect": None}, ["interconnect"]),
    ("my-gpu", VALID | {"max_devices_per_node": 0}, ["max_devices_per_node"]),
    ("my-gpu", {k: v for k, v in VALID.items() if k != "price_source"}, ["price_source"]),
    ("other-name", VALID, ["name", "my-gpu", "other-name"]),
    ("my-gpu", "- just\n- a list\n", ["mapping", "list"]),
    ("my-gpu", "name: [unclosed\n", ["YAML"]),
], ids=["negative-memory", "unknown-field", "missing-bf16", "zero-peak", "unknown-dtype",
        "bad-vendor", "gpu-without-interconnect", "zero-devices", "missing-field",
        "name-not-stem", "not-a-mapping", "invalid-yaml"])
def test_bad_files_name_path_and_field(tmp_path, stem, content, expected):
    path = write(tmp_path, stem, content)
    with pytest.raises(HardwareSpecError) as info:
        load_specs([tmp_path])
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message
    assert isinstance(info.value, ValueError)


# --- detection ----------------------------------------------------------------------------


@pytest.mark.parametrize("nvml_name, spec", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 PCIe", None),
    ("NVIDIA H100 NVL", None),
    ("NVIDIA H200", "h200"),
    ("NVIDIA H200 NVL", None),
    ("NVIDIA GH200 480GB", None),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA L40", None),
    ("NVIDIA L4", "l4"),
    ("NVIDIA A10G", "a10g"),
    ("NVIDIA A10", None),
    ("Tesla T4", "t4"),
    ("NVIDIA GeForce RTX 4090", None),
    ("Tesla V100-SXM2-16GB", None),
])
def test_match_gpu_name(nvml_name, spec):
    assert match_gpu_name(nvml_name) == spec


def test_detect_on_this_machine_never_raises():
    found = detect()
    assert found.cpu.physical_cores >= 1
    assert found.cpu.logical_threads >= found.cpu.physical_cores
    assert 1 <= found.cpu.usable_threads <= found.cpu.logical_threads
    assert found.cpu.memory_gb > 0
    assert found.cpu.model
    if not found.gpus:  # the CPU path: what this machine (no NVIDIA) takes
        assert found.kind == "cpu" and found.spec_name == "cpu-host"
        assert found.driver_version is None and found.gpu_count == 0


def test_missing_pynvml_is_the_normal_case(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    assert hardware._nvml() is None
    assert detect().kind == "cpu"


class FakeNvml:
    """The few pynvml calls the module makes, for two H100s."""

    def __init__(self) -> None:
        self.shutdowns = 0

    def nvmlShutdown(self): self.shutdowns += 1
    def nvmlDeviceGetCount(self): return 2
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetName(self, h): return "NVIDIA H100 80GB HBM3"
    def nvmlSystemGetDriverVersion(self): return "550.54.15"
    def nvmlDeviceGetMemoryInfo(self, h): return SimpleNamespace(total=80 * 2**30, used=2**30)
    def nvmlDeviceGetUtilizationRates(self, h): return SimpleNamespace(gpu=40 + 20 * h)
    def nvmlDeviceGetPowerUsage(self, h): return 300_000  # mW


def test_detect_gpu_path_with_fake_nvml(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setattr(hardware, "_nvml", lambda: fake)
    found = detect()
    assert found.kind == "gpu" and found.gpu_count == 2
    assert found.gpus[0].memory_gb == 80 and found.spec_name == "h100-sxm"
    assert found.driver_version == "550.54.15" and fake.shutdowns == 1
    assert found.name == "h100-sxm"


def test_an_unknown_gpu_is_stored_under_its_own_name_not_the_cpu_hosts(monkeypatch, tmp_path):
    class UnknownGpu(FakeNvml):
        def nvmlDeviceGetName(self, h): return "NVIDIA RTX PRO 9000"

    monkeypatch.setattr(hardware, "_nvml", UnknownGpu)
    found = detect()
    assert found.spec_name is None and found.name == "NVIDIA RTX PRO 9000"
    # Stored so, its runs cannot be priced until a spec describes it, and the error says so.
    from planner.costmodel.fit_data import hardware_rates
    from planner.store.database import Store
    from planner.store.records import hardware_row

    row = hardware_row(Store(f"sqlite:///{tmp_path / 'pilot.db'}"))
    assert row.kind == "gpu" and row.spec_name == "NVIDIA RTX PRO 9000"
    with pytest.raises(ValueError, match="no spec named 'NVIDIA RTX PRO 9000' in profiles/hardware"):
        hardware_rates(row)
    monkeypatch.setattr(hardware, "_nvml", lambda: None)
    assert detect().name == "cpu-host"


# --- GPU sampling -------------------------------------------------------------------------


def test_gpu_sampler_is_a_no_op_without_nvidia(monkeypatch):
    monkeypatch.setattr(hardware, "_nvml", lambda: None)
    with GpuSampler(interval_s=0.01) as sampler:
        time.sleep(0.03)
    assert sampler.summary() == {}


def test_gpu_sampler_with_fake_nvml(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setattr(hardware, "_nvml", lambda: fake)
    with GpuSampler(interval_s=0.01) as sampler:
        time.sleep(0.1)
    summary = sampler.summary()
    assert summary["samples"] >= 3
    assert summary["util_mean_pct"] == 50 and summary["util_max_pct"] == 50  # mean of 40, 60
    assert summary["mem_max_gb"] == 2  # summed over both devices
    assert summary["power_mean_w"] == 600
    assert summary["energy_j"] == pytest.approx(600 * summary["duration_s"])
    assert fake.shutdowns == 1


def test_gpu_sampler_rejects_bad_interval():
    with pytest.raises(ValueError, match="interval_s"):
        GpuSampler(interval_s=0)


def test_energy_joules_trapezoid():
    assert energy_joules([0, 1, 2], [100, 100, 100]) == pytest.approx(200)
    assert energy_joules([0, 1], [0, 100]) == pytest.approx(50)  # a ramp: the area of a triangle
    assert energy_joules([0, 0.5, 2], [100, 200, 0]) == pytest.approx(75 + 150)  # uneven spacing
    assert energy_joules([5], [300]) == 0
    assert energy_joules([], []) == 0
    with pytest.raises(ValueError, match="length"):
        energy_joules([0, 1], [100])


def test_summarize_samples():
    assert summarize_samples([]) == {}
    summary = summarize_samples([(10, 20, 1.0, 100), (11, 80, 3.0, 300)])
    assert summary == {"samples": 2, "duration_s": 1, "util_mean_pct": 50, "util_max_pct": 80,
                       "mem_max_gb": 3.0, "power_mean_w": 200, "energy_j": 200}


# --- CPU benchmark ------------------------------------------------------------------------


def test_measure_cpu_is_quick_and_sane():
    threads_before = torch.get_num_threads()
    # Quick: about `seconds`, plus at most the two runs each of its three timings must make
    # (bf16 where emulated is the slowest work), whatever this host's speed.
    torch.set_num_threads(1)
    a = torch.randn(1024, 1024).bfloat16()
    began = time.perf_counter()
    torch.mm(a, a)
    slowest = time.perf_counter() - began
    torch.set_num_threads(threads_before)
    start = time.perf_counter()
    m = measure_cpu(seconds=1, threads=1)
    assert time.perf_counter() - start < 1.5 + 6 * slowest
    assert torch.get_num_threads() == threads_before
    assert m.threads == 1
    assert 1 < m.read_bandwidth_gbs < 2000
    assert 0.001 < m.matmul_tflops_fp32 < 100
    assert 0.0001 < m.matmul_tflops_bf16 < 100
    assert CpuMeasurement(**asdict(m)) == m


def test_measure_cpu_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seconds"):
        measure_cpu(seconds=0)
    with pytest.raises(ValueError, match="threads"):
        measure_cpu(seconds=1, threads=0)


def test_host_spec_fills_in_measurements():
    m = CpuMeasurement(read_bandwidth_gbs=42.0, matmul_tflops_fp32=0.2, matmul_tflops_bf16=0.8,
                       threads=2)
    found = detect()
    spec = host_spec(m, found)
    base = get_spec("cpu-host")
    assert spec.name == "cpu-host" and spec.measured
    assert spec.memory_bandwidth_gbs == 42.0
    assert spec.peak_tflops["fp32"] == 0.2 and spec.peak_tflops["bf16"] == 0.8
    assert spec.memory_gb == found.cpu.memory_gb
    assert spec.price_per_hour_usd == base.price_per_hour_usd
    with pytest.raises(HardwareSpecError, match="memory_bandwidth_gbs"):
        host_spec(CpuMeasurement(0.0, 0.2, 0.8, 2), found)
