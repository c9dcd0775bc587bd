"""`pilot fit`: the step-time model, its storage, cross-validation, and the simulator's error on
real engine runs it never saw."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingRegressor
from support.profiled import profile_two_models, small_workload
from support.saved_models import coefficients, saved_positionally

from engine import LLM, EngineConfig
from engine.model_zoo import SHAPES
from engine.rules import ROW_BY_ROW_MEAN_PREFILL
from planner.costmodel import fit as cost_model
from planner.costmodel.features import FEATURES, PHYSICS, feature_matrix
from planner.costmodel.fit_data import busy_peers, load_runs
from planner.costmodel.jitter import NOISE_LEVELS, WIDE_BATCH, QuasiJitter, duration_band
from planner.costmodel.predict import predict
from planner.costmodel.roofline import TERMS, Deployment, Device, ModelShape
from planner.costmodel.step_model import CACHE_GRID_BYTES, StepTimeModel
from planner.costmodel.trees import TreeEnsemble
from planner.measure.in_process import run_load
from planner.spec.slo import RequestLatency, summarize
from planner.store.database import Store

# The simulator's error on held-out real runs of a tiny model in CI, where a step is about a
# millisecond of mostly Python and any other process on the machine shows up in it. The
# accuracy targets (median APE <= 8%) are for profiles of real models: README, `pilot fit`.
HELD_OUT_MEDIAN_APE = {"itl_p50": 0.25, "throughput_tok_s": 0.25,
                       # A tiny model's TTFT is one prefill of about a millisecond plus queueing
                       # behind a few such steps: in a full test session it swings the most.
                       "ttft_p50": 0.75}


# -- the pieces -------------------------------------------------------------------------------


def test_tree_ensemble_predicts_exactly_what_scikit_learn_does():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 6))
    y = np.sin(X[:, 0]) + X[:, 1] * X[:, 2] + 0.1 * rng.normal(size=3000)
    booster = HistGradientBoostingRegressor(max_iter=60, max_depth=5, early_stopping=False).fit(X, y)
    trees = TreeEnsemble.from_sklearn(booster)
    test = rng.normal(scale=3, size=(500, 6))  # far outside the training range too
    np.testing.assert_allclose(trees.predict(test), booster.predict(test), rtol=1e-10, atol=1e-10)
    again = TreeEnsemble.from_dict(json.loads(json.dumps(trees.to_dict())))
    np.testing.assert_allclose(again.predict(test), booster.predict(test), rtol=1e-10, atol=1e-10)


def _synthetic_steps(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps of three deployments whose true time is a known roofline plus overheads."""
    shape = ModelShape(**{"hidden_size": 512, "intermediate_size": 1536, "num_layers": 8,
                          "num_heads": 8, "num_kv_heads": 4, "head_dim": 64, "vocab_size": 8000})
    xs, ys = [], []
    for quantization, tp in ((None, 1), ("int8", 1), (None, 2)):
        deployment = Deployment(shape, "bfloat16", quantization, tensor_parallel_size=tp)
        device = Device.for_deployment(deployment, "cpu", 60.0, {"bf16": 1.0, "fp32": 0.5})
        decode = rng.integers(0, 32, n)
        prefill = rng.integers(0, 2, n) * rng.integers(1, 512, n)
        steps = {"num_seqs": decode + (prefill > 0), "num_prefill_seqs": (prefill > 0).astype(int),
                 "num_decode_seqs": decode, "num_prefill_tokens": prefill, "num_decode_tokens": decode,
                 "context_tokens": decode * rng.integers(16, 1024, n) + prefill,
                 "num_draft_tokens": np.zeros(n, dtype=int)}
        steps["num_seqs"] = np.maximum(steps["num_seqs"], 1)
        steps["num_decode_seqs"] = steps["num_seqs"] - steps["num_prefill_seqs"]
        steps["num_decode_tokens"] = steps["num_decode_seqs"]
        X = feature_matrix(deployment, device, steps)
        cols = {name: X[:, i] for i, name in enumerate(FEATURES)}
        truth = (2e-4 + 1e-5 * cols["seq"] + cols["weights_s"] / 0.8 + cols["kv_read_s"] / 0.5
                 + cols["compute_s"] / 0.4 + cols["allreduce_s"])
        xs.append(X)
        ys.append(truth * np.exp(rng.normal(scale=0.02, size=n)))
    return np.concatenate(xs), np.concatenate(ys)


