"""Choosing a deployment: candidates and their ranking (`candidate`), scoring one deployment
(`search`), the Optuna search (`recommend`), trials in parallel processes (`parallel`), the plan
file (`plan`), launching and measuring a plan (`verify`) and the plan's equivalent vLLM and
SGLang launch arguments (`launch_args`)."""

from planner._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Requirement": "candidate",
    "Candidate": "candidate",
    "RecommendError": "candidate",
    "Search": "search",
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
