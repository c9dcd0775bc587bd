"""Flat tables of what the store holds: `pilot runs list` and `pilot runs export`."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import joinedload

from planner.spec.errors import FieldError
from planner.store.database import RequestRow, Run, StepRow, Store

TABLES = ("runs", "requests", "steps")


def run_records(store: Store) -> list[dict[str, Any]]:
    """One flat record per run: its configuration, load and measured metrics."""
    with store.session() as session:
        runs = session.scalars(select(Run).order_by(Run.id).options(
            joinedload(Run.engine_config), joinedload(Run.model), joinedload(Run.workload),
            joinedload(Run.hardware))).all()
        records = []
        for run in runs:
            cfg = run.engine_config
            records.append({
                "run_id": run.id, "started_at": run.started_at.isoformat(), "hardware": run.hardware.spec_name,
                "hardware_description": run.hardware.description, "model": run.model.name,
                "model_params": run.model.num_params, "workload": run.workload.description,
                "load_kind": run.load_kind, "load_value": run.load_value, "dtype": cfg.dtype,
                "quantization": cfg.quantization, "tensor_parallel_size": cfg.tensor_parallel_size,
                "data_parallel_size": cfg.data_parallel_size, "max_num_seqs": cfg.max_num_seqs,
                "max_num_batched_tokens": cfg.max_num_batched_tokens,
                "enable_chunked_prefill": cfg.enable_chunked_prefill,
                "enable_prefix_caching": cfg.enable_prefix_caching,
                "num_speculative_tokens": cfg.num_speculative_tokens or 0,
                "duration_s": run.duration_s, "num_requests": run.num_requests,
                "output_tokens": run.output_tokens, "throughput_tok_s": run.throughput_tok_s,
                "request_rate": run.request_rate, "goodput": run.goodput, "slos": run.slos,
                **run.latency, "peak_memory_bytes": run.peak_memory_bytes,
                "acceptance_rate": run.acceptance_rate, "energy_j": run.energy_j,
                "engine_version": run.engine_version, "git_revision": run.git_revision,
            })
    return records


def _rows(store: Store, cls: type) -> list[dict[str, Any]]:
    columns = [c.name for c in cls.__table__.columns]
    with store.session() as session:
        return [{c: getattr(row, c) for c in columns}
                for row in session.scalars(select(cls).order_by(cls.id))]


def records(store: Store, table: str) -> list[dict[str, Any]]:
    if table == "runs":
        return run_records(store)
    if table == "requests":
        return _rows(store, RequestRow)
    if table == "steps":
        return _rows(store, StepRow)
    raise FieldError(f"must be one of {', '.join(TABLES)}, got {table!r}", field="table")


def export(store: Store, path: Path, fmt: str, table: str = "runs") -> int:
    """Write `table` to `path` as csv or parquet; returns the number of rows."""
    if fmt not in ("csv", "parquet"):
        raise FieldError(f"must be csv or parquet, got {fmt!r}", field="format")
    data = records(store, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(data), path)
        return len(data)
    with path.open("w", newline="") as f:
        fields = list(dict.fromkeys(k for row in data for k in row))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(data)
    return len(data)
