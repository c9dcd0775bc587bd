"""GPU truth: plans for GPUs priced from kernel timings measured on real GPUs (NVIDIA's
aiconfigurator-core, an optional extra) and judged against serving runs measured there.

`tables` reads the measurements, `grid` interpolates them, `step_time` prices one engine step,
`memory` sizes the KV cache as the serving engines do, `schedule` sets the engine's scheduler
the way each serving engine batches, `overhead` and `calibration` hold what the kernels cannot
show (the framework's own time, fitted on end-to-end runs, and the held-out errors),
`validation` replays measured runs, and `predict` is `pilot recommend`'s GPU predictor."""

from planner._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "KernelTables": "tables",
    "KernelDataError": "tables",
    "KernelStepTime": "step_time",
    "KernelPredictor": "predict",
    "GpuCalibration": "calibration",
    "memory_plan": "memory",
})
