"""In a container the engine sizes its threads and KV cache by the container's limits (its
cgroup), not the node's: the files below are laid out as the kernel's cgroup v1 and v2
interfaces show them inside a pod."""

from __future__ import annotations

import os
from pathlib import Path

from engine.device import available_host_memory, cgroup_cpu_quota, cgroup_memory_free, usable_cpus

GiB = 2**30


def _files(root: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return str(root)


def test_a_cgroup_v2_limit_caps_memory_and_threads(tmp_path):
    root = _files(tmp_path, {"memory.max": str(1 * GiB), "memory.current": str(GiB // 4),
                             "cpu.max": "150000 100000"})  # 1.5 CPUs
    assert cgroup_memory_free(root) == GiB - GiB // 4
    assert available_host_memory(root) == min(GiB - GiB // 4, available_host_memory(str(tmp_path / "none")))
    assert cgroup_cpu_quota(root) == 1.5
    assert usable_cpus(root) == min(2, len(os.sched_getaffinity(0)))


def test_cgroup_v1_limits_are_read_and_its_no_limit_values_ignored(tmp_path):
    limited = _files(tmp_path / "a", {"memory/memory.limit_in_bytes": str(512 * 2**20),
                                      "memory/memory.usage_in_bytes": str(100 * 2**20),
                                      "cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_memory_free(limited) == 412 * 2**20 and usable_cpus(limited) == 1
    unlimited = _files(tmp_path / "b", {"memory/memory.limit_in_bytes": str(2**63 - 4096),
                                        "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_memory_free(unlimited) is None and cgroup_cpu_quota(unlimited) is None
    assert usable_cpus(unlimited) == len(os.sched_getaffinity(0))


def test_no_limit_means_the_host(tmp_path):
    root = _files(tmp_path, {"memory.max": "max", "cpu.max": "max 100000"})
    assert cgroup_memory_free(root) is None and cgroup_cpu_quota(root) is None
    assert usable_cpus(root) == len(os.sched_getaffinity(0))
    assert 0 < available_host_memory(root) <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_usage_past_the_limit_leaves_nothing_rather_than_a_negative(tmp_path):
    root = _files(tmp_path, {"memory.max": str(GiB), "memory.current": str(2 * GiB)})
    assert cgroup_memory_free(root) == 0 and available_host_memory(root) == 0
