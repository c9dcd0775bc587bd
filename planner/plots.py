"""Pictures for reports: predicted against measured, one panel per metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.fit_data import METRICS

LABELS = {"ttft_p50": "TTFT p50 (s)", "ttft_p95": "TTFT p95 (s)", "itl_p50": "ITL p50 (s)",
          "itl_p95": "ITL p95 (s)", "throughput_tok_s": "throughput (tok/s)"}


def accuracy_plot(report: dict[str, Any], path: str | Path) -> Path:
    """Log-log scatter of each held-out run's measured and predicted metrics (`pilot fit --plot`)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4))
    for ax, metric in zip(axes, METRICS):
        for kind, marker in (("by_run", "o"), ("by_model", "x")):
            pairs = [(r["measured"][metric], r[kind][metric]) for r in runs
                     if kind in r and r["measured"][metric] > 0 and r[kind][metric] > 0]
            if pairs:
                xs, ys = zip(*pairs)
                label = "held-out run" if kind == "by_run" else "held-out model"
                ax.scatter(xs, ys, s=12, marker=marker, alpha=0.6, label=label)
        lo, hi = ax.get_xlim()[0], ax.get_xlim()[1]
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1)
        ax.set(xscale="log", yscale="log", title=LABELS[metric], xlabel="measured", ylabel="predicted")
    axes[0].legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
