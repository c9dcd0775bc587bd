"""The kernel measurements as aiconfigurator-core ships them, read where the package is
installed: the tables reproduce its rows, and what is not there is named."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from planner.silicon import tables
from planner.silicon.tables import KernelDataError, KernelTables, data_root, versions

# The kernel measurements: installed by the test extra (Python 3.11-3.13, as the package allows).
pytest.importorskip("aiconfigurator_core")


def test_the_gemm_table_reproduces_a_measured_row():
    t = KernelTables.load("h100_sxm", "vllm")
    path = data_root() / "data" / "h100_sxm" / "gemm" / "vllm" / t.versions["gemm"] / "gemm_perf.parquet"
    rows = pq.read_table(path).to_pylist()
    row = next(r for r in rows if r["gemm_dtype"] == "bfloat16" and r["n"] == 4096 and r["k"] == 4096
               and r["m"] == 64)
    same = [r["latency"] for r in rows if (r["gemm_dtype"], r["m"], r["n"], r["k"]) == ("bfloat16", 64, 4096, 4096)]
    assert t.gemm_curve("bfloat16", 4096, 4096)(64) == pytest.approx(min(same) * 1e-3)
    assert row["latency"] > 0


def test_a_gemm_between_measured_widths_lies_between_them():
    t = KernelTables.load("h100_sxm", "vllm")
    lo, mid, hi = (t.gemm_curve("bfloat16", n, 4096)(2048) for n in (12288, 14336, 16384))
    assert lo < mid < hi


def test_a_gemm_wider_than_measured_scales_with_its_width():
    t = KernelTables.load("h100_sxm", "vllm")
    widest = float(t.gemm_axes[1][-1])
    assert t.gemm_curve("bfloat16", int(2 * widest), 4096)(4096) == pytest.approx(
        2 * t.gemm_curve("bfloat16", int(widest), 4096)(4096))


def test_attention_surfaces_grow_with_batch_and_context():
    t = KernelTables.load("h100_sxm", "vllm")
    decode = t.attention("generation", 32, 8, 128, "bfloat16")
    assert decode(8, 1000) < decode(64, 1000) < decode(64, 8000)
    prefill = t.attention("context", 32, 8, 128, "bfloat16")
    assert prefill(1, 512) < prefill(1, 4096) < prefill(4, 4096)


def test_an_unmeasured_head_count_borrows_the_nearest_scaled():
    t = KernelTables.load("h100_sxm", "vllm")
    measured = t.attention("generation", 32, 8, 128, "bfloat16")(16, 2048)
    borrowed = t.attention("generation", 28, 7, 128, "bfloat16")(16, 2048)
    assert borrowed == pytest.approx(measured * 7 / 8)


def test_all_reduce_grows_with_message_size():
    curve = KernelTables.load("h100_sxm", "vllm").allreduce_curve(2)
    assert curve(4096) < curve(4096 * 8192)


def test_versions_are_ordered_as_released_and_an_unmeasured_one_is_named():
    there = versions("h100_sxm", "gemm", "sglang")
    assert there == sorted(there, key=tables._version_key) and len(there) >= 1
    with pytest.raises(KernelDataError, match="measured: " + there[0]) as err:
        KernelTables.load("h100_sxm", "sglang", "0.0.1")
    assert err.value.field == "backend_version"


def test_an_unknown_gpu_or_backend_is_named_with_the_known_ones():
    with pytest.raises(KernelDataError, match="h100_sxm") as err:
        KernelTables.load("h900_sxm", "vllm")
    assert err.value.field == "hardware"
    with pytest.raises(KernelDataError, match="vllm, sglang, trtllm"):
        KernelTables.load("h100_sxm", "tgi")


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(tables, "PACKAGE", "aiconfigurator_core_not_installed")
    assert not tables.installed()
    with pytest.raises(KernelDataError, match=r"pip install 'pilot\[gpu\]'"):
        data_root()


def test_unit_conversion_is_milliseconds_to_seconds():
    t = KernelTables.load("h100_sxm", "vllm")
    # A 4096 x 4096 bf16 GEMM at m = 1 reads 32 MiB of weights: tens of microseconds at HBM speed.
    assert 5e-6 < t.gemm_curve("bfloat16", 4096, 4096)(1) < 1e-4
    assert np.isfinite(t.gemm["bfloat16"]).mean() > 0.9