def test_step_time_model_learns_a_roofline_and_round_trips_without_pickle():
    rng = np.random.default_rng(1)
    X, y = _synthetic_steps(rng, 1500)
    groups = np.repeat(np.arange(60), len(y) // 60)
    model = StepTimeModel().fit(X, y, groups)
    X_test, y_test = _synthetic_steps(np.random.default_rng(2), 300)
    error = np.abs(model.predict(X_test) / y_test - 1)
    assert np.median(error) < 0.03
    assert model.efficiency["weights_s"] == pytest.approx(0.8, rel=0.15)
    mid, low, high = model.predict_interval(X_test)
    assert 0.7 <= np.mean((y_test >= low) & (y_test <= high)) <= 0.95
    stored = json.loads(json.dumps(model.to_dict()))  # plain JSON: nothing to unpickle
    np.testing.assert_allclose(StepTimeModel.from_dict(stored).predict(X_test), mid)
    stored["features"] = ["something_else", *stored["features"][1:]]
    with pytest.raises(ValueError, match="pilot fit"):
        StepTimeModel.from_dict(stored)


def _prefilling_steps(rng: np.random.Generator, n: int, decodes_beside_prefill: int) -> tuple[np.ndarray, np.ndarray]:
    """Small-model steps whose true time has a fixed cost per layer whenever the step prefills
    (prompts long enough for the engine's op-by-op path) on top of the roofline; prefills sit
    beside at most `decodes_beside_prefill` decodes."""
    shape = ModelShape(**{"hidden_size": 64, "intermediate_size": 128, "num_layers": 4,
                          "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "vocab_size": 512})
    deployment = Deployment(shape, "bfloat16", None)
    device = Device.for_deployment(deployment, "cpu", 60.0, {"bf16": 1.0, "fp32": 0.5})
    prefilling = rng.random(n) < 0.3
    decode = np.where(prefilling, rng.integers(0, decodes_beside_prefill + 1, n), rng.integers(1, 17, n))
    prompt = np.where(prefilling, rng.integers(ROW_BY_ROW_MEAN_PREFILL + 1, 400, n), 0)
    steps = {"num_seqs": decode + prefilling, "num_prefill_seqs": prefilling.astype(int),
             "num_decode_seqs": decode, "num_prefill_tokens": prompt, "num_decode_tokens": decode,
             "context_tokens": decode * rng.integers(16, 128, n) + prompt,
             "num_draft_tokens": np.zeros(n, dtype=int)}
    X = feature_matrix(deployment, device, steps)
    cols = {name: X[:, i] for i, name in enumerate(FEATURES)}
    truth = (1.2e-4 + 1.5e-5 * cols["seq"] + cols["weights_s"] / 0.3 + cols["compute_s"] / 0.4
             + 8e-5 * shape.num_layers * prefilling)
    return X, truth * np.exp(rng.normal(scale=0.02, size=n))


def test_a_prefill_costs_the_same_beside_many_decodes_as_beside_few():
    """Trained on prefills beside at most two decodes, a prefill beside 16 is charged its fixed
    cost once (`prefill_pass`), not as a ratio of the whole step."""
    X, y = _prefilling_steps(np.random.default_rng(3), 4000, decodes_beside_prefill=2)
    groups = np.repeat(np.arange(40), len(y) // 40)
    X_new, y_new = _prefilling_steps(np.random.default_rng(4), 4000, decodes_beside_prefill=16)
    mixed = (X_new[:, FEATURES.index("num_prefill_seqs")] > 0) & (X_new[:, FEATURES.index("num_decode_seqs")] >= 8)
    column = FEATURES.index("prefill_pass")
    assert set(np.unique(X[:, column])) == {0.0, 4.0}  # a pass per layer when prefilling

    model = StepTimeModel().fit(X, y, groups)
    # The fixed cost is found as what it is, an overhead per layer pass, not hidden in a ratio.
    assert model.overheads_s["prefill_pass"] == pytest.approx(8e-5, rel=0.15)
    assert np.median(np.abs(np.log(model.predict(X_new[mixed]) / y_new[mixed]))) < 0.03


def test_short_prompts_are_charged_no_prefill_pass():
    """The engine runs a step whose prompts average ROW_BY_ROW_MEAN_PREFILL tokens or fewer as
    fused decode rows: no op-by-op layer passes to charge; longer ones pay a pass per layer."""
    shape = ModelShape(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                       num_kv_heads=2, head_dim=16, vocab_size=512)
    deployment = Deployment(shape, "bfloat16", None)
    device = Device.for_deployment(deployment, "cpu", 60.0, {"bf16": 1.0, "fp32": 0.5})
    limit = ROW_BY_ROW_MEAN_PREFILL
    prefills, tokens = np.array([0, 1, 1, 2, 2, 12]), np.array([0, limit, limit + 1, 2 * limit, 2 * limit + 1, 12 * 16])
    steps = {"num_seqs": prefills + 3, "num_prefill_seqs": prefills, "num_decode_seqs": np.full(6, 3),
             "num_prefill_tokens": tokens, "num_decode_tokens": np.full(6, 3),
             "context_tokens": tokens + 300, "num_draft_tokens": np.zeros(6, dtype=int)}
    passes = feature_matrix(deployment, device, steps)[:, FEATURES.index("prefill_pass")]
    assert passes.tolist() == [0, 0, 4, 0, 4, 0]


def test_a_step_model_saved_before_the_prefill_pass_predicts_without_it():
    X, y = _prefilling_steps(np.random.default_rng(5), 1000, decodes_beside_prefill=16)
    data = StepTimeModel().fit(X, y, np.repeat(np.arange(20), 50)).to_dict()
    older = StepTimeModel.from_dict(saved_positionally(data, "prefill_pass", "prefill_pass"))
    ones = np.column_stack([np.ones(len(X)), X[:, [FEATURES.index(n) for n in
                                                   ("seq", "layer_pass", *TERMS)]]])
    kept = coefficients(data, "prefill_pass")
    np.testing.assert_allclose(older.predict_physics(X), np.maximum(ones @ kept, 1e-7))


def _family_decode_steps(rng: np.random.Generator, n: int, hidden: int, layers: int,
                         quantization: str | None = None, heads: int = 4
                         ) -> tuple[np.ndarray, dict[str, np.ndarray], Deployment, Device]:
    """Features of n decode steps of one model of a family (its columns by name too)."""
    shape = ModelShape(hidden_size=hidden, intermediate_size=3 * hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=heads // 2, head_dim=hidden // heads, vocab_size=4096)
    deployment = Deployment(shape, "bfloat16", quantization, group_size=32)
    device = Device.for_deployment(deployment, "cpu", 60.0, {"bf16": 1.0, "fp32": 0.5})
    decode = rng.integers(1, 17, n)
    steps = {"num_seqs": decode, "num_prefill_seqs": np.zeros(n, dtype=int), "num_decode_seqs": decode,
             "num_prefill_tokens": np.zeros(n, dtype=int), "num_decode_tokens": decode,
             "context_tokens": decode * rng.integers(16, 256, n), "num_draft_tokens": np.zeros(n, dtype=int)}
    X = feature_matrix(deployment, device, steps)
    return X, {name: X[:, i] for i, name in enumerate(FEATURES)}, deployment, device


def _cached_family_steps(rng: np.random.Generator, n: int, hidden: int, layers: int,
                         cache_mib: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Decode steps of one model of a family whose host serves the first `cache_mib` of the
    weights from cache at 3x the memory roofline and reads the rest at 0.5x of it."""
    X, cols, deployment, _ = _family_decode_steps(rng, n, hidden, layers)
    cached = min(1.0, cache_mib * 2**20 / deployment.weight_bytes)
    truth = (1.5e-4 + 1e-5 * cols["seq"] + 2e-5 * cols["layer_pass"] + cols["weights_s"] * cached / 3.0
             + cols["weights_s"] * (1 - cached) / 0.5 + cols["compute_s"] / 0.4)
    return X, truth * np.exp(rng.normal(scale=0.02, size=n))


FAMILY = ((128, 2), (256, 4), (384, 6), (512, 6), (768, 8), (1024, 12))


def test_weights_the_cache_holds_are_priced_apart_and_carry_to_a_model_never_seen(monkeypatch):
    """One rate for every weight byte fits neither a model whose weights stay in the host's
    cache nor one that streams them from memory; with the cache's share priced apart, a model
    left out of the fit is predicted from the others."""
    held = FAMILY.index((256, 4))
    parts = [_cached_family_steps(np.random.default_rng(i), 600, hidden, layers)
             for i, (hidden, layers) in enumerate(FAMILY)]
    X = np.vstack([p[0] for i, p in enumerate(parts) if i != held])
    y = np.concatenate([p[1] for i, p in enumerate(parts) if i != held])
    model = StepTimeModel().fit(X, y, np.repeat(np.arange(50), -(-len(y) // 50))[:len(y)])
    assert 4 * 2**20 <= model.cache_bytes_ <= 16 * 2**20
    assert model.efficiency["weights_s"] == pytest.approx(0.5, rel=0.2)
    X_new, y_new = parts[held]
    assert np.median(np.abs(np.log(model.predict_physics(X_new) / y_new))) < 0.08
    assert np.median(np.abs(np.log(model.predict(X_new) / y_new))) < 0.08
    restored = StepTimeModel.from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_allclose(restored.predict(X_new), model.predict(X_new))

    # The same steps without the cache term miss the model left out.
    monkeypatch.setattr("planner.costmodel.step_model.CACHE_GRID_BYTES", (0,))
    uncached = StepTimeModel().fit(X, y, calibrate=False)
    assert uncached.cache_bytes_ == 0.0
    assert np.median(np.abs(np.log(uncached.predict_physics(X_new) / y_new))) > 0.15


def _int4_family_steps(rng: np.random.Generator, n: int, hidden: int, layers: int,
                       quantization: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode steps of one model of a family, in bf16 or int4, on a host that unpacks an int4
    weight in the time 20 FLOPs take at its matmul rate, on top of reading its bytes."""
    X, cols, deployment, device = _family_decode_steps(rng, n, hidden, layers, quantization)
    unpack = 20 * deployment.target.weight_params / device.flops if quantization == "int4" else 0.0
    truth = 1.5e-4 + 1e-5 * cols["seq"] + cols["weights_s"] / 0.5 + cols["compute_s"] / 0.4 + unpack
    return X, truth * np.exp(rng.normal(scale=0.02, size=n))


def test_int4_weights_are_charged_per_weight_unpacked_and_carry_to_a_model_never_seen():
    shapes = ((256, 2), (512, 4), (768, 6), (1024, 8))
    parts = {(h, q): _int4_family_steps(np.random.default_rng(i), 400, h, layers, q)
             for i, ((h, layers), q) in enumerate((s, q) for s in shapes for q in (None, "int4"))}
    fitted = [p for (h, _), p in parts.items() if h != 512]
    X, y = np.vstack([p[0] for p in fitted]), np.concatenate([p[1] for p in fitted])
    model = StepTimeModel().fit(X, y, calibrate=False)
    assert model.physics_coef_[PHYSICS.index("int4_unpack_s")] == pytest.approx(20, rel=0.15)
    X_new, y_new = parts[(512, "int4")]
    assert np.median(np.abs(np.log(model.predict(X_new) / y_new))) < 0.03
    # Without the term (the column zeroed), the physics prices int4 by its bytes alone and
    # misses. (The trees then learn int4 steps' ratio from the other models, but only the
    # physics carries to hardware never measured.)
    column = FEATURES.index("int4_unpack_s")
    blind = StepTimeModel().fit(np.where(np.arange(X.shape[1]) == column, 0.0, X), y, calibrate=False)
    X_blind = np.where(np.arange(X.shape[1]) == column, 0.0, X_new)
    with_term = np.median(np.abs(np.log(model.predict_physics(X_new) / y_new)))
    assert with_term < 0.02
    assert np.median(np.abs(np.log(blind.predict_physics(X_blind) / y_new))) > 2 * with_term

    # A model saved before the term (with the cache split) still predicts as it did.
    data = model.to_dict()
    older = StepTimeModel.from_dict(saved_positionally(data, "int4_unpack_s", "int4_unpack_s"))
    direct = [FEATURES.index(n) for n in PHYSICS[1:PHYSICS.index("weights_cached_s")]]
    columns = np.column_stack([X_new[:, FEATURES.index("forward_passes")], X_new[:, direct]])
    weights, resident = PHYSICS.index("weights_s"), X_new[:, FEATURES.index("resident_weight_bytes")]
    cached = columns[:, weights] * np.minimum(1.0, model.cache_bytes_ / resident)
    columns[:, weights] -= cached
    expected = np.column_stack([columns, cached]) @ coefficients(data, "int4_unpack_s")
    np.testing.assert_allclose(older.predict_physics(X_new), np.maximum(expected, 1e-7))


def test_attention_is_charged_per_score_and_carries_to_heads_never_seen():
    """On a host where a score costs 4,000 FLOPs' time whatever the head dimension, a model
    whose heads are narrower than any fitted is predicted from the others; priced by its bytes
    and FLOPs alone, its long-context steps come out fast."""
    def steps(seed: int, hidden: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
        X, cols, _, _ = _family_decode_steps(np.random.default_rng(seed), 400, hidden, 4, heads=heads)
        truth = (1.5e-4 + 1e-5 * cols["seq"] + cols["weights_s"] / 0.5 + cols["kv_read_s"] / 0.5
                 + cols["compute_s"] / 0.4 + 4000 * cols["attention_scores_s"])
        return X, truth * np.exp(np.random.default_rng(seed + 100).normal(scale=0.02, size=len(truth)))

    fitted = [steps(i, hidden, heads) for i, (hidden, heads) in enumerate(((256, 4), (256, 8), (512, 4),
                                                                          (512, 8), (768, 4), (768, 12)))]
    X, y = np.vstack([p[0] for p in fitted]), np.concatenate([p[1] for p in fitted])
    X_new, y_new = steps(9, 512, 32)  # head dimension 16, where the others have 32 to 192
    model = StepTimeModel().fit(X, y, calibrate=False)
    assert model.physics_coef_[PHYSICS.index("attention_scores_s")] == pytest.approx(4000, rel=0.15)
    assert np.median(np.abs(np.log(model.predict(X_new) / y_new))) < 0.03
    column = FEATURES.index("attention_scores_s")
    blind = StepTimeModel().fit(np.where(np.arange(X.shape[1]) == column, 0.0, X), y, calibrate=False)
    X_blind = np.where(np.arange(X.shape[1]) == column, 0.0, X_new)
    assert np.median(np.log(blind.predict(X_blind) / y_new)) < -0.1

    # A model saved before the term still predicts as it did: its coefficients stop before it.
    data = model.to_dict()
    older = StepTimeModel.from_dict(saved_positionally(data, "attention_scores_s", "attention_scores_s"))
    scores = X_new[:, column] * data["physics_coef"]["attention_scores_s"]
    np.testing.assert_allclose(older.predict_physics(X_new), model.predict_physics(X_new) - scores)
    restored = StepTimeModel.from_dict(json.loads(json.dumps(data)))
    np.testing.assert_allclose(restored.predict(X_new), model.predict(X_new))


def test_the_residual_trees_see_each_terms_share_and_never_the_models_size():
    """The trees correct the physics by what carries to a model never fitted (each term's
    share of the step, its composition, the layout), not by the model's width, depth or weight
    bytes, nor by roofline seconds that grow with them: a correction keyed to those is one
    model's own, and a larger model took the offset of the largest fitted."""
    offsets = (0.0, 0.1, -0.1, 0.05, -0.15)  # each model's own luck: alignment, cache sets
    parts = []
    for i, (hidden, layers) in enumerate(FAMILY[:-1]):
        X, cols, _, _ = _family_decode_steps(np.random.default_rng(i), 400, hidden, layers)
        truth = (1.5e-4 + 1e-5 * cols["seq"] + cols["weights_s"] / 0.5 + cols["kv_read_s"] / 0.5
                 + cols["compute_s"] / 0.4) * np.where(cols["num_seqs"] >= 8, 1.25, 1.0)
        parts.append((X, truth * np.exp(offsets[i] + np.random.default_rng(i + 50).normal(scale=0.02, size=400))))
    X, y = np.vstack([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    X_new = _family_decode_steps(np.random.default_rng(9), 400, *FAMILY[-1])[0]
    resized = X_new.copy()  # (resident bytes also set the physics' cache share, so they stay)
    for name, factor in (("num_layers", 0.25), ("hidden_size", 0.25)):
        resized[:, FEATURES.index(name)] *= factor

    def correction(model: StepTimeModel, X: np.ndarray) -> np.ndarray:
        return model.predict(X) / model.predict_physics(X)

    shares = StepTimeModel().fit(X, y, calibrate=False)
    np.testing.assert_allclose(correction(shares, resized), correction(shares, X_new))
    # And they still correct what the physics misses in the steps fitted.
    fitted_error = np.median(np.abs(np.log(shares.predict(X) / y)))
    assert fitted_error < 0.7 * np.median(np.abs(np.log(shares.predict_physics(X) / y)))
    # No split of theirs reads a size or a roofline second; with the features as they are
    # (models saved before shares), the trees split on them.
    hidden = [FEATURES.index(n) for n in (*TERMS, "int4_unpack_s", "attention_scores_s", "num_layers",
                                          "hidden_size", "resident_weight_bytes")]

    def splits_on_size(trees: TreeEnsemble, offset: int) -> bool:
        read = trees.feature[np.isfinite(trees.threshold)] - offset
        return bool(np.isin(read, hidden).any())

    assert not splits_on_size(shares.residual_, len(PHYSICS))
    raw = StepTimeModel(residual_inputs="features").fit(X, y, calibrate=False)
    assert splits_on_size(raw.residual_, 0)

    data = json.loads(json.dumps(shares.to_dict()))
    assert data["residual_inputs"] == "shares"
    np.testing.assert_allclose(StepTimeModel.from_dict(data).predict(X_new), shares.predict(X_new))
    older = raw.to_dict()
    del older["residual_inputs"]  # saved before the key existed: its trees read the features
    np.testing.assert_allclose(StepTimeModel.from_dict(older).predict(X_new), raw.predict(X_new))
    with pytest.raises(ValueError, match="residual_inputs.*'sizes'"):
        StepTimeModel(residual_inputs="sizes").fit(X, y)
    with pytest.raises(ValueError, match="residual_inputs.*'sizes'"):
        StepTimeModel.from_dict({**data, "residual_inputs": "sizes"})


def test_no_cache_term_where_the_steps_show_none():
    X, y = _synthetic_steps(np.random.default_rng(1), 1500)
    assert StepTimeModel().fit(X, y, calibrate=False).cache_bytes_ == 0.0


def _decode_steps(rng: np.random.Generator, n: int, k: int, layers: int = 4,
                  hidden: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Decode steps of a small target, with a draft proposing k tokens a sequence when k > 0.
    The true time pays a fixed cost per forward pass: the target's, and each draft pass, and
    the draft reads its weights as the target does."""
    target = ModelShape(hidden_size=hidden, intermediate_size=3 * hidden, num_layers=layers, num_heads=4,
                        num_kv_heads=2, head_dim=hidden // 4, vocab_size=512)
    draft = ModelShape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, vocab_size=512)
    deployment = Deployment(target, "bfloat16", None, draft=draft if k else None, num_speculative_tokens=k)
    device = Device.for_deployment(deployment, "cpu", 60.0, {"bf16": 1.0, "fp32": 0.5})
    decode = rng.integers(1, 17, n)
    steps = {"num_seqs": decode, "num_prefill_seqs": np.zeros(n, dtype=int), "num_decode_seqs": decode,
             "num_prefill_tokens": np.zeros(n, dtype=int), "num_decode_tokens": decode * (k + 1),
             "context_tokens": decode * rng.integers(16, 128, n), "num_draft_tokens": decode * k}
    X = feature_matrix(deployment, device, steps)
    cols = {name: X[:, i] for i, name in enumerate(FEATURES)}
    truth = (2e-4 * (1 + k) + 1.5e-5 * cols["seq"] + 2e-5 * cols["layer_pass"]
             + (cols["weights_s"] + cols["draft_s"]) / 0.3 + cols["compute_s"] / 0.4)
    return X, truth * np.exp(rng.normal(scale=0.02, size=n))


def test_a_draft_never_profiled_is_priced_by_its_forward_passes():
    """Fitted on targets alone (of several depths and widths, so a pass's cost, a layer's and
    the weights' come apart), the model prices a target with a draft: each draft pass pays the
    fixed cost any forward pass does (`forward_passes`), and reads its weights at the
    efficiency the target's were read."""
    parts = [_decode_steps(np.random.default_rng(layers), 1000, k=0, layers=layers, hidden=hidden)
             for layers, hidden in ((2, 512), (4, 128), (6, 256))]
    X, y = np.vstack([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    model = StepTimeModel().fit(X, y, np.repeat(np.arange(30), 100))
    assert model.overheads_s["step"] == pytest.approx(2e-4, rel=0.15)
    assert model.efficiency["draft_s"] == model.efficiency["weights_s"] == pytest.approx(0.3, rel=0.15)
    X_spec, y_spec = _decode_steps(np.random.default_rng(20), 1000, k=4)
    assert set(np.unique(X_spec[:, FEATURES.index("forward_passes")])) == {5.0}
    assert np.median(np.abs(np.log(model.predict_physics(X_spec) / y_spec))) < 0.05
    # Charged once a step, as models saved before forward passes were, the draft is nearly free.
    model.per_pass_ = False
    assert np.median(model.predict_physics(X_spec) / y_spec) < 0.75


def test_a_step_model_saved_before_forward_passes_charges_its_overhead_once_a_step():
    X, y = _decode_steps(np.random.default_rng(8), 1000, k=2)
    data = StepTimeModel().fit(X, y, np.repeat(np.arange(20), 50)).to_dict()
    kept = coefficients(data, "weights_cached_s")
    older = StepTimeModel.from_dict(saved_positionally(data, "forward_passes", "weights_cached_s"))
    assert not older.per_pass_ and StepTimeModel.from_dict(data).per_pass_
    once = np.column_stack([np.ones(len(X)), X[:, [FEATURES.index(n) for n in
                                                   ("seq", "layer_pass", *TERMS, "prefill_pass")]]])
    np.testing.assert_allclose(older.predict_physics(X), np.maximum(once @ kept, 1e-7))


def _replay_clocks(model: StepTimeModel, data_parallel_size: int = 1) -> tuple:
    """The jittered and the typical step clocks the replay would use, for one 8-layer bf16 shape."""
    deployment = Deployment(ModelShape(**{"hidden_size": 512, "intermediate_size": 1536, "num_layers": 8,
                                          "num_heads": 8, "num_kv_heads": 4, "head_dim": 64,
                                          "vocab_size": 8000}), "bfloat16", None,
                            data_parallel_size=data_parallel_size)
    device = Device.for_deployment(deployment, "cpu", 60.0, {"bf16": 1.0, "fp32": 0.5})
    return model.step_time(deployment, device), model.step_time(deployment, device, seed=None)


def test_step_jitter_is_kept_per_process_layout():
    rng = np.random.default_rng(3)
    X, y = _synthetic_steps(rng, 1500)
    # The tensor-parallel third of the steps (two processes on one machine) jitters 10x more.
    tp2 = X[:, FEATURES.index("tensor_parallel_size")] == 2
    y = y * np.exp(rng.normal(0, np.where(tp2, 0.3, 0.03)))
    groups = np.repeat(np.arange(60), len(y) // 60)  # 20 runs of each deployment
    model = StepTimeModel().fit(X, y, groups)
    spread = {k: v[89] - v[10] for k, v in model.noise_.items()}  # 90th - 10th percentile
    assert {key for key in spread if "@" not in key} == {
        f"{kind}{layout}" for kind in ("", "prefill/") for layout in ("all", "dp1-tp1", "dp1-tp2")} | {
        "dp1-tp1:wide", "dp1-tp2:wide"}
    assert spread["prefill/dp1-tp2"] > 5 * spread["prefill/dp1-tp1"]
    assert spread["dp1-tp2"] > 5 * spread["dp1-tp1"]
    assert spread["dp1-tp1"] < spread["all"] < spread["dp1-tp2"]
    # Stored as JSON per layout; a model saved before (one list for all) still loads.
    stored = json.loads(json.dumps(model.to_dict()))
    assert StepTimeModel.from_dict(stored).noise_.keys() == model.noise_.keys()
    stored["noise"] = stored["noise"]["all"]
    assert list(StepTimeModel.from_dict(stored).noise_) == ["all"]


def test_short_steps_replay_the_longer_stalls_of_their_duration_band():
    """A stall is time the OS takes, not a share of the step: a 1 ms stall doubles a 1 ms step
    and barely touches a 20 ms one. The jitter is kept per duration band, and the replay draws
    from the band of each step's typical time."""
    rng = np.random.default_rng(7)
    X, y = _synthetic_steps(rng, 3000)
    y = y + np.where(rng.random(len(y)) < 0.1, 1e-3, 0.0)  # one step in ten stalls 1 ms
    model = StepTimeModel().fit(X, y, np.repeat(np.arange(90), len(y) // 90))
    short, long = duration_band(1.5e-3), duration_band(20e-3)
    spread = {band: np.diff(model.jitter_quantiles("dp1-tp1", band=band)[0][[5, 94]])[0]
              for band in (short, long)}
    assert spread[short] > 0.3 and spread[long] < spread[short] / 2
    # The replay: a one-sequence step stalls often, a long batched one seldom.
    step, typical = _replay_clocks(model)
    from engine.observer import StepComposition
    stalled = {}
    for name, c in (("short", StepComposition(1, 0, 1, 0, 1, 64)),
                    ("long", StepComposition(31, 0, 31, 0, 31, 31 * 1000))):
        stalled[name] = np.mean([step(c, 0) / typical(c, 0) > 1.3 for _ in range(500)])
    assert stalled["short"] > 0.05 > 0.01 > stalled["long"]
    # A band with too few steps of its own replays its layout's whole spread.
    assert np.array_equal(model.jitter_quantiles("dp1-tp1", band=99)[0], model.jitter_quantiles("dp1-tp1")[0])


def test_wide_decode_steps_replay_the_calmer_jitter_of_wide_steps():
    """Measured here, a decode step of 16 sequences strayed less from its run's typical time than
    one of 1-4 (98th/50th percentile 1.27 against 1.5-1.8 within a run, tp1dp1). Pooled, the narrow
    steps' stalls set a 16-client run's ITL p95, 21% too slow. Wide steps keep their own spread."""
    rng = np.random.default_rng(9)
    X, y = _synthetic_steps(rng, 3000)
    wide = X[:, FEATURES.index("num_seqs")] >= WIDE_BATCH
    y = y * np.where(~wide & (rng.random(len(y)) < 0.3), 2.0, 1.0)  # narrow steps stall, 2x
    model = StepTimeModel().fit(X, y, np.repeat(np.arange(90), len(y) // 90))
    narrow_q, wide_q = model.jitter_quantiles("dp1-tp1")[0], model.jitter_quantiles("dp1-tp1", wide=True)[0]
    assert wide_q[97] < 0.1 < 0.3 < narrow_q[97]
    assert "dp1-tp1:wide" in model.noise_ and not any(k.startswith("prefill/") and ":wide" in k for k in model.noise_)
    # The replay draws a wide step's jitter from the wide spread, a narrow one's from the rest.
    step, typical = _replay_clocks(model)
    from engine.observer import StepComposition
    stalled = {}
    for name, seqs in (("narrow", WIDE_BATCH - 1), ("wide", WIDE_BATCH)):
        c = StepComposition(seqs, 0, seqs, 0, seqs, seqs * 256)
        stalled[name] = np.mean([step(c, 0) / typical(c, 0) > 1.3 for _ in range(500)])
    assert stalled["narrow"] > 0.05 > 0.01 > stalled["wide"]


def test_decode_jitter_is_a_typical_runs_not_the_longest_runs_pooled_steps():
    """Five long runs that stall (one step in ten, 2x) and five short calm ones: pooled, the
    long runs' steps set the tail for all; the replayed spread averages each run's own."""
    rng = np.random.default_rng(11)
    X, y = _synthetic_steps(rng, 2200)
    X, y = X[:2200], y[:2200]  # one deployment
    groups = np.r_[np.repeat(np.arange(5), 400), np.repeat(np.arange(5, 10), 40)]
    stalls = (groups < 5) & (rng.random(len(y)) < 0.1)
    model = StepTimeModel().fit(X, y * np.where(stalls, 2.0, 1.0), groups)
    p95 = int(np.searchsorted(NOISE_LEVELS, 0.95))
    decoding = X[:, FEATURES.index("num_prefill_seqs")] == 0
    pooled = np.quantile(np.log(np.where(stalls, 2.0, 1.0))[decoding], 0.95)
    assert pooled == pytest.approx(np.log(2))
    assert 0.2 < model.noise_["dp1-tp1"][p95] < 0.5 < pooled


def test_prefill_steps_replay_their_own_jitter_spread_evenly_over_its_quantiles():
    rng = np.random.default_rng(5)
    X, y = _synthetic_steps(rng, 1500)
    prefilling = X[:, FEATURES.index("num_prefill_seqs")] > 0
    # Decode steps stall (one in ten, 2x); prefill steps, long, barely jitter.
    y = y * np.where(prefilling, np.exp(rng.normal(0, 0.02, len(y))),
                     np.where(rng.random(len(y)) < 0.1, 2.0, 1.0))
    # Runs long enough that each shows its stall rate (the spread averages runs' own quantiles).
    model = StepTimeModel().fit(X, y, np.repeat(np.arange(15), len(y) // 15))
    decode, prefill = model.jitter_quantiles("dp1-tp1")
    assert decode[-1] - decode[0] > 0.5 and prefill[-1] - prefill[0] < 0.2
    # Sixteen prefill steps (a conc-1 run's TTFTs) see the distribution's median and range,
    # where sixteen independent draws stray from it; decode draws come from their own stream.
    jitter = QuasiJitter({True: prefill, False: decode}.__getitem__, seed=0)
    draws = np.array([jitter(True) for _ in range(16)])
    assert np.log(np.median(draws)) == pytest.approx(np.interp(0.5, NOISE_LEVELS, prefill), abs=0.01)
    assert np.log(draws.max()) > np.interp(0.9, NOISE_LEVELS, prefill)
    assert np.log(draws.min()) < np.interp(0.1, NOISE_LEVELS, prefill)
    stalls = np.array([jitter(False) for _ in range(1000)]) > 1.5
    assert 0.07 < stalls.mean() < 0.13
    # A model saved before prefill jitter was kept apart replays its one distribution for both.
    model.noise_ = {"all": decode}
    assert all(np.array_equal(q, decode) for q in model.jitter_quantiles("dp1-tp1"))


def test_data_parallel_steps_replay_the_jitter_of_their_peers_state():
    """Two replicas on a small host jitter each other: steps taken while the other replica
    works stall, steps taken alone do not, and the replay keeps the two apart."""
    rng = np.random.default_rng(6)
    X, y = _synthetic_steps(rng, 1500)
    X[:, FEATURES.index("data_parallel_size")] = 2.0
    busy = np.zeros(len(y), dtype=bool)
    busy[len(y) // 2:] = rng.random(len(y) - len(y) // 2) < 0.7  # half the runs alone throughout
    X[:, FEATURES.index("busy_peers")] = busy.astype(float)
    y = y * np.where(busy & (rng.random(len(y)) < 0.2), 1.8, 1.0)
    model = StepTimeModel().fit(X, y, np.repeat(np.arange(60), len(y) // 60))
    alone, crowded = model.jitter_quantiles("dp2-tp1", busy=False), model.jitter_quantiles("dp2-tp1", busy=True)
    spread = {"alone": alone[0][94] - alone[0][5], "busy": crowded[0][94] - crowded[0][5]}
    assert spread["busy"] > 0.4 > 0.15 > spread["alone"]
    assert {"dp2-tp1/busy", "dp2-tp1/alone"} <= set(model.noise_)
    # The replay draws from the state each step is in.
    step, typical_clock = _replay_clocks(model, data_parallel_size=2)
    from engine.observer import StepComposition
    decode = StepComposition(8, 0, 8, 0, 8, 2048)
    typical = typical_clock(decode, 0)
    ratios = {state: np.array([step(decode, peers) / typical for _ in range(400)])
              for state, peers in (("alone", 0), ("busy", 1))}
    assert (ratios["busy"] > 1.5).mean() > 0.1 > 0.01 > (ratios["alone"] > 1.5).mean()
    # A layout of one replica has no such states: the layout's own spread, either way.
    assert np.array_equal(model.jitter_quantiles("dp1-tp1", busy=True)[0], model.jitter_quantiles("dp1-tp1")[0])


def test_replayed_steps_have_the_median_of_measured_ones_when_stalls_skew_them():
    rng = np.random.default_rng(4)
    X, truth = _synthetic_steps(rng, 1500)
    stalls = np.where(rng.random(len(truth)) < 0.1, 0.6, 0.0)  # one step in ten stalls
    y = truth * np.exp(stalls + rng.normal(0, 0.02, len(truth)))
    model = StepTimeModel().fit(X, y, np.repeat(np.arange(60), len(y) // 60))
    median_jitter = np.exp(np.interp(0.5, NOISE_LEVELS, model.noise_["all"]))
    # The regression's mean log-time sits 6% above the median step; the jitter takes it back.
    assert np.median(model.predict(X) / truth) > 1.04
    assert np.median(model.predict(X) * median_jitter / truth) == pytest.approx(1.0, abs=0.02)


def test_busy_peers_is_the_other_replicas_work_during_each_step():
    # Replica 0 steps over [0, 4) in 1 s steps; replica 1 over [1.5, 2.5) and [3.5, 5.5).
    start = np.array([0.0, 1.0, 2.0, 3.0, 1.5, 3.5])
    period = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    replica = np.array([0, 0, 0, 0, 1, 1])
    peers = busy_peers(start, period, replica)
    assert peers == pytest.approx([0.0, 0.5, 0.5, 0.5, 1.0, 0.25])
    assert busy_peers(start[:4], period[:4], replica[:4]) == pytest.approx(np.zeros(4))


def test_step_time_model_learns_that_working_peers_slow_a_step():
    rng = np.random.default_rng(5)
    X, y = _synthetic_steps(rng, 1500)
    column = FEATURES.index("busy_peers")
    X[:, column] = rng.integers(0, 2, len(X))
    y = y * np.where(X[:, column] == 1, 1.2, 1.0)
    model = StepTimeModel().fit(X, y)
    alone, shared = X.copy(), X.copy()
    alone[:, column], shared[:, column] = 0, 1
    assert np.median(model.predict(shared) / model.predict(alone)) == pytest.approx(1.2, rel=0.05)


def test_step_time_model_rejects_bad_training_data():
    X = np.ones((4, len(FEATURES)))
    with pytest.raises(ValueError, match="durations"):
        StepTimeModel().fit(X, np.ones(3))
    with pytest.raises(ValueError, match="> 0"):
        StepTimeModel().fit(X, np.array([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(RuntimeError, match="not fitted"):
        StepTimeModel().predict(X)


# -- fitted on real runs ------------------------------------------------------------------------


def test_fit_cross_validates_by_run_and_by_model_and_saves(profiled, fitted):
    store, _ = profiled
    report = fitted.report
    assert report["data"]["runs"] == 32 and len(report["data"]["models"]) == 2
    for section in ("by_run", "by_model"):
        for metric in cost_model.METRICS:
            m = report[section]["metrics"][metric]
            assert m["runs"] == 32 and 0 <= m["median_ape"] <= m["p90_ape"]
            assert 0 <= m["coverage"] <= 1
    assert len(report["runs"]) == 32
    loaded = cost_model.load(store)
    assert loaded is not None and loaded.data_version == fitted.data_version
    assert cost_model.is_current(store, loaded)
    X = np.abs(np.random.default_rng(0).normal(size=(50, len(FEATURES)))) * 1e-3
    np.testing.assert_allclose(loaded.step_model.predict(X), fitted.step_model.predict(X))
    assert loaded.intervals == fitted.intervals
    assert loaded.quantiles == fitted.quantiles


def test_bounds_hold_a_metric_to_any_confidence_as_held_out_errors_did(profiled, fitted):
    for metric in cost_model.METRICS:
        levels = [fitted.bound(metric, 0.01, c) for c in (0.1, 0.5, 0.8, 0.9, 0.99)]
        assert levels == sorted(levels) and levels[0] < levels[-1]
        # The 90% bound is the 80% interval's upper end: both are the same quantile of the
        # out-of-fold errors.
        assert fitted.bound(metric, 0.01, 0.9) == pytest.approx(fitted.interval(metric, 0.01)[1])
        # A model never seen is held to the leave-one-model-out errors.
        assert fitted.bound(metric, 0.01, 0.9, seen_model=False) == pytest.approx(
            fitted.interval(metric, 0.01, seen_model=False)[1])
    # A model saved before quantiles were kept: a normal in log space through its interval.
    old = dataclasses.replace(fitted, quantiles={})
    low, high = old.interval("ttft_p95", 0.01)
    assert old.bound("ttft_p95", 0.01, 0.9) == pytest.approx(high)
    assert old.bound("ttft_p95", 0.01, 0.1) == pytest.approx(low)
    for bad in (0.0, 1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="confidence"):
            fitted.bound("ttft_p95", 0.01, bad)


def test_the_chance_of_staying_under_a_limit_inverts_the_bound(profiled, fitted):
    for metric in cost_model.METRICS:
        for seen in (True, False):
            for confidence in (0.2, 0.5, 0.9):
                limit = fitted.bound(metric, 0.01, confidence, seen_model=seen)
                assert fitted.chance_under(metric, 0.01, limit, seen_model=seen) == pytest.approx(confidence, abs=0.011)
            # Far past the held-out errors either way: certain, and hopeless.
            assert fitted.chance_under(metric, 0.01, 1000.0, seen) == 1.0
            assert fitted.chance_under(metric, 0.01, 1e-6, seen) == 0.0
    old = dataclasses.replace(fitted, quantiles={})
    assert old.chance_under("ttft_p95", 0.01, old.bound("ttft_p95", 0.01, 0.7)) == pytest.approx(0.7)


def test_repeats_of_one_measurement_are_held_out_together(profiled):
    runs = load_runs(profiled[0])
    twin = dataclasses.replace(runs[0], run_id=-1)  # a repeat: same config, load and requests
    folds = cost_model.run_folds([*runs, twin], folds=3)
    assert folds[-1] == folds[0]
    # Distinct measurements are spread over the folds as a shuffled run index would be.
    alone = cost_model.run_folds(runs, folds=3)
    assert np.array_equal(alone, np.random.default_rng(0).permutation(np.arange(len(runs)) % 3))
    assert np.array_equal(folds[:-1], alone)
    other_load = dataclasses.replace(runs[0], run_id=-2, load_value=runs[0].load_value + 1)
    assert len(set(cost_model.run_folds([runs[0], other_load], folds=2))) == 2


def test_repeats_are_judged_by_their_median_and_show_the_noise_floor():
    groups = np.array([0, 0, 0, 1, 2, 2])
    m = len(cost_model.METRICS)
    measured = np.array([1.0, 1.2, 0.9, 5.0, 2.0, 3.0])[:, None] * np.ones((1, m))
    truth = cost_model.by_measurement(measured, groups)
    np.testing.assert_allclose(truth[:, 0], [1.0, 5.0, 2.5])
    np.testing.assert_allclose(cost_model.by_measurement(measured, groups, np.mean)[:, 0], [31 / 30, 5.0, 2.5])
    floor = cost_model.noise_floor(measured, groups)
    # Each repeated run against the median of its group's others; the single run has none.
    ape = [abs(1.0 / 1.05 - 1), abs(1.2 / 0.95 - 1), abs(0.9 / 1.1 - 1), 1 / 3, 0.5]
    assert floor["measurements"] == 2 and floor["runs"] == 5
    assert floor["overall"]["median_ape"] == pytest.approx(np.median(ape))
    assert floor["metrics"]["itl_p50"]["p90_ape"] == pytest.approx(np.quantile(ape, 0.9))
    assert cost_model.noise_floor(measured, np.arange(6)) is None


def test_the_median_floor_is_what_a_perfect_model_errs_against_medians_of_repeats():
    # 400 configurations, each measured 3 times with log-normal noise of sd 0.2 about its true
    # value: a model predicting the true values exactly errs against the medians by the floor.
    rng = np.random.default_rng(1)
    m = len(cost_model.METRICS)
    true = rng.uniform(1, 10, size=(400, m))
    groups = np.repeat(np.arange(400), 3)
    measured = true[groups] * np.exp(rng.normal(0, 0.2, size=(1200, m)))
    perfect = np.abs(cost_model.by_measurement(measured, groups) / true - 1)
    floor = cost_model.median_noise_floor(measured, groups)
    assert floor["measurements"] == 400
    assert floor["overall"]["median_ape"] == pytest.approx(np.median(perfect), rel=0.1)
    assert floor["overall"]["p90_ape"] == pytest.approx(np.quantile(perfect, 0.9), rel=0.1)
    # Below the single-run floor: a median of three strays less than one run does.
    assert floor["overall"]["median_ape"] < 0.8 * cost_model.noise_floor(measured, groups)["overall"]["median_ape"]
    assert cost_model.median_noise_floor(measured, np.arange(1200)) is None


def _measured_in_sittings(rng: np.random.Generator, sittings: int, runs: int, configurations: int = 400
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each configuration measured in `sittings` sittings of `runs` runs: a sitting is off by a
    spell of sd 0.15 its runs share, each run by sd 0.1 of its own (log scale). Returns the true
    values, each run's measurement and sitting, and the runs."""
    m = len(cost_model.METRICS)
    true = rng.uniform(1, 10, size=(configurations, m))
    groups = np.repeat(np.arange(configurations), sittings * runs)
    sitting_of = np.repeat(np.arange(configurations * sittings), runs)
    spells = rng.normal(0, 0.15, size=(configurations * sittings, m))
    measured = true[groups] * np.exp(spells[sitting_of] + rng.normal(0, 0.1, size=(len(groups), m)))
    return true, groups, sitting_of, measured


def test_the_sitting_floor_sees_the_spells_that_repeats_back_to_back_share():
    # 400 configurations, each measured in two sittings of 3 runs: each sitting is off by a
    # spell of sd 0.15 that its 3 runs share, then each run by sd 0.1 on its own. Against one
    # sitting's median a perfect model errs by the spell and the median's own noise; the
    # spread of repeats sees only the latter, the two sittings see both.
    rng = np.random.default_rng(2)
    m = len(cost_model.METRICS)
    true, groups, sittings, measured = _measured_in_sittings(rng, sittings=2, runs=3)
    one_sitting = cost_model.by_measurement(measured, sittings) / true[np.repeat(np.arange(400), 2)]
    perfect = np.abs(one_sitting - 1)
    floor = cost_model.sitting_noise_floor(measured, groups, sittings)
    assert floor["pairs"] == 400
    assert floor["overall"]["median_ape"] == pytest.approx(np.median(perfect), rel=0.1)
    assert floor["overall"]["p90_ape"] == pytest.approx(np.quantile(perfect, 0.9), rel=0.1)
    # Drawn from the repeats' spread alone, the floor misses the spells by half or more.
    within = cost_model.median_noise_floor(measured, sittings)["overall"]["median_ape"]
    assert within < 0.6 * floor["overall"]["median_ape"]
    # Judged by the median of three sittings instead, a perfect model would err by this much.
    # [configuration, sitting, metric]: a spell, plus the median of three runs' own noise.
    sittings_of_three = (rng.normal(0, 0.15, size=(4000, 3, m)) +
                         np.median(rng.normal(0, 0.1, size=(4000, 3, m, 3)), axis=3))
    sitting_medians = np.median(sittings_of_three, axis=1)
    of_three = np.abs(np.expm1(sitting_medians))
    assert floor["medians_of"]["3"]["median_ape"] == pytest.approx(np.median(of_three), rel=0.15)
    assert floor["medians_of"]["3"]["p90_ape"] == pytest.approx(np.quantile(of_three, 0.9), rel=0.15)
    assert floor["medians_of"]["5"]["p90_ape"] < floor["medians_of"]["3"]["p90_ape"] < floor["overall"]["p90_ape"]
    # Each measurement's truth is the median of its two sittings: that floor is the one judged by.
    assert floor["measurements"] == 400 and floor["judged_by"]["sittings"] == 2
    # One sitting, or runs taken outside any campaign (a negative sitting), say nothing about it.
    assert cost_model.sitting_noise_floor(measured, groups, np.zeros(2400, dtype=int)) is None
    assert cost_model.sitting_noise_floor(measured, groups, np.full(2400, -1)) is None


def test_sittings_of_one_run_each_give_the_floor_of_their_median():
    # 400 configurations, each measured once in each of five sittings: every run is off by its
    # sitting's spell (sd 0.15) and its own noise (sd 0.1). The truth a fit judges by is the
    # median of the five; the floor of that truth comes from pairs of single-run sittings.
    true, groups, sittings, measured = _measured_in_sittings(np.random.default_rng(3), sittings=5, runs=1)
    floor = cost_model.sitting_noise_floor(measured, groups, sittings)
    assert floor["pairs"] == 400 * 10 and floor["measurements"] == 400
    single = np.abs(measured / true[groups] - 1)
    assert floor["overall"]["median_ape"] == pytest.approx(np.median(single), rel=0.1)
    truth = np.abs(cost_model.by_measurement(measured, groups) / true - 1)
    assert floor["judged_by"]["sittings"] == 5
    assert floor["judged_by"]["median_ape"] == pytest.approx(np.median(truth), rel=0.15)
    assert floor["judged_by"]["p90_ape"] == pytest.approx(np.quantile(truth, 0.9), rel=0.15)
    # A sitting of three runs is not paired with one of a single run: their medians stray by
    # different amounts. Here each measurement's first sitting holds three, the others one.
    mixed = np.where(sittings % 5 == 1, sittings - 1, sittings)
    floor_mixed = cost_model.sitting_noise_floor(measured, groups, mixed)
    assert floor_mixed["pairs"] == 400 * 3 and floor_mixed["judged_by"]["sittings"] == 3


def test_each_process_layout_is_bounded_by_its_own_held_out_errors(profiled, fitted):
    runs = load_runs(profiled[0])
    assert {cost_model.layout_of(r.config) for r in runs} == {"single"}
    n = cost_model.MIN_LAYOUT_RUNS
    parallel = [dataclasses.replace(r, config={**r.config, "data_parallel_size": 2}) for r in runs[:n]]
    mixed = [*parallel, *runs[n:]]
    predicted = np.full((len(mixed), len(cost_model.METRICS)), 0.01)
    # Data-parallel runs measured 1.3-1.8x their predictions, single ones within 10%.
    spread = np.random.default_rng(0).uniform(size=predicted.shape)
    measured = predicted * np.where(np.arange(len(mixed))[:, None] < n, 1.3 + 0.5 * spread, 0.95 + 0.1 * spread)
    groups = cost_model.layout_groups(mixed, measured, predicted)
    # The single layout has too few runs for its own errors, and with one layout there are no groups.
    assert list(groups) == ["data-parallel"] and groups["data-parallel"].sum() == n
    assert cost_model.layout_groups(runs, measured[:len(runs)], predicted[:len(runs)]) == {}
    model = dataclasses.replace(fitted, quantiles={
        "run": cost_model.run_quantiles(measured, predicted),
        "run/data-parallel": cost_model.run_quantiles(measured[:n], predicted[:n])},
        intervals={**fitted.intervals, "run": cost_model.run_intervals(measured, predicted),
                   "run/data-parallel": cost_model.run_intervals(measured[:n], predicted[:n])})
    dp = model.bound("itl_p95", 1.0, 0.9, layout="data-parallel")
    assert 1.7 < dp < 1.8 and model.interval("itl_p95", 1.0, layout="data-parallel")[0] > 1.3
    assert model.bound("itl_p95", 1.0, 0.9, layout="single") == model.bound("itl_p95", 1.0, 0.9) < dp
    assert model.chance_under("itl_p95", 1.0, 1.25, layout="data-parallel") == 0.0
    # Pooled, the chance is the share of all runs under the limit: the single ones.
    assert model.chance_under("itl_p95", 1.0, 1.25) == pytest.approx((len(mixed) - n) / len(mixed), abs=0.03)
    # A model the store never saw is held to the leave-one-model-out errors, whatever its layout.
    assert model.bound("itl_p95", 1.0, 0.9, False, "data-parallel") == model.bound("itl_p95", 1.0, 0.9, False)


def test_fit_needs_runs(tmp_path):
    with pytest.raises(cost_model.FitError, match="0 usable runs"):
        cost_model.fit(Store(f"sqlite:///{tmp_path / 'empty.db'}"))


def _measure(model_dir: str, config: dict, concurrency: int) -> dict[str, float]:
    engine_config = EngineConfig(model=model_dir, dtype="float32", num_threads=1, **config)
    llm = LLM(engine_config)
    try:
        run_load(llm.engine, small_workload(), "concurrency", 1, 512)  # warm up, as a profile's first run
        result = run_load(llm.engine, small_workload(), "concurrency", concurrency, 512)
    finally:
        llm.close()
    latencies = [RequestLatency.from_token_times(a, o.metrics.token_times)
                 for a, o in zip(result.arrivals, result.outputs)]
    tokens = sum(len(o.token_ids) for o in result.outputs)
    return {**summarize(latencies), "throughput_tok_s": tokens / result.duration_s}


HELD_OUT = [  # load levels and batch caps the profile never ran
    ({"max_num_seqs": 8, "max_num_batched_tokens": 512}, 2),
    ({"max_num_seqs": 4, "max_num_batched_tokens": 128}, 4),
    ({"max_num_seqs": 8, "max_num_batched_tokens": 256, "quantization": "int8"}, 6),
]
# A configuration and load the profile did run: measured again around the held-out runs, it shows
# how far the machine itself has drifted since the profile (a shared CI runner slows down and
# speeds up by a third within one test session), which is not the simulator's error.
REFERENCE = ({"max_num_seqs": 8, "max_num_batched_tokens": 512}, 4)


def _ratios(model_dir: str, fitted, config: dict, concurrency: int) -> dict[str, float]:
    """predicted / measured for each metric, for one configuration measured now: the median of
    five short runs, so that one run slowed by another process does not decide."""
    runs = [_measure(model_dir, config, concurrency) for _ in range(5)]
    measured = {m: float(np.median([run[m] for run in runs])) for m in HELD_OUT_MEDIAN_APE}
    engine_config = EngineConfig(model=model_dir, dtype="float32", num_threads=1, **config)
    predicted = predict(fitted, engine_config, "cpu-host", small_workload(), "concurrency", concurrency)
    assert predicted.calibrated and predicted.seen_model
    return {m: predicted.metrics[m] / measured[m] for m in HELD_OUT_MEDIAN_APE}


def _held_out_errors(model_dir: str, fitted) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The machine's drift over the test and each metric's drift-corrected held-out errors.

    The reference is measured before and after each held-out configuration, and each is corrected
    by the drift of its own two neighbours: the host's speed moved by 20-30% within one test (CI,
    2026-11-22), and one drift for the whole test then charged that to the simulator."""
    references = [_ratios(model_dir, fitted, *REFERENCE)]
    held_out = []
    for config, concurrency in HELD_OUT:
        held_out.append(_ratios(model_dir, fitted, config, concurrency))
        references.append(_ratios(model_dir, fitted, *REFERENCE))
    local = [{m: float(np.sqrt(a[m] * b[m])) for m in HELD_OUT_MEDIAN_APE} for a, b in zip(references, references[1:])]
    drift = {m: float(np.exp(np.mean([np.log(r[m]) for r in references]))) for m in HELD_OUT_MEDIAN_APE}
    return drift, {m: [abs(ratios[m] / near[m] - 1) for ratios, near in zip(held_out, local)]
                   for m in HELD_OUT_MEDIAN_APE}


def _within_targets(drift: dict[str, float], errors: dict[str, list[float]]) -> bool:
    # A run it was fitted on is reproduced within a factor that only machine drift explains.
    return all(0.5 <= drift[m] <= 2.0 and np.median(errors[m]) <= HELD_OUT_MEDIAN_APE[m]
               for m in HELD_OUT_MEDIAN_APE)


def test_the_simulator_predicts_real_runs_it_never_saw(profiled, fitted, tmp_path):
    _, (model_dir, _) = profiled
    attempts = [_held_out_errors(model_dir, fitted)]
    # Each profile run is measured once, so a spell of a shared runner's noise during the profile
    # is learnt as the speed of the configurations it hit (seen in CI: an int8 configuration
    # predicted at 2.2x its measured ITL; once, a fresh profile taken to check that ran at half
    # the speed of the runs it was checked against). A simulator that is wrong misses on every
    # fresh profile; one that met noise does not, so up to two more are taken.
    for attempt in range(2):
        if _within_targets(*attempts[-1]):
            break
        fresh = tmp_path / f"again{attempt}"
        fresh.mkdir()
        store, _ = profile_two_models(fresh, model_dir)
        attempts.append(_held_out_errors(model_dir, cost_model.fit(store, folds=4)))
    assert _within_targets(*attempts[-1]), attempts


def test_unmeasured_hardware_is_predicted_from_its_spec_and_says_so(profiled, fitted, tmp_path):
    # A config.json is all a prediction reads of a model: price a 1B Llama never profiled. Large
    # enough that reading its weights sets the CPU's step time, not the per-step overheads fitted
    # on two tiny models: at 110M, one fit of a noisy CI run put the CPU within 1.3x of the H100.
    model = tmp_path / "llama-1b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**SHAPES["llama-110m"], "hidden_size": 2048,
                                                   "intermediate_size": 5632, "num_hidden_layers": 16,
                                                   "num_attention_heads": 32, "num_key_value_heads": 8}))
    config = EngineConfig(model=str(model), dtype="bfloat16")
    on_cpu = predict(fitted, config, "cpu-host", small_workload(), "concurrency", 1)
    on_h100 = predict(fitted, config, "h100-sxm", small_workload(), "concurrency", 1)
    assert on_cpu.calibrated and not on_h100.calibrated
    assert not on_h100.seen_model and any("uncalibrated" in n for n in on_h100.notes)
    assert on_h100.metrics["itl_p50"] < on_cpu.metrics["itl_p50"] / 2
    # Its interval is the leave-one-model-out errors around the prediction. With two models
    # those errors can all lean one way, so the interval need not contain the prediction.
    low, high = on_h100.intervals["itl_p50"]
    lomo_low, lomo_high = fitted.intervals["model"]["itl_p50"]
    assert low < high
    assert (low, high) == pytest.approx((on_h100.metrics["itl_p50"] * np.exp(lomo_low),
                                         on_h100.metrics["itl_p50"] * np.exp(lomo_high)))


def test_speculative_configs_need_an_acceptance_rate(profiled, fitted):
    _, (model_dir, _) = profiled
    config = EngineConfig(model=model_dir, dtype="float32", speculative_model=model_dir,
                          num_speculative_tokens=2)
    with pytest.raises(ValueError, match="acceptance_rate"):
        predict(fitted, config, "cpu-host", small_workload(), "concurrency", 1)
    fast = predict(fitted, config, "cpu-host", small_workload(), "concurrency", 1, acceptance_rate=0.9)
    slow = predict(fitted, config, "cpu-host", small_workload(), "concurrency", 1, acceptance_rate=0.1)
    assert fast.metrics["throughput_tok_s"] > slow.metrics["throughput_tok_s"]


# -- the command ----------------------------------------------------------------------------------


def test_cli_fit_prints_the_report_and_json(profiled, tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app

    store, _ = profiled
    runner = CliRunner()
    result = runner.invoke(app, ["fit", "--db", store.url, "--folds", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["by_run"]["folds"] == 3 and "by_model" in report and report["id"] >= 1
    longest = report["data"]["prompt_tokens"]
    assert report["cache_mib"] == 0 or report["cache_mib"] in [c / 2**20 for c in CACHE_GRID_BYTES]
    assert set(report["work_flops"]) == {"int4_unpack_s", "attention_scores_s"}
    assert all(value >= 0 for value in report["work_flops"].values())
    plot = tmp_path / "accuracy.png"
    result = runner.invoke(app, ["fit", "--db", store.url, "--folds", "3", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "Held-out runs" in result.output and "Held-out models" in result.output
    assert "per attention score" in " ".join(result.output.split())
    # Every profiled run carries a reading (the store may hold other tests' runs by now).
    assert re.search(r"Host speed: (\d+) of \1 runs carry a probe reading", " ".join(result.output.split()))
    assert f"prompts up to {longest} tokens" in " ".join(result.output.split())
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, field", [(["--folds", "1"], "--folds"), (["--db", "nope://x"], "--db")])
def test_cli_fit_bad_input_names_the_field(args, field):
    from typer.testing import CliRunner

    from planner.cli import app

    result = CliRunner().invoke(app, ["fit", *args])
    assert result.exit_code == 2 and field in result.output


def test_cli_fit_on_an_empty_store_says_what_to_do(tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app

    result = CliRunner().invoke(app, ["fit", "--db", f"sqlite:///{tmp_path / 'empty.db'}"])
    assert result.exit_code == 2 and "pilot profile" in result.output


def test_a_model_saved_with_features_by_position_loads_and_predicts_as_it_did():
    """A step-time model written by pilot before saved models named their features (the JSON
    in tests/support/data, with its own predictions) loads into today's feature layout."""
    saved = json.loads((Path(__file__).parents[2] / "support" / "data" / "step_model_positional.json").read_text())
    model = StepTimeModel.from_dict(saved["saved"])
    X = np.array(saved["X"])
    # Features added since ("served") come last, at their in-process value 0.
    X = np.column_stack([X, np.zeros((len(X), len(FEATURES) - X.shape[1]))])
    np.testing.assert_allclose(model.predict(X), saved["predict"], rtol=1e-9)
    np.testing.assert_allclose(model.predict_physics(X), saved["physics"], rtol=1e-9)
    # Saved again, it is by name, and loads to the same predictions.
    named = json.loads(json.dumps(model.to_dict()))
    assert isinstance(named["physics_coef"], dict) and named["schema"] == 2
    np.testing.assert_allclose(StepTimeModel.from_dict(named).predict(X), saved["predict"], rtol=1e-9)


def test_saved_trees_split_on_feature_names_and_an_unknown_name_is_refused():
    X, y = _synthetic_steps(np.random.default_rng(3), 400)
    data = json.loads(json.dumps(StepTimeModel().fit(X, y, calibrate=False).to_dict()))
    names = [name for name in data["residual"]["feature"] if name is not None]
    assert names and all(isinstance(name, str) for name in names)
    assert set(names) <= {*FEATURES, *(f"share:{term}" for term in PHYSICS)}
    renamed = {**data, "residual": {**data["residual"], "feature": [
        "no_such_feature" if name == names[0] else name for name in data["residual"]["feature"]]}}
    with pytest.raises(ValueError, match="no_such_feature.*pilot fit"):
        StepTimeModel.from_dict(renamed)


def test_intervals_are_as_wide_as_a_small_sample_warrants():
    # Nine held-out errors: a tenth falls beyond all of them one time in ten on either side,
    # so the 80% interval spans the sample.
    nine = np.arange(1.0, 10.0)
    assert cost_model.conformal(nine) == (1.0, 9.0)
    assert np.quantile(nine, 0.9) < 9.0  # where plain quantiles promise more
    # With many, the k-th of n is the k / (n + 1) quantile.
    many = np.arange(1.0, 100.0)
    assert cost_model.conformal(many) == pytest.approx((10.0, 90.0))
    # Drawn and held out: the interval of n errors covers a new one about 80% of the time.
    rng = np.random.default_rng(0)
    covered = []
    for _ in range(4000):
        sample = rng.normal(size=10)
        low, high = cost_model.conformal(sample[:9])
        covered.append(low <= sample[9] <= high)
    assert 0.78 < np.mean(covered) < 0.82
    # The bounds read the same quantiles, so a 90% bound is the interval's upper end.
    residuals = np.log(np.column_stack([nine] * len(cost_model.METRICS)))
    quantiles = cost_model.run_quantiles(np.exp(residuals), np.ones_like(residuals))
    assert np.interp(0.9, cost_model.QUANTILE_LEVELS, quantiles["itl_p95"]) == pytest.approx(np.log(9.0))
