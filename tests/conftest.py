"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest

from engine.model_zoo import make_checkpoint


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """The built-in tiny Llama, float32, seed 0 (made once per test session)."""
    return str(make_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), seed=0, dtype="float32"))
