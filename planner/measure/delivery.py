"""What the served path adds to each request, measured: the engine's own timings of a request
(from the server's `/pilot/requests`) against what its client saw, on the one monotonic clock
of the machine both run on.

- `admit_s`: from the client sending the request to the engine taking it (HTTP, JSON, the
  prompt's validation);
- `first_s`: from the engine producing the first token to the client reading it;
- `token_s`: the same for every later token (detokenizing, the SSE event, the HTTP write, the
  client's read), where the client saw one chunk per token;
- `gap_s`: how much longer the client's gap between two tokens was than the engine's (negative
  where the client read a late token and the next one together). Delays run in streaks, so this,
  not the delays drawn apart, is what serving does to inter-token latency.

A run keeps each one's quantiles at `LEVELS`; `planner.costmodel.delivery` fits them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

LEVELS = np.linspace(0.005, 0.995, 100)
KINDS = ("admit_s", "first_s", "token_s", "gap_s")


def delivery_samples(records: Sequence[Any], engine_requests: Sequence[dict[str, Any]]
                     ) -> dict[str, np.ndarray]:
    """Per kind, every delay the client's `records` (planner.loadgen.http_load.RequestRecord)
    show against the engine's timings of the same requests (`/pilot/requests` entries)."""
    engine = {e["id"]: e for e in engine_requests}
    samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for record in records:
        entry = engine.get(f"{record.response_id}-0") if record.response_id else None
        if entry is None or not entry["token_times"] or not record.chunk_times:
            continue
        token_times = entry["token_times"]
        samples["admit_s"].append(entry["arrival_time"] - record.send_time)
        samples["first_s"].append(record.chunk_times[0] - token_times[0])
        if len(record.chunk_times) == len(token_times):  # one chunk a token: pairs line up
            chunks, tokens = np.asarray(record.chunk_times), np.asarray(token_times)
            samples["token_s"] += (chunks[1:] - tokens[1:]).tolist()
            samples["gap_s"] += (np.diff(chunks) - np.diff(tokens)).tolist()
    return {kind: np.asarray(values, dtype=float) for kind, values in samples.items()}


def summarize_delivery(samples: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Each kind's quantiles at `LEVELS` and its count, for the store; None without a sample."""
    if not len(samples.get("first_s", ())):
        return None
    out: dict[str, Any] = {"levels": len(LEVELS)}
    for kind in KINDS:
        values = samples.get(kind, np.empty(0))
        out[kind] = np.quantile(values, LEVELS).tolist() if len(values) else None
        out[f"{kind}_count"] = int(len(values))
    return out
