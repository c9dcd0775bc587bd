"""planner.spec.slo: the SLO syntax, latency summaries and goodput."""

from __future__ import annotations

import pytest

from planner.spec.slo import SLO, RequestLatency, SLOError, goodput, meets, parse_slos, request_meets, summarize

# ---- parsing ----

def test_parse_design_example() -> None:
    slos = parse_slos("ttft_p95<=500ms,itl_p95<=50ms,e2e_p99<=10s")
    assert slos == [SLO("ttft", "p95", 0.5), SLO("itl", "p95", 0.05), SLO("e2e", "p99", 10.0)]


def test_whitespace_decimals_and_every_stat() -> None:
    slos = parse_slos(" tpot_mean <= 12.5ms , ttft_p50<=1.5s,ttft_p90<=2s, ttft_p99 <=0.25 s")
    assert [(s.metric, s.stat) for s in slos] == [
        ("tpot", "mean"), ("ttft", "p50"), ("ttft", "p90"), ("ttft", "p99")]
    assert [s.limit_s for s in slos] == pytest.approx([0.0125, 1.5, 2.0, 0.25])


@pytest.mark.parametrize(("slo", "text"), [
    (SLO("ttft", "p95", 0.5), "ttft_p95<=500ms"),
    (SLO("itl", "p99", 0.05), "itl_p99<=50ms"),
    (SLO("tpot", "mean", 0.3), "tpot_mean<=300ms"),
    (SLO("tpot", "p50", 0.0125), "tpot_p50<=12.5ms"),
    (SLO("e2e", "p99", 10.0), "e2e_p99<=10s"),
    (SLO("e2e", "p90", 1.0), "e2e_p90<=1s"),
    (SLO("e2e", "p50", 2.5), "e2e_p50<=2.5s"),
])
def test_canonical_text_round_trips(slo: SLO, text: str) -> None:
    assert str(slo) == text
    assert parse_slos(text) == [slo]


@pytest.mark.parametrize(("text", "message"), [
    ("", r"empty SLO text"),
    ("   ", r"empty SLO text"),
    ("ttft_p95<=500ms,,e2e_p99<=10s", r"empty part"),
    ("ttft_p95<=500ms,", r"empty part"),
    ("ttfx_p95<=500ms",
     r"'ttfx_p95<=500ms': unknown metric 'ttfx' — expected one of ttft, itl, tpot, e2e"),
    ("ttft_p96<=500ms",
     r"'ttft_p96<=500ms': unknown stat 'p96' — expected one of p50, p90, p95, p99, mean"),
    ("ttft<=500ms", r"unknown stat ''"),
    ("ttft_p95<500ms", r"'ttft_p95<500ms': missing '<='"),
    ("ttft_p95>=500ms", r"missing '<='"),
    ("ttft_p95=500ms", r"missing '<='"),
    ("ttft_p95<=fastms", r"'ttft_p95<=fastms': bad number 'fastms'"),
    ("ttft_p95<=5x0ms", r"bad number '5x0'"),
    ("ttft_p95<=1.2.3ms", r"bad number '1.2.3'"),
    ("ttft_p95<=1e999s", r"bad number"),
    ("ttft_p95<=500us", r"'ttft_p95<=500us': unknown unit 'us' — use ms or s"),
    ("ttft_p95<=500", r"missing unit — use ms or s"),
    ("ttft_p95<=0ms", r"non-positive limit"),
    ("ttft_p95<=-5s", r"non-positive limit"),
    ("ttft_p95<=500ms,ttft_p95<=1s", r"'ttft_p95<=1s': ttft_p95 is given twice"),
])
def test_malformed_parts_are_named(text: str, message: str) -> None:
    with pytest.raises(SLOError, match=message):
        parse_slos(text)


def test_slo_constructor_checks_its_fields() -> None:
    with pytest.raises(SLOError, match="unknown metric 'latency'"):
        SLO("latency", "p95", 1.0)
    with pytest.raises(SLOError, match="unknown stat 'max'"):
        SLO("ttft", "max", 1.0)
    with pytest.raises(SLOError, match="limit_s"):
        SLO("ttft", "p95", 0.0)
    assert issubclass(SLOError, ValueError)


# ---- per-request latency and summaries ----

# Three requests, hand-timed (seconds):
#   A arrives 0.0, tokens at 0.1 0.2 0.3   -> ttft 0.1, gaps 0.1 0.1, e2e 0.3, tpot 0.1
#   B arrives 1.0, tokens at 1.5 1.7       -> ttft 0.5, gap 0.2,      e2e 0.7, tpot 0.2
#   C arrives 2.0, one token at 2.3        -> ttft 0.3, no gap,       e2e 0.3, no tpot
A = RequestLatency.from_token_times(0.0, [0.1, 0.2, 0.3])
B = RequestLatency.from_token_times(1.0, [1.5, 1.7])
C = RequestLatency.from_token_times(2.0, [2.3])


