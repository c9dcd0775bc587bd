"""What the served path adds to each request, measured: the engine's own timings of a request
(from the server's `/pilot/requests`) against what its client saw, on the one monotonic clock
of the machine both run on.

- `admit_s`: from the client sending the request to the engine taking it (HTTP, JSON, the
  prompt's validation);
- `first_s`: from the engine producing the first token to the client reading it;
- `token_s`: the same for every later token (detokenizing, the SSE event, the HTTP write, the
  client's read), where the client saw one chunk per token.

A run keeps each one's quantiles at `LEVELS`; `planner.costmodel.delivery` fits them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

LEVELS = np.linspace(0.005, 0.995, 100)
KINDS = ("admit_s", "first_s", "token_s")


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
            samples["token_s"] += [c - t for c, t in zip(record.chunk_times[1:], token_times[1:])]
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
