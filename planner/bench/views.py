"""What the notebooks in notebooks/ show, as functions over a store and a plan file: the engine
steps profiled, the cost model's held-out accuracy, the plan's SLO checks and each weight
quantization's measured perplexity cost. Figures are matplotlib's; tables are lists of dicts."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from planner.costmodel import fit as cost_model
from planner.costmodel.plots import accuracy_plot
from planner.measure.quality import Quality
from planner.search.plan import Plan
from planner.store.database import Model, QualityRow, StepRow, Store


def runs_table(store: Store) -> list[dict[str, Any]]:
    """One row per finished run: its configuration, load and measured metrics."""
    out = []
    for run in store.runs():
        latency = run.latency or {}
        out.append({"run": run.id, "config": run.engine_config_id, "load": f"{run.load_kind}={run.load_value:g}",
                    "ttft_p50_ms": 1e3 * latency.get("ttft_p50", float("nan")),
                    "itl_p50_ms": 1e3 * latency.get("itl_p50", float("nan")),
                    "throughput_tok_s": run.throughput_tok_s})
    return out


def step_time_figure(store: Store, max_steps: int = 20000):
    """Decode-only steps' times against their batch and their context: what the cost model fits."""
    import matplotlib.pyplot as plt

    with store.session() as session:
        rows = session.execute(select(StepRow.duration_s, StepRow.num_seqs, StepRow.context_tokens)
                               .where(StepRow.num_prefill_seqs == 0).limit(max_steps)).all()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if not rows:
        for ax in axes:
            ax.set_title("no decode-only steps in this store")
        return fig
    seconds, batch, context = (np.array(column, dtype=float) for column in zip(*rows))
    points = axes[0].scatter(batch, 1e3 * seconds, c=np.log2(np.maximum(context, 1)), s=6, cmap="viridis")
    axes[0].set(xscale="log", xlabel="sequences in the step", ylabel="step time (ms)",
                title="decode steps: time against batch")
    fig.colorbar(points, ax=axes[0], label="log2 context tokens")
    axes[1].scatter(context, 1e3 * seconds, c=np.log2(batch), s=6, cmap="plasma")
    axes[1].set(xscale="log", xlabel="context tokens read by attention", ylabel="step time (ms)",
                title="decode steps: time against context")
    fig.tight_layout()
    return fig


def accuracy_image(store: Store) -> Path | None:
    """The newest cost model's held-out predictions against measurements (`pilot fit --plot`)."""
    model = cost_model.load(store)
    if model is None or not model.report.get("runs"):
        return None
    return accuracy_plot(model.report, Path(tempfile.mkdtemp()) / "accuracy.png")


def plan_checks(plan_file: str | Path) -> list[dict[str, Any]]:
    """Each SLO of the plan: its limit, the predicted value and the bound it is held to."""
    plan = Plan.from_file(plan_file)
    return [{"slo": c.slo, "limit_ms": 1e3 * c.limit_s, "predicted_ms": 1e3 * c.predicted_s,
             "bound_ms": 1e3 * c.upper_s, "met": c.met} for c in plan.checks]


def quality_table(store: Store) -> list[dict[str, Any]]:
    """Every stored perplexity measurement, by model and scheme."""
    with store.session() as session:
        rows = session.execute(select(QualityRow, Model.name).join(Model, Model.id == QualityRow.model_id)
                               .order_by(Model.name, QualityRow.quantization, QualityRow.group_size)).all()
    measured = [(name, Quality.from_row(row)) for row, name in rows]
    return [{"model": name, "weights": q.scheme, "perplexity": q.perplexity, "unquantized": q.reference_perplexity,
             "loss_pct": 100 * q.loss} for name, q in measured]


def quality_figure(store: Store):
    import matplotlib.pyplot as plt

    rows = quality_table(store)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if not rows:
        ax.set_title("no quality measured in this store (models with a tokenizer only)")
        return fig
    labels = [f"{r['model']}\n{r['weights']}" for r in rows]
    ax.bar(labels, [r["loss_pct"] for r in rows], color="tab:purple")
    ax.axhline(0, color="grey", linewidth=1)
    ax.set(ylabel="perplexity over unquantized (%)", title="what each weight quantization costs")
    fig.tight_layout()
    return fig



def markdown_table(rows: list[dict[str, Any]], digits: int = 3) -> str:
    """Rows as a Markdown table (numbers to `digits` significant figures), for display."""
    if not rows:
        return "_nothing stored yet_"
    columns = list(rows[0])

    def cell(value: Any) -> str:
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
