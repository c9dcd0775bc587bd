"""Profiling to an accuracy: the cross-validated error of what is measured so far and the fold
models' committee (`estimate`), a stop rule on it (`until`), an order that measures next where
the committee disagrees most (`adaptive`), and the watch that ties them to
`planner.measure.profiler.profile` (`watch`)."""

from planner._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Accuracy": "estimate",
    "cross_validated": "estimate",
    "StopRule": "until",
    "parse_until": "until",
    "AdaptiveOrder": "adaptive",
    "AccuracyWatch": "watch",
    "watch_profile": "watch",
    "outlook": "watch",
})
