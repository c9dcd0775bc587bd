"""`pilot recommend --max-quality-loss`: only weight quantizations whose measured perplexity cost
is within the bound are searched (an unmeasured one is left out), and the plan records the
measured cost of the one it chose. Quality rows stand in the store as `pilot profile` writes them."""

from __future__ import annotations

import json

import pytest
import yaml
from support.synthetic_cost_model import synthetic_cost_model
from typer.testing import CliRunner

from planner.cli import app
from planner.measure.quality import Quality
from planner.search.candidate import QualityLimit
from planner.store.database import QualityRow, Store
from planner.store.records import model_row

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
         "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
         "intermediate_size": 8192, "vocab_size": 32000, "max_position_embeddings": 8192,
         "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16"}


@pytest.fixture
def store_and_model(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'pilot.db'}")
    synthetic_cost_model(store)
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA))
    return store, model


def _measured(store: Store, model, rows: list[tuple[str, int, float]]) -> None:
    row = model_row(store, str(model))
    with store.session() as session:
        for method, group, ppl in rows:
            session.add(QualityRow(fingerprint=f"{method}{group}", model_id=row.id, quantization=method,
                                   group_size=group, dataset="sharegpt-heldout", texts=16, tokens=4000,
                                   perplexity=ppl, reference_perplexity=10.0))
        session.commit()


def _recommend(store, model, out, *extra: str):
    return CliRunner().invoke(app, ["recommend", "--model", str(model), "--slo", "ttft_p95<=10s,itl_p95<=1s",
                                    "--concurrency", "4", "--hardware", "h100-sxm", "--isl", "128:512",
                                    "--osl", "32:128", "--num-requests", "24", "--trials", "30",
                                    "--db", store.url, "--out", str(out), *extra])


def test_only_quantizations_within_the_bound_are_planned(store_and_model, tmp_path):
    store, model = store_and_model
    _measured(store, model, [("int8", 0, 10.1), ("int4", 128, 10.9)])  # +1% and +9%
    out = tmp_path / "plan.yaml"
    result = _recommend(store, model, out, "--max-quality-loss", "2%")
    assert result.exit_code == 0, result.output
    plan = yaml.safe_load(out.read_text())
    assert plan["engine"]["quantization"] in (None, "int8")  # int4 costs too much; fp8 was never measured
    assert plan["quality"]["max_loss"] == 0.02
    if plan["engine"]["quantization"] == "int8":
        assert plan["quality"]["perplexity_loss"] == pytest.approx(0.01)
    notes = " ".join(" ".join(plan["notes"]).split())
    assert "within 2.0% perplexity: int8 (+1.0%); left out: int4 g128 (+9.0%)" in notes


def test_without_measurements_only_unquantized_weights_are_planned(store_and_model, tmp_path):
    store, model = store_and_model
    out = tmp_path / "plan.yaml"
    result = _recommend(store, model, out, "--max-quality-loss", "0.05")
    assert result.exit_code == 0, result.output
    plan = yaml.safe_load(out.read_text())
    assert plan["engine"]["quantization"] is None and plan["quality"]["scheme"] == "none"
    assert "no perplexity measured for this model" in " ".join(plan["notes"])


def test_a_bad_bound_is_named(store_and_model, tmp_path):
    store, model = store_and_model
    result = _recommend(store, model, tmp_path / "p.yaml", "--max-quality-loss", "lots")
    assert result.exit_code == 2 and "--max-quality-loss: cannot read 'lots' as a share" in result.output


def test_a_limit_judges_the_scheme_a_config_runs():
    from engine import EngineConfig

    limit = QualityLimit(0.02, [Quality("int4", 32, 10.1, 10.0, 100), Quality("int4", 128, 11.0, 10.0, 100)])
    config = EngineConfig(model="m", quantization="int4", quantization_group_size=32)
    assert limit.allows(config) and limit.of(config).group_size == 32
    assert not limit.allows(config.model_copy(update={"quantization_group_size": 128}))
    assert not limit.allows(config.model_copy(update={"quantization": "int8"}))  # never measured
    assert limit.allows(config.model_copy(update={"quantization": None}))
