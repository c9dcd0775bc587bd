"""Kernel timings measured on real GPUs, read from NVIDIA's `aiconfigurator-core` package
(Apache-2.0) where it is installed: `aiconfigurator_core/systems/data/<gpu>/<op>/<backend>/
<version>/*.parquet`. Nothing is copied into this repository; `pip install 'pilot[gpu]'` brings it.

Units there: latency in milliseconds per call (attention: per layer); an all-reduce's message
size in elements of its dtype (tokens x hidden), as aiconfigurator's own models query it.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from planner.silicon.grid import Curve, Surface
from planner.spec.errors import FieldError

PACKAGE = "aiconfigurator_core"
INSTALL = "pip install 'pilot[gpu]'  (or: pip install aiconfigurator-core)"
BACKENDS = ("vllm", "sglang", "trtllm")
# Pilot's spec name -> aiconfigurator's system name, for GPUs it has kernel measurements of.
SYSTEMS = {"h100-sxm": "h100_sxm", "h200": "h200_sxm", "a100-80gb": "a100_sxm", "l40s": "l40s"}
MS = 1e-3


class KernelDataError(FieldError):
    """Kernel measurements that are not installed, or not there for what was asked."""


def installed() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None


def data_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KernelDataError(f"GPU kernel measurements need the aiconfigurator-core package: {INSTALL}",
                              field="hardware")
    return Path(next(iter(spec.submodule_search_locations))) / "systems"


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    from importlib.metadata import version

    return version("aiconfigurator-core")


def _version_key(text: str) -> tuple:
    """Orders "0.5.6.post2" < "0.5.14" < "1.3.0rc20" by their numbers, as humans read them."""
    return tuple(int(part) if part.isdigit() else -1 for part in re.findall(r"\d+|[a-z]+", text))


def versions(system: str, op: str, backend: str) -> list[str]:
    """Backend versions with measurements of `op` on `system`, oldest first."""
    folder = data_root() / "data" / system / op / backend
    found = [p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.parquet"))] if folder.is_dir() else []
    return sorted(found, key=_version_key)


def pick_version(system: str, op: str, backend: str, wanted: str | None) -> str:
    """`wanted` where measured, else (None asked) the newest; an unmeasured version is an error
    that names the measured ones."""
    there = versions(system, op, backend)
    if not there:
        raise KernelDataError(f"no {op} measurements of {backend} on {system} in aiconfigurator-core "
                              f"{package_version()}", field="backend")
    if wanted is None:
        return there[-1]
    if wanted not in there:
        raise KernelDataError(f"{backend} {wanted!r} has no {op} measurements on {system}; measured: "
                              f"{', '.join(there)}", field="backend_version")
    return wanted


def _read(path: Path, columns: list[str], optional: dict[str, object] | None = None) -> dict[str, np.ndarray]:
    """`columns` of a parquet file; those in `optional` take its value where a table (an older
    collection) lacks them."""
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path).names)
    defaults = optional or {}
    table = pq.read_table(path, columns=[c for c in columns if c in present])
    out = {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns if c in present}
    for c in columns:
        if c not in present:
            if c not in defaults:
                raise KernelDataError(f"{path}: no column {c!r}", field="hardware")
            out[c] = np.full(table.num_rows, defaults[c])
    return out


def _attention_key(heads: int, kv_heads: int, head_dim: int, kv_dtype: str) -> tuple[int, int, int, str]:
    return int(heads), int(kv_heads), int(head_dim), str(kv_dtype)


@dataclass
class KernelTables:
    """One backend's kernels on one GPU: GEMMs, prefill and decode attention, all-reduce."""

    system: str
    backend: str
    versions: dict[str, str]  # op -> backend version measured
    gemm: dict[str, np.ndarray]  # dtype -> seconds over [m, n, k] (NaN: not measured)
    gemm_axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    context: dict[tuple[int, int, int, str], Surface]  # (heads, kv heads, head dim, kv dtype)
    generation: dict[tuple[int, int, int, str], Surface]
    allreduce: dict[int, Curve] = field(default_factory=dict)  # GPUs -> seconds over elements

    @property
    def source(self) -> str:
        ops = ", ".join(f"{op} {v}" for op, v in sorted(self.versions.items()))
        return f"aiconfigurator-core {package_version()}: {self.backend} on {self.system} ({ops})"

    @classmethod
    def load(cls, system: str, backend: str, version: str | None = None) -> KernelTables:
        return _load(system, backend, version)

    def gemm_curve(self, dtype: str, n: int, k: int) -> Curve:
        """A GEMM's latency against m for this n and k: interpolated between measured n and k
        in log space, and in proportion to n (or k) past the largest measured."""
        if dtype not in self.gemm:
            raise KernelDataError(f"no {dtype} GEMM measurements for {self.backend} on {self.system}; "
                                  f"measured: {', '.join(sorted(self.gemm))}", field="quantization")
        ms, ns, ks = self.gemm_axes
        logs = np.log(self.gemm[dtype])
        total = np.zeros(len(ms))
        scale = 1.0
        for axis, value in ((ns, n), (ks, k)):
            if value > axis[-1]:
                scale *= value / axis[-1]
        for (i, wi) in _weights(ns, n):
            for (j, wj) in _weights(ks, k):
                total = total + wi * wj * logs[:, i, j]
        return Curve(ms.astype(float), np.exp(total) * scale)

    def attention(self, phase: str, heads: int, kv_heads: int, head_dim: int, kv_dtype: str) -> Surface:
        """The per-layer attention surface of one rank's heads: prefill ("context": batch x
        prompt length) or decode ("generation": batch x context length)."""
        tables = self.context if phase == "context" else self.generation
        key = _attention_key(heads, kv_heads, head_dim, kv_dtype)
        if key in tables:
            return tables[key]
        # An unmeasured head count: the nearest measured one of the same head size and KV dtype,
        # scaled by heads (prefill's work) or KV heads (decode reads their cache).
        alike = [k for k in tables if k[2] == head_dim and k[3] == kv_dtype]
        if not alike:
            raise KernelDataError(f"no {phase} attention measurements with head_dim={head_dim} and "
                                  f"{kv_dtype} KV cache for {self.backend} on {self.system}", field="model")
        index = 0 if phase == "context" else 1
        nearest = min(alike, key=lambda k: (abs(np.log(k[index] / key[index])), abs(k[0] - heads)))
        ratio = key[index] / nearest[index]
        base = tables[nearest]
        tables[key] = Surface(base.xs, base.ys, base.seconds * ratio, base.work)
        return tables[key]

    def allreduce_curve(self, gpus: int) -> Curve:
        if gpus not in self.allreduce:
            measured = sorted(self.allreduce)
            if not measured:
                raise KernelDataError(f"no all-reduce measurements for {self.backend} on {self.system}",
                                      field="tensor_parallel_size")
            # More GPUs than measured: the most measured, a lower bound on the time.
            return self.allreduce[max(g for g in measured if g <= gpus) if min(measured) <= gpus else min(measured)]
        return self.allreduce[gpus]


