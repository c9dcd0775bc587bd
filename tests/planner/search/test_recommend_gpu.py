"""The README's GPU example: Llama-3.1-8B from its config.json alone, 4 requests/s of 512-2048
tokens in and 128-512 out, held to ttft_p95<=500ms and itl_p95<=50ms, over four GPU types.
With aiconfigurator-core's measured kernels it plans one GPU with an ITL of a few milliseconds
(published vLLM figures for this model on one H100 are 6-8 ms at low load) and writes the
`vllm serve` command that sets exactly the knobs the plan chose."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from support.synthetic_cost_model import synthetic_cost_model
from typer.testing import CliRunner

from planner.cli import app
from planner.search.plan import Plan
from planner.store.database import Store

# The kernel measurements: installed by the test extra (Python 3.11-3.13, as the package allows).
pytest.importorskip("aiconfigurator_core")

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16",
}
# As the README gives it.
README_ARGS = ["--slo", "ttft_p95<=500ms,itl_p95<=50ms", "--rate", "4", "--isl", "512:2048",
               "--osl", "128:512", "--hardware", "h100-sxm,h200,a100-80gb,l40s", "--trials", "40"]


@pytest.fixture(scope="module")
def gpu_plan(tmp_path_factory) -> tuple[Plan, str]:
    root = tmp_path_factory.mktemp("gpu")
    model = root / "Llama-3.1-8B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_31_8B))
    db = root / "pilot.db"
    synthetic_cost_model(Store(f"sqlite:///{db}"))  # a store holding only CPU-side fits
    out = root / "plan.yaml"
    result = CliRunner().invoke(app, ["recommend", "--model", str(model), *README_ARGS, "--out", str(out),
                                      "--db", str(db)])
    assert result.exit_code == 0, result.output
    return Plan.from_file(out), result.output


def test_the_readme_gpu_example_plans_one_gpu_with_a_few_milliseconds_itl(gpu_plan):
    plan, output = gpu_plan
    assert plan.feasible
    assert plan.hardware.kind == "gpu" and plan.hardware.total_devices == 1
    assert 0.003 <= plan.predicted["itl_p50"].value <= 0.015
    assert all(check.met for check in plan.checks)
    assert "Plan:" in output and "vllm serve" in output


def test_the_plan_says_what_it_rests_on_and_for_which_engine(gpu_plan):
    plan, output = gpu_plan
    assert plan.serve_with == "vllm"
    assert "calibrated from measured kernels" in plan.basis or "spec-sheet estimate" in plan.basis
    assert plan.hardware.name in plan.basis
    assert "predictions: " in output


def test_the_vllm_command_sets_exactly_the_plan_s_knobs(gpu_plan):
    plan, _ = gpu_plan
    argv = shlex.split(plan.launch["vllm"])
    flags = dict(zip(argv, argv[1:]))
    engine = plan.engine
    assert flags["--tensor-parallel-size"] == str(engine.tensor_parallel_size)
    assert flags["--max-num-seqs"] == str(engine.max_num_seqs)
    assert flags["--max-num-batched-tokens"] == str(engine.max_num_batched_tokens)
    assert ("--enable-prefix-caching" in argv) == engine.enable_prefix_caching
    assert ("--enable-chunked-prefill" in argv) == engine.enable_chunked_prefill
    assert (flags.get("--quantization") == "fp8") == (engine.quantization == "fp8")
    assert (flags.get("--kv-cache-dtype") == "fp8") == (engine.kv_cache_dtype == "fp8")


def test_the_plan_file_round_trips_with_its_basis(gpu_plan, tmp_path):
    plan, _ = gpu_plan
    again = Plan.model_validate(yaml.safe_load(plan.to_yaml()))
    assert again.basis == plan.basis and again.serve_with == "vllm"
    assert Path(plan.engine.model).name == "Llama-3.1-8B"


@pytest.mark.parametrize(("flags", "message"), [
    (["--backend", "tgi"], "--backend: must be one of vllm, sglang, got 'tgi'"),
    (["--backend-version", "0.0.1"],
     "--backend-version: vllm '0.0.1' has no gemm measurements on h100_sxm; measured: "),
    (["--hardware", "h900"], "unknown hardware 'h900'; known: "),
])
def test_bad_gpu_flags_are_named_with_what_there_is(tmp_path, flags, message):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_31_8B))
    db = tmp_path / "pilot.db"
    synthetic_cost_model(Store(f"sqlite:///{db}"))
    args = ["recommend", "--model", str(model), "--slo", "ttft_p95<=1s", "--rate", "1", "--trials", "1",
            "--hardware", "h100-sxm", "--db", str(db), *flags]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
