"""Latency SLOs (`ttft_p95<=500ms,itl_p95<=50ms`), the latency summary they are checked
against, and goodput: the rate of requests that met every SLO."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

METRICS = ("ttft", "itl", "tpot", "e2e")
STATS = ("p50", "p90", "p95", "p99", "mean")
UNITS = {"ms": 1e-3, "s": 1.0}
_VALUE = re.compile(r"^(?P<number>.*?)\s*(?P<unit>[^\d\s.]*)$")  # trailing non-digits are the unit


class SLOError(ValueError):
    """An SLO that cannot be parsed or checked; the message quotes the offending part."""


def _format_seconds(seconds: float) -> str:
    # Rounding hides binary noise (0.3 * 1000 = 300.00000000000006) so str() reads as typed.
    value, unit = (seconds * 1000, "ms") if seconds < 1 else (seconds, "s")
    return f"{round(value, 6):.15g}{unit}"


@dataclass(frozen=True)
class SLO:
    """One bound: `stat` of `metric` over a run must be at most `limit_s` seconds."""

    metric: str
    stat: str
    limit_s: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise SLOError(f"unknown metric {self.metric!r} — expected one of {', '.join(METRICS)}")
        if self.stat not in STATS:
            raise SLOError(f"unknown stat {self.stat!r} — expected one of {', '.join(STATS)}")
        if not (math.isfinite(self.limit_s) and self.limit_s > 0):
            raise SLOError(f"limit_s must be a positive number of seconds, got {self.limit_s!r}")

    @property
    def key(self) -> str:
        """The name of this SLO's number in a `summarize` result, e.g. "ttft_p95"."""
        return f"{self.metric}_{self.stat}"

    def __str__(self) -> str:
        return f"{self.key}<={_format_seconds(self.limit_s)}"

    def met_by(self, summary: dict[str, float]) -> bool:
        if self.key not in summary:
            raise SLOError(f"{self}: the summary has no {self.key!r}")
        return summary[self.key] <= self.limit_s


def _parse_part(part: str) -> SLO:
    if "<=" not in part:
        raise SLOError(f"{part!r}: missing '<=' — write metric_stat<=value, e.g. ttft_p95<=500ms")
    name, value = (side.strip() for side in part.split("<=", 1))
    metric, _, stat = name.partition("_")
    if metric not in METRICS:
        raise SLOError(f"{part!r}: unknown metric {metric!r} — expected one of {', '.join(METRICS)}")
    if stat not in STATS:
        raise SLOError(f"{part!r}: unknown stat {stat!r} — expected one of {', '.join(STATS)}")
    number, unit = _VALUE.match(value).group("number", "unit")  # always matches: both may be ""
    try:
        limit = float(number)
    except ValueError:
        limit = math.nan
    if not math.isfinite(limit):
        raise SLOError(f"{part!r}: bad number {number or value!r}")
    if unit not in UNITS:
        shown = f"unknown unit {unit!r}" if unit else "missing unit"
        raise SLOError(f"{part!r}: {shown} — use ms or s")
    if limit <= 0:
        raise SLOError(f"{part!r}: non-positive limit {number}{unit} — a limit must be > 0")
    return SLO(metric, stat, limit * UNITS[unit])


def parse_slos(text: str) -> list[SLO]:
    """Parse the comma-separated SLO syntax of the CLI and plan files."""
    if not text or not text.strip():
        raise SLOError("empty SLO text — write e.g. ttft_p95<=500ms,itl_p95<=50ms")
    slos: list[SLO] = []
    for part in text.split(","):
        if not part.strip():
            raise SLOError(f"{text!r}: empty part between commas")
        slo = _parse_part(part.strip())
        if any(seen.key == slo.key for seen in slos):
            raise SLOError(f"{part.strip()!r}: {slo.key} is given twice")
        slos.append(slo)
    return slos


@dataclass(frozen=True)
class RequestLatency:
    """What one request experienced, in seconds."""

    ttft_s: float
    itl_s: list[float]  # gaps between consecutive deliveries of output tokens
    e2e_s: float
    output_tokens: int

    @property
    def tpot_s(self) -> float:
        # The first token is TTFT's; dividing by all tokens would blend prefill into decode.
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0

    @property
    def mean_itl_s(self) -> float:
        return float(np.mean(self.itl_s)) if self.itl_s else 0.0

    @classmethod
    def from_token_times(cls, arrival: float, token_times: Sequence[float]) -> RequestLatency:
        """From the absolute time each output token appeared (the first is the first token).

        Tokens that appear at the same moment (a speculative step's accepted drafts) reach a
        streaming client in one chunk: ITL is the gap between chunks, as vLLM's benchmark and
        GuideLLM measure it, never a run of zeros."""
        if not token_times:
            raise SLOError("token_times is empty: a request with no output token has no latency")
        times = [float(t) for t in token_times]
        if times[0] < arrival or any(b < a for a, b in zip(times, times[1:])):
            raise SLOError(f"token_times must be non-decreasing and not before "
                           f"arrival={arrival}, got {times}")
        gaps = [b - a for a, b in zip(times, times[1:]) if b > a]
        return cls(times[0] - arrival, gaps, times[-1] - arrival, len(times))


def _stats(metric: str, values: Sequence[float]) -> dict[str, float]:
    if not len(values):
        return {f"{metric}_{stat}": 0.0 for stat in STATS}
    data = np.asarray(values, dtype=np.float64)
    # numpy's default "linear" percentile, as vLLM's and GuideLLM's reports use
    out = {f"{metric}_{s}": float(np.percentile(data, float(s[1:]))) for s in STATS if s != "mean"}
    return out | {f"{metric}_mean": float(data.mean())}


def summarize(latencies: Sequence[RequestLatency]) -> dict[str, float]:
    """`{metric}_{stat}` for every metric and stat, as serving benchmarks report them: ITL
    pools every gap of every request (long answers weigh more), TPOT is one value per request
    with more than one token (a one-token request has no decode phase to time)."""
    if not latencies:
        raise SLOError("cannot summarize an empty list of latencies")
    return (_stats("ttft", [r.ttft_s for r in latencies])
            | _stats("itl", [gap for r in latencies for gap in r.itl_s])
            | _stats("tpot", [r.tpot_s for r in latencies if r.output_tokens > 1])
            | _stats("e2e", [r.e2e_s for r in latencies]))


def meets(slos: Iterable[SLO], summary: dict[str, float]) -> bool:
    return all(slo.met_by(summary) for slo in slos)


def request_meets(latency: RequestLatency, slos: Iterable[SLO]) -> bool:
    """Whether one request counts toward goodput. A single request has no percentiles, so,
    following DistServe and vLLM's goodput, its own TTFT, TPOT and E2E are held to every
    limit on that metric whatever the stat; for ITL its mean gap is, because one slow gap
    (a batch-mate's prefill) should not disqualify a request the user saw stream smoothly."""
    own = {"ttft": latency.ttft_s, "tpot": latency.tpot_s, "e2e": latency.e2e_s, "itl": latency.mean_itl_s}
    return all(own[slo.metric] <= slo.limit_s for slo in slos)


def goodput(latencies: Iterable[RequestLatency], slos: Sequence[SLO], duration_s: float) -> float:
    """Requests per second that met every SLO over a run of `duration_s` seconds."""
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise SLOError(f"duration_s must be > 0, got {duration_s!r}")
    return sum(request_meets(r, slos) for r in latencies) / duration_s
