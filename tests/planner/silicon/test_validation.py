"""Replaying the silicon sample's measured serving runs: the rows pilot can express, and a
row replayed as its backend schedules it, from the measured kernels alone (no overheads)."""

from __future__ import annotations

import pytest

# The measured rows and kernels: installed by the test extra.
pytest.importorskip("aiconfigurator_core")

from planner.silicon.validation import expressible_rows, predict_row  # noqa: E402

SGLANG_QWEN_C64 = "qwen_qwen3_32b_qwen_qwen3_32b_h100_sxm_sglang_agg_1024x128_c64_tp4_epnone_5"


@pytest.fixture(scope="module")
def rows():
    return {row.id: row for row in expressible_rows()}


def test_expressible_rows_are_dense_llama_family_runs_on_h100_and_h200(rows):
    assert len(rows) > 500
    assert {r.gpu for r in rows.values()} == {"h100-sxm", "h200"}
    assert {r.backend for r in rows.values()} == {"vllm", "sglang", "trtllm"}
    assert all(r.concurrency >= 1 and r.ttft_s > 0 and r.tpot_s > 0 for r in rows.values())


def test_sglang_groups_of_clients_stay_in_step_and_wait_for_each_others_prefills(rows):
    """SGLang serves prefills before decodes, so 64 clients started at once stay one group: each
    request waits for about half the group's prefills. Kernels alone come within 25% of the
    measured TTFT and TPOT (measured 1.32 s and 19.8 ms)."""
    row = rows[SGLANG_QWEN_C64]
    prediction = predict_row(row)
    assert prediction.ttft_s == pytest.approx(row.ttft_s, rel=0.25)
    assert prediction.tpot_s == pytest.approx(row.tpot_s, rel=0.25)
    # A lone prefill of 1024 tokens is a few tens of milliseconds: the wait is the group's.
    assert prediction.steps_to_first_token > 5
