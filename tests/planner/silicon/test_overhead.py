"""The framework overheads fitted from end-to-end rows: recovered where they are known, robust
to a row the kernels cannot explain, never negative, and held out by model on request."""

from __future__ import annotations

import numpy as np
import pytest

from planner.silicon.overhead import Baseline, fit_by_backend, fit_overheads


def _rows(model: str, per_step: float, per_seq: float, per_request: float, n: int = 30,
          backend: str = "vllm") -> list[Baseline]:
    rng = np.random.default_rng(len(model))
    rows = []
    for _ in range(n):
        batch, steps = float(rng.integers(1, 200)), float(rng.integers(1, 20))
        tpot, ttft = float(rng.uniform(0.005, 0.03)), float(rng.uniform(0.05, 1.0))
        rows.append(Baseline(backend, model, ttft + per_request + per_step * steps,
                             tpot + per_step + per_seq * batch, ttft, tpot, batch, steps))
    return rows


def test_known_overheads_are_recovered():
    fitted = fit_overheads(_rows("a", 2e-3, 1e-5, 0.05))
    assert fitted.per_step_s == pytest.approx(2e-3, rel=1e-3)
    assert fitted.per_seq_s == pytest.approx(1e-5, rel=1e-2)
    assert fitted.per_request_s == pytest.approx(0.05, rel=1e-3)
    assert fitted.rows == 30 and fitted.models == ("a",)


def test_a_row_the_kernels_cannot_explain_barely_moves_the_fit():
    rows = _rows("a", 2e-3, 0.0, 0.0)
    rows.append(Baseline("vllm", "b", 0.1, 0.005, 0.1, 0.04, 64, 3))  # predicted 8x too slow
    assert fit_overheads(rows).per_step_s == pytest.approx(2e-3, rel=0.05)


def test_kernels_already_too_slow_give_no_negative_overhead():
    fitted = fit_overheads([Baseline("vllm", "a", 0.1, 0.01, 0.2, 0.02, 8, 2)] * 5)
    assert fitted.per_step_s == 0.0 and fitted.per_seq_s == 0.0 and fitted.per_request_s == 0.0


def test_fits_are_per_backend_and_leave_out_the_model_asked():
    rows = _rows("a", 1e-3, 0.0, 0.0) + _rows("b", 3e-3, 0.0, 0.0) + _rows("a", 5e-3, 0.0, 0.0, backend="sglang")
    held_out = fit_by_backend(rows, exclude_model="a")
    assert set(held_out) == {"vllm"} and held_out["vllm"].models == ("b",)
    assert held_out["vllm"].per_step_s == pytest.approx(3e-3, rel=1e-3)
    assert fit_by_backend(rows)["sglang"].per_step_s == pytest.approx(5e-3, rel=1e-3)
