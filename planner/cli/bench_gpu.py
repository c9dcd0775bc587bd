"""`pilot bench gpu`: GPU predictions against aiconfigurator-core's measured serving runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planner.cli._common import console, fail, fail_error


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def bench_gpu(
    gpus: str = typer.Option("h100-sxm,h200", "--gpu", help="comma-separated GPUs whose rows to predict"),
    limit: Optional[int] = typer.Option(None, "--limit", help="predict every k-th row, about this many "
                                        "(a quick look; default: every expressible row)"),
    waves: int = typer.Option(4, "--waves", help="requests per row replayed out of phase (vLLM, TensorRT-LLM), in "
                            "multiples of its concurrency; SGLang rows replay the harness's burst of 10x"),
    workers: Optional[int] = typer.Option(None, "--workers", help="processes; default: one per core"),
    save: Optional[Path] = typer.Option(None, "--save", help="write the GPU calibration (overheads fitted "
                                        "on every row, held-out errors) here, e.g. "
                                        "profiles/gpu_calibration.json"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write every row's prediction as JSON"),
) -> None:
    """Predict every row of aiconfigurator-core's silicon sample that pilot can express (dense
    Llama-family models on H100/H200) and print median and p90 absolute percentage errors of
    TTFT and TPOT per GPU, backend and model, beside the targets and the peers' figures."""
    from planner.bench.gpu import PEERS, TARGETS, run_gpu_benchmark
    from planner.silicon.tables import SYSTEMS, KernelDataError
    from planner.silicon.validation import expressible_rows

    names = [g.strip() for g in gpus.split(",") if g.strip()]
    unknown = [g for g in names if g not in SYSTEMS]
    if unknown:
        fail(f"--gpu: no kernel measurements of {', '.join(unknown)}; measured: {', '.join(SYSTEMS)}")
    if waves < 1:
        fail(f"--waves: must be >= 1, got {waves}")
    if limit is not None and limit < 1:
        fail(f"--limit: must be >= 1, got {limit}")
    try:
        rows = expressible_rows(systems=tuple(SYSTEMS[g] for g in names))
    except KernelDataError as err:
        fail_error(err)
    if not rows:
        fail(f"--gpu: the silicon sample has no rows pilot can express on {', '.join(names)}")
    if limit is not None and limit < len(rows):
        rows = rows[::-(-len(rows) // limit)]
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("predicting", total=2 * len(rows))
        offset = {"kernels only": 0, "held-out overheads": len(rows)}

        def on_progress(stage: str, done: int, total: int) -> None:
            progress.update(task, completed=offset[stage] + done, description=stage)

        result = run_gpu_benchmark(rows, waves, workers, on_progress)
    table = Table(title=f"GPU predictions against {len(rows)} measured serving runs (aiconfigurator-core "
                        "silicon sample; overheads held out by model)")
    for column in ("rows", "n", "TTFT median", "TTFT p90", "TPOT median", "TPOT p90"):
        table.add_column(column, justify="left" if column == "rows" else "right")
    for label, members in result.groups():
        ttft, tpot = result.errors("ttft", members), result.errors("tpot", members)
        table.add_row(label, str(ttft[2]), _pct(ttft[0]), _pct(ttft[1]), _pct(tpot[0]), _pct(tpot[1]))
    table.add_row("target", "", f"<= {_pct(TARGETS['ttft'][0])}", f"<= {_pct(TARGETS['ttft'][1])}",
                  f"<= {_pct(TARGETS['tpot'][0])}", f"<= {_pct(TARGETS['tpot'][1])}")
    console.print(table)
    for check, (agreed, pairs) in result.rankings.items():
        console.print(f"ranked as measured, {check}: {agreed}/{pairs} pairs" if pairs else
                      f"ranked as measured, {check}: no pairs in these rows")
    console.print("peers' published figures: " + "; ".join(f"{who}: {what}" for who, what in PEERS))
    for backend, fitted in sorted(result.calibration.backends.items()):
        console.print(f"{backend} overheads: {1e3 * fitted.per_step_s:.2f} ms/step + "
                      f"{1e6 * fitted.per_seq_s:.1f} us/sequence, {1e3 * fitted.per_request_s:.1f} ms/request "
                      f"before the first token (fitted on {fitted.rows} rows: {', '.join(fitted.models)}; each "
                      "model's rows above were predicted with overheads fitted without them)")
    console.print("meets the targets" if result.meets_targets() else "misses a target")
    if save is not None:
        result.calibration.save(save)
        console.print(f"wrote {save}")
    if out is not None:
        out.write_text(json.dumps([{"id": p.row.id, "gpu": p.row.gpu, "backend": p.row.backend,
                                    "model": p.row.model, "measured_ttft_s": p.row.ttft_s,
                                    "measured_tpot_s": p.row.tpot_s, "ttft_s": p.ttft_s, "tpot_s": p.tpot_s,
                                    "extrapolated": p.extrapolated} for p in result.predictions], indent=1))
