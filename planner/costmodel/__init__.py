"""The cost model: a step's physics (`roofline`), the step-time model with its boosted residual
and intervals (`step_model`), the store's runs as training data (`fit_data`, `noise_floor`),
fitting and cross-validation (`fit`), the engine's own Scheduler on a virtual clock
(`simulator`) and a deployment's predicted metrics (`predict`)."""

from planner._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "CostModel": "fit",
    "FitError": "fit",
    "StepTimeModel": "step_model",
    "Simulator": "simulator",
    "SimulationResult": "simulator",
    "Predictor": "predict",
    "Prediction": "predict",
    "ModelShape": "roofline",
    "Device": "roofline",
    "Deployment": "roofline",
})
