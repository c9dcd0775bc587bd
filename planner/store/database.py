"""The measurement store: SQLAlchemy 2 ORM tables and the few operations pilot needs.

Any SQLAlchemy URL works (PostgreSQL for a campaign several machines share); the default is a
SQLite file in the working directory, opened in WAL mode with a busy timeout so that several
profilers can write to one file without corrupting it or failing on a momentary lock. A run is
written in one transaction together with its requests and steps: a profile killed mid-run
loses that run only, never a finished one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from planner.spec.errors import FieldError

DEFAULT_URL = "sqlite:///pilot.db"


def fingerprint(data: Any) -> str:
    """A stable id for a JSON-able value: equal settings map to one row."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class Hardware(Base):
    __tablename__ = "hardware"
    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(32), unique=True)
    spec_name: Mapped[str] = mapped_column(String(64))  # profiles/hardware/<name>.yaml
    kind: Mapped[str] = mapped_column(String(8))  # gpu | cpu
    description: Mapped[str] = mapped_column(Text)  # CPU model or GPU name
    device_count: Mapped[int] = mapped_column(Integer)
    memory_gb: Mapped[float] = mapped_column(Float)
    details: Mapped[dict] = mapped_column(JSON)  # what detection found
    # The CPU microbenchmark (bandwidth, matmul throughput), cached so it runs once per host.
    measurement: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    measured_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(32), unique=True)  # of config.json
    name: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    model_type: Mapped[str] = mapped_column(String(32))
    num_params: Mapped[int] = mapped_column(BigInteger)  # 7e10 for a 70B model: past int4
    hidden_size: Mapped[int] = mapped_column(Integer)
    intermediate_size: Mapped[int] = mapped_column(Integer)
    num_layers: Mapped[int] = mapped_column(Integer)
    num_heads: Mapped[int] = mapped_column(Integer)
    num_kv_heads: Mapped[int] = mapped_column(Integer)
    head_dim: Mapped[int] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    num_experts: Mapped[int] = mapped_column(Integer, default=0)
    config: Mapped[dict] = mapped_column(JSON)


class EngineConfigRow(Base):
    """An engine configuration without its model path (the model is a row of its own)."""

    __tablename__ = "engine_configs"
    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(32), unique=True)
    dtype: Mapped[str] = mapped_column(String(16))
    quantization: Mapped[str | None] = mapped_column(String(8), nullable=True)
    tensor_parallel_size: Mapped[int] = mapped_column(Integer)
    data_parallel_size: Mapped[int] = mapped_column(Integer)
    max_num_seqs: Mapped[int] = mapped_column(Integer)
    max_num_batched_tokens: Mapped[int] = mapped_column(Integer)
    enable_chunked_prefill: Mapped[bool] = mapped_column(Boolean)
    enable_prefix_caching: Mapped[bool] = mapped_column(Boolean)
    speculative_model: Mapped[str | None] = mapped_column(Text, nullable=True)
    num_speculative_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    config: Mapped[dict] = mapped_column(JSON)


class WorkloadRow(Base):
    __tablename__ = "workloads"
    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    spec: Mapped[dict] = mapped_column(JSON)


