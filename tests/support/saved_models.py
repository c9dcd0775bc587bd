"""Step-time models as older versions of pilot saved them, for the tests that they still load."""

from __future__ import annotations

from typing import Any

from planner.costmodel.features import FEATURES, PHYSICS


def saved_positionally(data: dict[str, Any], features_before: str, terms_before: str) -> dict[str, Any]:
    """`data` (`StepTimeModel.to_dict()`) in the layout saved before names (coefficients and
    features by position), as a version that had neither `features_before` nor `terms_before`
    nor anything after them. Its trees are one leaf: the tests using it judge the physics."""
    kept = PHYSICS[:PHYSICS.index(terms_before)]
    older = {k: v for k, v in data.items() if k not in ("schema", "per_pass")}
    older["features"] = list(FEATURES[:FEATURES.index(features_before)])
    older["physics_coef"] = [data["physics_coef"][name] for name in kept]
    older["residual"] = {"feature": [0], "threshold": [None], "left": [0], "right": [0],
                         "value": [0.0], "roots": [0], "baseline": 0.0, "depth": 0}
    return older


def coefficients(data: dict[str, Any], terms_before: str) -> list[float]:
    """The saved coefficients of the terms before `terms_before`, in PHYSICS order."""
    return [data["physics_coef"][name] for name in PHYSICS[:PHYSICS.index(terms_before)]]