def _weights(axis: np.ndarray, value: float) -> list[tuple[int, float]]:
    if value <= axis[0]:
        return [(0, 1.0)]
    if value >= axis[-1]:
        return [(len(axis) - 1, 1.0)]
    hi = int(np.searchsorted(axis, value))
    if axis[hi] == value:
        return [(hi, 1.0)]
    w = (np.log(value) - np.log(axis[hi - 1])) / (np.log(axis[hi]) - np.log(axis[hi - 1]))
    return [(hi - 1, 1.0 - float(w)), (hi, float(w))]


def _decode_work(batch: float, context: float) -> float:
    return batch * context


def _prefill_work(batch: float, length: float) -> float:
    return batch * length * length


@functools.lru_cache(maxsize=16)
def _load(system: str, backend: str, version: str | None) -> KernelTables:
    if backend not in BACKENDS:
        raise KernelDataError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}", field="backend")
    root = data_root() / "data" / system
    if not root.is_dir() or not any(root.iterdir()):
        measured = sorted(p.name for p in (data_root() / "data").iterdir() if (p / "gemm").is_dir())
        raise KernelDataError(f"no kernel measurements of {system!r}; measured: {', '.join(measured)}",
                              field="hardware")
    used: dict[str, str] = {}
    used["gemm"] = pick_version(system, "gemm", backend, version)
    g = _read(root / "gemm" / backend / used["gemm"] / "gemm_perf.parquet", ["gemm_dtype", "m", "n", "k", "latency"])
    ms, ns, ks = (np.unique(g[a]) for a in ("m", "n", "k"))
    gemm = {}
    for dtype in np.unique(g["gemm_dtype"]):
        rows = g["gemm_dtype"] == dtype
        grid = np.full((len(ms), len(ns), len(ks)), np.inf)
        index = (np.searchsorted(ms, g["m"][rows]), np.searchsorted(ns, g["n"][rows]),
                 np.searchsorted(ks, g["k"][rows]))
        np.minimum.at(grid, index, g["latency"][rows] * MS)
        grid[np.isinf(grid)] = np.nan
        gemm[str(dtype)] = grid
    used["attention"] = pick_version(system, "attention", backend, version if version in
                                     versions(system, "attention", backend) else None)
    folder = root / "attention" / backend / used["attention"]
    context = _surfaces(folder / "context_attention_perf.parquet", "isl", _prefill_work)
    generation = _surfaces(folder / "generation_attention_perf.parquet", "step", _decode_work)
    allreduce: dict[int, Curve] = {}
    comm = versions(system, "comm", backend)
    if comm:
        used["all-reduce"] = version if version in comm else comm[-1]
        path = root / "comm" / backend / used["all-reduce"] / "custom_allreduce_perf.parquet"
        if path.exists():
            a = _read(path, ["num_gpus", "message_size", "latency"])
            for gpus in np.unique(a["num_gpus"]):
                rows = a["num_gpus"] == gpus
                sizes, inverse = np.unique(a["message_size"][rows], return_inverse=True)
                fastest = np.full(len(sizes), np.inf)
                np.minimum.at(fastest, inverse, a["latency"][rows] * MS)  # graph-captured beats eager
                allreduce[int(gpus)] = Curve(sizes.astype(float), fastest)
    return KernelTables(system, backend, used, gemm, (ms, ns, ks), context, generation, allreduce)


def _surfaces(path: Path, length: str, work) -> dict[tuple[int, int, int, str], Surface]:
    cols = ["num_heads", "num_key_value_heads", "head_dim", "kv_cache_dtype", "window_size",
            "batch_size", length, "latency"]
    t = _read(path, cols, {"window_size": 0, "kv_cache_dtype": "bfloat16"})
    full = t["window_size"] == 0  # sliding-window variants are other kernels' business
    keys = list(zip(t["num_heads"][full], t["num_key_value_heads"][full], t["head_dim"][full],
                    t["kv_cache_dtype"][full]))
    batch, lengths, seconds = t["batch_size"][full], t[length][full], t["latency"][full] * MS
    out: dict[tuple[int, int, int, str], Surface] = {}
    groups: dict[tuple[int, int, int, str], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(_attention_key(*key), []).append(i)
    for key, rows in groups.items():
        idx = np.array(rows)
        # A decode "step" of s is a context of s + 1 tokens (the new one included).
        xs = lengths[idx] + (1 if length == "step" else 0)
        out[key] = Surface.from_points(batch[idx].astype(float), xs.astype(float), seconds[idx], work)
    return out
