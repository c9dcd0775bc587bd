"""Choosing a deployment: candidates and their ranking (`candidate`), the Optuna search
(`recommend`), the plan file (`plan`), launching and measuring a plan (`verify`) and the
plan's equivalent vLLM and SGLang launch arguments (`launch_args`)."""

from planner._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Requirement": "candidate",
    "Candidate": "candidate",
    "RecommendError": "candidate",
    "Search": "recommend",
    "SearchResult": "recommend",
    "run_search": "recommend",
    "Plan": "plan",
    "PlanError": "plan",
    "make_plan": "plan",
    "verify": "verify",
    "VerifyError": "verify",
    "vllm_args": "launch_args",
    "sglang_args": "launch_args",
})
