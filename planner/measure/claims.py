"""Who runs which experiment of a campaign: claims taken atomically in the store, renewed while
an experiment runs, and taken over from a process that died (on this host at once, elsewhere
once its heartbeat has stopped). Several profilers, on one machine or many sharing a database
server, each take their own experiments this way and none runs one twice."""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from typing import Callable

from sqlalchemy import Select, or_, select, update
from sqlalchemy.orm import Session

from planner.store.database import Experiment, Store, utcnow

# A process running an experiment renews its claim this often; a claim by a process on another
# host is taken over once it has gone this long without renewal (its machine died or was cut off).
# PILOT_HEARTBEAT_S and PILOT_STALE_CLAIM_S change them (every machine of a campaign alike).
HEARTBEAT_S = 30.0
STALE_CLAIM = dt.timedelta(minutes=5)
CLAIM_WINDOW = 32  # open experiments read per claim in the campaign's order


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{variable}: must be a positive number of seconds, got {text!r}")
    return value


def heartbeat_s() -> float:
    return _seconds("PILOT_HEARTBEAT_S", HEARTBEAT_S)


def stale_claim() -> dt.timedelta:
    return dt.timedelta(seconds=_seconds("PILOT_STALE_CLAIM_S", STALE_CLAIM.total_seconds()))


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _abandoned(owner: str | None, claimed_at: dt.datetime | None) -> bool:
    """Whether a claim's process is gone: dead on this host, or silent for too long elsewhere."""
    if owner is None:
        return True
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False
    if claimed_at is None:
        return True
    if claimed_at.tzinfo is None:  # SQLite hands back naive datetimes
        claimed_at = claimed_at.replace(tzinfo=dt.timezone.utc)
    return utcnow() - claimed_at > stale_claim()


# Reorders the experiments open to claim (given in campaign order); the first it can claim is taken.
Rank = Callable[[list[Experiment]], list[Experiment]]


def claim_next(store: Store, campaign_id: int, rank: Rank | None = None) -> Experiment | None:
    """Atomically take the first experiment nobody is running (or whose runner died), in the
    campaign's order or as `rank` orders them."""
    with store.session() as session:
        open_ = select(Experiment).where(Experiment.campaign_id == campaign_id,
                                         or_(Experiment.status == "pending", Experiment.status == "running"))
        # In the campaign's order the first few are enough, unless other profilers take them
        # all first: loading thousands of experiments per claim cost more than a small run.
        window = None if rank else CLAIM_WINDOW
        experiment = _claim(session, open_, rank, window)
        if experiment is None and window is not None:
            experiment = _claim(session, open_, rank, None)
        return experiment


def _claim(session: Session, open_: Select, rank: Rank | None, window: int | None) -> Experiment | None:
    candidates = [exp for exp in session.scalars(open_.order_by(Experiment.position).limit(window))
                  if exp.status == "pending" or _abandoned(exp.owner, exp.claimed_at)]
    for exp in rank(candidates) if rank and candidates else candidates:
        taken = session.execute(
            update(Experiment).where(Experiment.id == exp.id, Experiment.status == exp.status,
                                     Experiment.owner.is_(exp.owner) if exp.owner is None
                                     else Experiment.owner == exp.owner)
            .values(status="running", owner=_me(), claimed_at=utcnow()))
        session.commit()
        if taken.rowcount == 1:
            return session.get(Experiment, exp.id)
    return None


class Heartbeat:
    """Renews this process's claim on an experiment every `every_s` while it runs, from a thread,
    so that other machines can tell a long run from a dead one."""

    def __init__(self, store: Store, experiment_id: int, every_s: float | None = None) -> None:
        self.store, self.experiment_id = store, experiment_id
        self.every_s = heartbeat_s() if every_s is None else every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="pilot-claim-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                with self.store.session() as session:
                    session.execute(update(Experiment).where(
                        Experiment.id == self.experiment_id, Experiment.status == "running",
                        Experiment.owner == _me()).values(claimed_at=utcnow()))
                    session.commit()
            except Exception:  # a store busy or unreachable for a moment: the next beat retries
                continue


def fail_config(store: Store, experiment: Experiment, error: str) -> list[int]:
    """The engine refused this configuration: every load level of it still waiting fails with
    the same error, rather than loading it again per level. Returns the experiments failed."""
    waiting = or_(Experiment.id == experiment.id, Experiment.status == "pending")
    with store.session() as session:
        ids = list(session.scalars(select(Experiment.id).where(
            Experiment.campaign_id == experiment.campaign_id,
            Experiment.engine_config_id == experiment.engine_config_id, waiting)))
        session.execute(update(Experiment).where(Experiment.id.in_(ids))
                        .values(status="failed", owner=None, error=error))
        session.commit()
    return ids


def release(store: Store, experiment_id: int, status: str = "pending", error: str | None = None) -> None:
    with store.session() as session:
        session.execute(update(Experiment).where(Experiment.id == experiment_id)
                        .values(status=status, owner=None, error=error))
        session.commit()
