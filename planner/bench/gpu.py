"""`pilot bench gpu`: pilot's GPU predictions against serving runs measured on real GPUs
(aiconfigurator-core's silicon sample), which nothing it predicts with was fitted on.

Kernel times come from the backend's measured kernels on that GPU. The framework overheads
(planner/silicon/overhead.py) are the one part fitted on end-to-end rows, so each model's rows
are predicted with overheads fitted on the other models' rows only (leave one model out), and
the report names which rows trained each.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from planner.silicon.calibration import GpuCalibration, held_out_errors
from planner.silicon.overhead import Overheads, fit_by_backend
from planner.silicon.tables import package_version
from planner.silicon.validation import WAVES, RowPrediction, SiliconRow, expressible_rows, predict_row

TARGETS = {"tpot": (0.10, 0.25), "ttft": (0.20, 0.45)}  # (median, p90) absolute percentage error
# Published accuracy of peer simulators, printed beside ours.
PEERS = [
    ("Vidur (its paper, MLSys 2024)", "< 9% error claimed on its own traces"),
    ("Vidur (independent evaluation)", "619% median end-to-end latency error"),
    ("best simulator of that evaluation", "11.8% end-to-end, 22.8% TTFT MAPE"),
]
Progress = Callable[[str, int, int], None]


@dataclass
class GpuBenchResult:
    predictions: list[RowPrediction]
    held_out: dict[str, dict[str, Overheads]]  # model -> backend -> overheads fitted without it
    calibration: GpuCalibration  # overheads fitted on every row, held-out errors: what recommend uses
    rankings: dict[str, tuple[int, int]] = field(default_factory=dict)  # check -> (agreed, pairs)

    def errors(self, metric: str, rows: Sequence[RowPrediction] | None = None) -> tuple[float, float, int]:
        rows = self.predictions if rows is None else rows
        apes = np.array([p.tpot_ape if metric == "tpot" else p.ttft_ape for p in rows])
        if not len(apes):
            return float("nan"), float("nan"), 0
        return float(np.median(apes)), float(np.quantile(apes, 0.9)), len(apes)

    def groups(self) -> list[tuple[str, list[RowPrediction]]]:
        """(label, rows) per GPU, per backend, per model, then overall."""
        out = []
        for label, key in (("gpu", lambda p: p.row.gpu), ("backend", lambda p: p.row.backend),
                           ("model", lambda p: p.row.model.split("/")[-1])):
            for value in sorted({key(p) for p in self.predictions}):
                out.append((f"{label} {value}", [p for p in self.predictions if key(p) == value]))
        out.append(("overall", list(self.predictions)))
        return out

    def meets_targets(self) -> bool:
        return all(self.errors(m)[0] <= lo and self.errors(m)[1] <= hi for m, (lo, hi) in TARGETS.items())


def _run(job: tuple[SiliconRow, Overheads, int]) -> RowPrediction:
    row, overheads, waves = job
    return predict_row(row, overheads, waves)


def _map(jobs: list[tuple[SiliconRow, Overheads, int]], workers: int, stage: str,
         on_progress: Progress | None) -> list[RowPrediction]:
    out: list[RowPrediction] = []
    if workers <= 1:
        results = map(_run, jobs)
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_run, jobs, chunksize=4)
    for i, result in enumerate(results):
        out.append(result)
        if on_progress:
            on_progress(stage, i + 1, len(jobs))
    if workers > 1:
        pool.shutdown()
    return out


def run_gpu_benchmark(rows: Sequence[SiliconRow] | None = None, waves: int = WAVES,
                      workers: int | None = None, on_progress: Progress | None = None) -> GpuBenchResult:
    rows = list(expressible_rows() if rows is None else rows)
    workers = workers or os.cpu_count() or 1
    baselines = _map([(r, Overheads(), waves) for r in rows], workers, "kernels only", on_progress)
    base = [p.baseline() for p in baselines]
    models = sorted({r.model for r in rows})
    held_out = {m: fit_by_backend(base, exclude_model=m) for m in models}
    jobs = [(r, held_out[r.model].get(r.backend, Overheads()), waves) for r in rows]
    predictions = _map(jobs, workers, "held-out overheads", on_progress)
    result = GpuBenchResult(predictions, held_out, calibrate(base, predictions))
    result.rankings = rankings(predictions)
    return result


def calibrate(baselines, predictions: Sequence[RowPrediction]) -> GpuCalibration:
    """Overheads fitted on every row, with the errors of the held-out predictions."""
    errors: dict[str, dict[str, list[float]]] = {}
    accuracy: dict[str, dict[str, dict[str, float]]] = {}
    for backend in [*sorted({p.row.backend for p in predictions}), "all"]:
        rows = [p for p in predictions if backend in ("all", p.row.backend)]
        errors[backend], accuracy[backend] = {}, {}
        for metric in ("ttft", "tpot"):
            measured = np.array([getattr(p.row, f"{metric}_s") for p in rows])
            predicted = np.array([getattr(p, f"{metric}_s") for p in rows])
            errors[backend][metric], accuracy[backend][metric] = held_out_errors(measured, predicted)
    source = (f"aiconfigurator-core {package_version()}, systems/silicon_sample.csv: {len(predictions)} "
              "rows (dense Llama-family models on H100/H200); errors of each model's rows predicted "
              "with overheads fitted on the other models'; written by `pilot bench gpu --save`")
    return GpuCalibration(fit_by_backend(baselines), errors, accuracy, source)


def rankings(predictions: Sequence[RowPrediction]) -> dict[str, tuple[int, int]]:
    """Pairs of rows alike but for one knob (the GPU, or tensor parallelism): how often the
    predicted TPOT orders them as the measured one does (pairs measured within 3% are ties and
    skipped)."""
    out = {}
    for name, knob in (("H100 vs H200", lambda r: r.system), ("TP 1/2/4/8", lambda r: r.tensor_parallel_size)):
        groups: dict[tuple, list[RowPrediction]] = {}
        for p in predictions:
            r = p.row
            key = (r.model, r.backend, r.quantization, r.input_tokens, r.output_tokens, r.concurrency,
                   r.system if name.startswith("TP") else r.tensor_parallel_size)
            groups.setdefault(key, []).append(p)
        agreed = total = 0
        for members in groups.values():
            for a, b in itertools.combinations(members, 2):
                if knob(a.row) == knob(b.row) or abs(a.row.tpot_s / b.row.tpot_s - 1) < 0.03:
                    continue
                total += 1
                agreed += (a.row.tpot_s < b.row.tpot_s) == (a.tpot_s < b.tpot_s)
        out[name] = (agreed, total)
    return out
