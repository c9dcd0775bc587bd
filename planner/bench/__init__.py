"""pilot's self-benchmarks, each printing a table of ratios: the engine against transformers
(`engine`), the serving knobs (`knobs`), the cost model's reference fit (`fit`), simulator
speed (`sim`), recommendations launched and measured (`recommend`, `truth`, `report`), a
server under load (`serve`), and the trained target/draft pair they use (`training`)."""

from planner._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "run_engine_benchmark": "engine",
    "run_knobs_benchmark": "knobs",
    "run_fit_benchmark": "fit",
    "run_sim_benchmark": "sim",
    "run_recommend_benchmark": "recommend",
    "run_bench_serve": "serve",
    "train_pair": "training",
})
