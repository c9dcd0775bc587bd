"""Pictures for reports: predicted against measured, one panel per metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.costmodel.fit_data import METRICS

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


def pareto_plot(result: Any, latency_key: str, path: str | Path) -> Path:
    """Cost per million tokens against predicted latency for every deployment the search scored:
    feasible ones, the Pareto front through them, and the plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    scored = [c for c in result.candidates if c.prediction is not None and c.cost_per_million < float("inf")]
    for feasible, colour, label in ((False, "lightgrey", "misses a target"), (True, "tab:blue", "meets every target")):
        pts = [(c.prediction.metrics[latency_key], c.cost_per_million) for c in scored if c.feasible == feasible]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=14, color=colour, label=label)
    if result.pareto:
        front = sorted((c.prediction.metrics[latency_key], c.cost_per_million) for c in result.pareto)
        ax.step(*zip(*front), where="post", color="tab:orange", label="Pareto front")
    if result.best.prediction is not None:
        ax.scatter([result.best.prediction.metrics[latency_key]], [result.best.cost_per_million],
                   s=120, marker="*", color="tab:red", label="plan", zorder=3)
    for slo in result.slos:
        if slo.key == latency_key:
            ax.axvline(slo.limit_s, color="tab:red", linestyle="--", linewidth=1, label=str(slo))
    ax.set(xscale="log", yscale="log", xlabel=f"predicted {latency_key} (s)",
           ylabel="$ per million output tokens", title="Deployments scored by the search")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