class Campaign(Base):
    """One `pilot profile` invocation's plan; running it again with the same inputs resumes it."""

    __tablename__ = "campaigns"
    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(32), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    hardware_id: Mapped[int] = mapped_column(ForeignKey("hardware.id"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    workload_id: Mapped[int] = mapped_column(ForeignKey("workloads.id"))
    space: Mapped[dict] = mapped_column(JSON)
    experiments: Mapped[list["Experiment"]] = relationship(back_populates="campaign",
                                                           order_by="Experiment.position")


class Experiment(Base):
    """One planned run: an engine config at a load level."""

    __tablename__ = "experiments"
    # Two profilers planning the same campaign at once: the second one's plan is refused.
    __table_args__ = (UniqueConstraint("campaign_id", "position"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    engine_config_id: Mapped[int] = mapped_column(ForeignKey("engine_configs.id"))
    load_kind: Mapped[str] = mapped_column(String(16))  # rate | concurrency
    load_value: Mapped[float] = mapped_column(Float)
    # pending | running (claimed by `owner`, "host:pid") | done | failed
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    owner: Mapped[str | None] = mapped_column(Text, nullable=True)
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    campaign: Mapped[Campaign] = relationship(back_populates="experiments")
    engine_config: Mapped[EngineConfigRow] = relationship()


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id"), nullable=True,
                                                      unique=True)
    hardware_id: Mapped[int] = mapped_column(ForeignKey("hardware.id"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    engine_config_id: Mapped[int] = mapped_column(ForeignKey("engine_configs.id"), index=True)
    workload_id: Mapped[int] = mapped_column(ForeignKey("workloads.id"), index=True)
    load_kind: Mapped[str] = mapped_column(String(16))
    load_value: Mapped[float] = mapped_column(Float)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float] = mapped_column(Float)
    num_requests: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    throughput_tok_s: Mapped[float] = mapped_column(Float)  # output tokens / s
    request_rate: Mapped[float] = mapped_column(Float)  # completed requests / s
    goodput: Mapped[float | None] = mapped_column(Float, nullable=True)  # under `slos`
    slos: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Latency summary: {"ttft_p50": s, ..., "e2e_mean": s} (planner.spec.slo.summarize)
    latency: Mapped[dict] = mapped_column(JSON)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    acceptance_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    energy_j: Mapped[float | None] = mapped_column(Float, nullable=True)
    gpu: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # utilization/power samples
    engine_version: Mapped[str] = mapped_column(String(64))
    git_revision: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # planner.measure.host_speed.probe around the run: how fast the host was meanwhile (None: not read).
    host_probe_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # planner.measure.host_speed.parallel_probe around the run: every core at once (None: not read).
    host_probe_parallel_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # How it was measured: "engine" in process, "http" through `pilot serve` (None: engine).
    path: Mapped[str | None] = mapped_column(String(8), nullable=True)
    # Served runs: what serving added to each request (planner.measure.delivery.summarize_delivery).
    delivery: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    engine_config: Mapped[EngineConfigRow] = relationship()
    model: Mapped[Model] = relationship()
    workload: Mapped[WorkloadRow] = relationship()
    hardware: Mapped[Hardware] = relationship()


class RequestRow(Base):
    __tablename__ = "requests"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    arrival_s: Mapped[float] = mapped_column(Float)  # from the run's start
    ttft_s: Mapped[float] = mapped_column(Float)
    tpot_s: Mapped[float] = mapped_column(Float)
    itl_mean_s: Mapped[float] = mapped_column(Float)
    e2e_s: Mapped[float] = mapped_column(Float)
    num_preemptions: Mapped[int] = mapped_column(Integer)
    num_cached_prompt_tokens: Mapped[int] = mapped_column(Integer)
    acceptance_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)


class StepRow(Base):
    """One engine step (engine.observer.StepStats), times relative to the run's start."""

    __tablename__ = "steps"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    start_s: Mapped[float] = mapped_column(Float)
    duration_s: Mapped[float] = mapped_column(Float)
    forward_s: Mapped[float] = mapped_column(Float)
    num_seqs: Mapped[int] = mapped_column(Integer)
    num_prefill_seqs: Mapped[int] = mapped_column(Integer)
    num_decode_seqs: Mapped[int] = mapped_column(Integer)
    num_prefill_tokens: Mapped[int] = mapped_column(Integer)
    num_decode_tokens: Mapped[int] = mapped_column(Integer)
    context_tokens: Mapped[int] = mapped_column(Integer)
    num_preempted: Mapped[int] = mapped_column(Integer)
    num_finished: Mapped[int] = mapped_column(Integer)
    num_waiting: Mapped[int] = mapped_column(Integer)
    num_running: Mapped[int] = mapped_column(Integer)
    kv_blocks_used: Mapped[int] = mapped_column(Integer)
    kv_blocks_total: Mapped[int] = mapped_column(Integer)
    num_draft_tokens: Mapped[int] = mapped_column(Integer)
    num_accepted_tokens: Mapped[int] = mapped_column(Integer)
    replica: Mapped[int] = mapped_column(Integer)


class CostModelRow(Base):
    """A fitted cost model (`pilot fit`): plain numbers in JSON, never a pickle."""

    __tablename__ = "cost_models"
    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    data_version: Mapped[str] = mapped_column(String(32), index=True)  # the runs it was fitted on
    num_runs: Mapped[int] = mapped_column(Integer)
    num_steps: Mapped[int] = mapped_column(Integer)
    hardware: Mapped[list] = mapped_column(JSON)  # spec names it is calibrated for
    models: Mapped[list] = mapped_column(JSON)
    payload: Mapped[dict] = mapped_column(JSON)
    report: Mapped[dict] = mapped_column(JSON)  # cross-validated accuracy


class QualityRow(Base):
    """The perplexity of a model under one weight quantization on held-out text, beside the
    unquantized model's on the same text: what the quantization costs in quality."""

    __tablename__ = "quality"
    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(32), unique=True)  # model, scheme, text
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    quantization: Mapped[str] = mapped_column(String(16))  # int8 | int4 | gguf-Q8_0, gguf-Q4_0...
    group_size: Mapped[int] = mapped_column(Integer)  # int4's and GGUF's (32); int8 is per output channel (0)
    dataset: Mapped[str] = mapped_column(String(64))  # the held-out text, e.g. sharegpt-heldout
    texts: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)  # tokens predicted
    perplexity: Mapped[float] = mapped_column(Float)
    reference_perplexity: Mapped[float] = mapped_column(Float)  # float32, unquantized
    measured_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


T = TypeVar("T", bound=Base)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # busy_timeout: a second profiler waits for the lock instead of failing at once. WAL: readers
    # never block the writer and a crash mid-write leaves the file consistent. Switching a new
    # file to WAL needs it to itself and does not wait on the busy timeout: retried while
    # another process holds it.
    cursor.execute("PRAGMA busy_timeout=30000")
    for attempt in range(300):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or attempt == 299:
                raise
            time.sleep(0.1)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _add_missing_columns(connection: Connection) -> None:
    """Columns added to a table since a store was made (all nullable), added to that store so an
    older store keeps working; its rows read them as NULL."""
    existing = inspect(connection)
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in existing.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                if not column.nullable:
                    raise ValueError(f"the store's table {table.name!r} lacks the column "
                                     f"{column.name!r}, which cannot be added to existing rows")
                kind = column.type.compile(dialect=connection.dialect)
                connection.execute(text(f'ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}'))


def _tag_non_finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT_TAG: repr(value)}  # 'inf', '-inf', 'nan'
    if isinstance(value, dict):
        return {k: _tag_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tag_non_finite(v) for v in value]
    return value


