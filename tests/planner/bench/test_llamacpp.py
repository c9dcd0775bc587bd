"""`pilot bench llamacpp`: the engine against llama.cpp on the same weights. Running llama.cpp
needs `llama-cpp-python` (an 8-minute source build), so the measurement itself is opt-in
(`-m benchmark`); without it the command names the install."""

from __future__ import annotations

import json
import sys

import pytest
from support.gguf_files import tiny_with_tokenizer
from typer.testing import CliRunner

from planner.cli import app


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_with_tokenizer(tmp_path_factory.mktemp("llamacpp"), "bfloat16")


def test_without_llama_cpp_the_install_is_named(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    result = CliRunner().invoke(app, ["bench", "llamacpp", "--model", str(model), "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "pip install llama-cpp-python" in result.output


def test_an_unknown_precision_is_named(model, tmp_path):
    pytest.importorskip("llama_cpp")
    result = CliRunner().invoke(app, ["bench", "llamacpp", "--model", str(model), "--precisions", "fp8",
                                      "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "--precisions: unknown fp8; choose from bf16, int8, int4" in result.output


@pytest.mark.benchmark
def test_both_engines_run_the_same_weights(model, tmp_path):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "llamacpp", "--model", str(model), "--precisions", "bf16,int8",
                                      "--workdir", str(tmp_path), "--repeats", "1", "--decode-tokens", "16",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["precision"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["bf16"]["greedy_equal"] >= 8  # same weights: the same greedy tokens until rounding differs
    assert all(r["pilot_decode_tok_s"] > 0 and r["llamacpp_decode_tok_s"] > 0 for r in rows.values())