def test_from_token_times() -> None:
    assert A.ttft_s == pytest.approx(0.1)
    assert A.itl_s == pytest.approx([0.1, 0.1])
    assert A.e2e_s == pytest.approx(0.3) and A.output_tokens == 3
    assert A.tpot_s == pytest.approx(0.1)
    assert B.tpot_s == pytest.approx(0.2)
    assert C.itl_s == [] and C.tpot_s == 0.0 and C.mean_itl_s == 0.0
    with pytest.raises(SLOError, match="token_times is empty"):
        RequestLatency.from_token_times(0.0, [])
    with pytest.raises(SLOError, match="non-decreasing"):
        RequestLatency.from_token_times(0.0, [0.3, 0.2])
    with pytest.raises(SLOError, match="before arrival"):
        RequestLatency.from_token_times(1.0, [0.5])


def test_summarize_hand_computed() -> None:
    summary = summarize([A, B, C])
    assert set(summary) == {f"{m}_{s}" for m in ("ttft", "itl", "tpot", "e2e")
                            for s in ("p50", "p90", "p95", "p99", "mean")}
    # ttft sorted 0.1 0.3 0.5; numpy's linear rule puts p90 at rank 1.8 of 0..2.
    assert summary["ttft_p50"] == pytest.approx(0.3)
    assert summary["ttft_p90"] == pytest.approx(0.46)
    assert summary["ttft_p95"] == pytest.approx(0.48)
    assert summary["ttft_p99"] == pytest.approx(0.496)
    assert summary["ttft_mean"] == pytest.approx(0.3)
    # ITL pools every gap: 0.1 0.1 0.2.
    assert summary["itl_p50"] == pytest.approx(0.1)
    assert summary["itl_p90"] == pytest.approx(0.18)
    assert summary["itl_mean"] == pytest.approx(0.4 / 3)
    # TPOT: one value per multi-token request, 0.1 and 0.2 (C has no decode phase).
    assert summary["tpot_p50"] == pytest.approx(0.15)
    assert summary["tpot_p90"] == pytest.approx(0.19)
    assert summary["tpot_mean"] == pytest.approx(0.15)
    # e2e sorted 0.3 0.3 0.7.
    assert summary["e2e_p50"] == pytest.approx(0.3)
    assert summary["e2e_p90"] == pytest.approx(0.62)
    assert summary["e2e_p99"] == pytest.approx(0.692)
    assert summary["e2e_mean"] == pytest.approx(1.3 / 3)


def test_summarize_single_token_requests_and_empty() -> None:
    summary = summarize([C, C])
    assert summary["itl_p99"] == 0.0 and summary["itl_mean"] == 0.0 and summary["tpot_mean"] == 0.0
    assert summary["ttft_p50"] == pytest.approx(0.3)
    with pytest.raises(SLOError, match="empty"):
        summarize([])


def test_met_by_and_meets() -> None:
    summary = summarize([A, B, C])
    assert SLO("ttft", "p50", 0.3).met_by(summary)  # the bound itself is allowed
    assert not SLO("ttft", "p95", 0.4).met_by(summary)
    assert meets(parse_slos("ttft_p50<=300ms,itl_p90<=200ms,e2e_p99<=1s"), summary)
    assert not meets(parse_slos("ttft_p50<=300ms,e2e_p99<=600ms"), summary)
    assert meets([], summary)
    with pytest.raises(SLOError, match="no 'ttft_p95'"):
        SLO("ttft", "p95", 1.0).met_by({"ttft_p50": 0.1})


# ---- goodput ----

def test_request_meets_uses_own_values_whatever_the_stat() -> None:
    slos = parse_slos("ttft_p99<=400ms,tpot_p50<=150ms")
    assert request_meets(A, slos)  # ttft 0.1, tpot 0.1
    assert not request_meets(B, slos)  # ttft 0.5
    assert request_meets(C, slos)  # one token: tpot 0
    # ITL is judged by the request's mean gap: gaps 0.05 and 0.25 average 0.15.
    bursty = RequestLatency.from_token_times(0.0, [0.1, 0.15, 0.4])
    assert request_meets(bursty, parse_slos("itl_p99<=160ms"))
    assert not request_meets(bursty, parse_slos("itl_p99<=140ms"))
    assert request_meets(A, [])


def test_goodput_hand_computed() -> None:
    slos = parse_slos("ttft_p95<=400ms,tpot_p50<=150ms")
    assert goodput([A, B, C], slos, duration_s=4.0) == pytest.approx(0.5)  # A and C in 4 s
    assert goodput([A, B, C], parse_slos("e2e_p99<=500ms"), duration_s=2.0) == pytest.approx(1.0)
    assert goodput([A, B, C], [], duration_s=3.0) == pytest.approx(1.0)  # no SLO: throughput
    assert goodput([], slos, duration_s=1.0) == 0.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(SLOError, match="duration_s"):
            goodput([A], slos, duration_s=bad)
