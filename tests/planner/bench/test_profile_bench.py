"""`pilot bench profile`'s parts: a test set drawn at random and measured twice, held-out error
of a model fitted on another store's runs, and the picture. (The curves themselves are a
benchmark: `pilot bench profile`, docs/performance.md.)"""

from __future__ import annotations

import numpy as np
from support.mini_space import WORKLOAD, mini_space

from planner.bench.profile import (
    TEST_REPEATS,
    Curve,
    LearningCurves,
    held_out_error,
    measure_test_set,
    plot_curves,
)
from planner.costmodel.fit import measurement_groups
from planner.costmodel.fit_data import load_runs
from planner.measure.profiler import plan_campaign, profile
from planner.store.database import Store


def test_a_model_fitted_on_one_store_is_judged_on_a_test_set_it_never_saw(model_dir, tmp_path):
    _, space = mini_space(tmp_path)
    test_store = Store(f"sqlite:///{tmp_path / 'test.db'}")
    test = measure_test_set(test_store, model_dir, space, WORKLOAD, "engine", count=2, seed=0)
    groups = measurement_groups(test)
    assert len(test) == 2 * TEST_REPEATS and np.bincount(groups).tolist() == [TEST_REPEATS, TEST_REPEATS]
    # Drawn at random from the campaign, not its first measurements; the same draw resumes.
    configs = {(r.config["quantization"], r.config["max_num_seqs"], r.load_value) for r in test}
    assert configs != {(None, 1, 1.0), (None, 1, 4.0)}
    assert len(measure_test_set(test_store, model_dir, space, WORKLOAD, "engine", count=2, seed=0)) == len(test)
    # A second sitting measures the same two again; a measurement's truth is the median of its four runs.
    both = measure_test_set(test_store, model_dir, space, WORKLOAD, "engine", count=2, seed=0, sitting=2)
    assert np.bincount(measurement_groups(both)).tolist() == [2 * TEST_REPEATS] * 2
    assert {(r.config["quantization"], r.config["max_num_seqs"], r.load_value) for r in both} == configs

    train_store = Store(f"sqlite:///{tmp_path / 'train.db'}")
    profile(train_store, plan_campaign(train_store, model_dir, space, WORKLOAD), WORKLOAD, 600,
            via="engine", max_runs=6)
    train = load_runs(train_store)
    error = held_out_error(train, test)
    assert 0 < error["median_ape"] <= error["p90_ape"] < 10
    # Each store measured the host's rates itself; the test runs are judged on the training store's.
    assert all(run.hardware_rates == train[0].hardware_rates for run in test)


def test_the_picture_has_a_panel_per_model(tmp_path):
    curves = LearningCurves([1, 2], "engine", [
        Curve("tiny", order, [{"minutes": 1, "runs": 9, "median_ape": 0.2 * k, "p90_ape": 0.5 * k},
                              {"minutes": 2, "runs": 20, "median_ape": 0.1 * k, "p90_ape": 0.3 * k}])
        for order, k in (("builtin", 1.0), ("adaptive", 0.8))], {"tiny": {"median_ape": 0.03}}, {"tiny": 12})
    path = tmp_path / "curves.png"
    plot_curves(curves, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert curves.to_dict()["curves"][1]["order"] == "adaptive"