def _untag(obj: dict) -> Any:
    if len(obj) == 1 and obj.get(_FLOAT_TAG) in ("inf", "-inf", "nan"):
        return float(obj[_FLOAT_TAG])
    return obj


# JSON has no infinity or NaN: Python writes them anyway and SQLite keeps the text, but
# PostgreSQL refuses it. Both get them tagged, and read them back as the floats they were.
_FLOAT_TAG = "$float"


def to_json(value: Any) -> str:
    return json.dumps(_tag_non_finite(value), allow_nan=False, default=str)


def from_json(text_value: str) -> Any:
    return json.loads(text_value, object_hook=_untag)


def _with_driver(url: str) -> str:
    """A bare postgresql:// URL means psycopg 3 (`pilot[postgres]`); SQLAlchemy's own default
    for it is psycopg2, which pilot does not install. An explicit +driver is kept."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


# Any fixed key: every pilot process creating or upgrading the tables of one database takes it.
_SCHEMA_LOCK = 0x70696C6F74


def _create_tables(engine: Any) -> None:
    """The tables, made or upgraded, safe when several profilers start at once on a new store:
    they take turns, under an advisory lock on PostgreSQL and SQLite's write lock on a file."""
    dialect = engine.dialect.name
    with engine.connect() as connection:
        if dialect == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _SCHEMA_LOCK})
        elif dialect == "sqlite":
            # Held from the check for each table to its CREATE (SQLite's DDL is transactional);
            # the others wait on the busy timeout, then find the tables made.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            Base.metadata.create_all(connection)
            _add_missing_columns(connection)
            connection.commit()
        finally:
            if dialect == "postgresql":
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _SCHEMA_LOCK})
                connection.commit()


class Store:
    def __init__(self, url: str | None = None) -> None:
        url = url or DEFAULT_URL
        if "://" not in url and url.endswith((".db", ".sqlite", ".sqlite3")):
            url = f"sqlite:///{Path(url).expanduser().resolve()}"  # a bare file path means SQLite
        self.url = _with_driver(url)
        try:
            self.engine = create_engine(self.url, pool_pre_ping=not self.url.startswith("sqlite"),
                                        json_serializer=to_json, json_deserializer=from_json)
        except ModuleNotFoundError as err:
            raise FieldError(f"no driver for {url!r} ({err.name} is not installed; for PostgreSQL: "
                             "pip install 'pilot[postgres]')", field="db") from err
        except Exception as err:  # a malformed URL
            raise FieldError(f"cannot open {url!r} ({err})", field="db") from err
        if self.engine.dialect.name == "sqlite":
            database = self.engine.url.database
            if database and database != ":memory:":
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            _create_tables(self.engine)
        except OperationalError as err:  # no server there, a wrong password, no such database
            raise FieldError(f"cannot open {url!r}: {str(err.orig).strip()}", field="db") from err
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def where(self) -> str:
        """The URL to print: any password masked."""
        return self.engine.url.render_as_string(hide_password=True)

    def session(self) -> Session:
        return self.sessions()

    def get_or_create(self, cls: type[T], fingerprint_value: str, **fields: Any) -> T:
        """The row with this fingerprint, made if missing; safe when another process makes
        the same row at the same moment (the unique constraint decides, we re-read)."""
        with self.session() as session:
            row = session.scalar(select(cls).where(cls.fingerprint == fingerprint_value))  # type: ignore[attr-defined]
            if row is not None:
                return row
            row = cls(fingerprint=fingerprint_value, **fields)
            session.add(row)
            try:
                session.commit()
                return row
            except IntegrityError:
                session.rollback()
        with self.session() as session:
            return session.scalars(select(cls).where(cls.fingerprint == fingerprint_value)).one()  # type: ignore[attr-defined]

    def runs(self, **filters: Any) -> list[Run]:
        with self.session() as session:
            query = select(Run).order_by(Run.id)
            for name, value in filters.items():
                query = query.where(getattr(Run, name) == value)
            return list(session.scalars(query))

    def iter_rows(self, cls: type[T]) -> Iterator[T]:
        with self.session() as session:
            yield from session.scalars(select(cls).order_by(cls.id))  # type: ignore[attr-defined]
