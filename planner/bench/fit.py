"""`pilot bench fit`: the cost model's reference benchmark.

Profiles a fixed set of model shapes on this machine into one store (resumable: a second
invocation continues each model's campaign), fits, and reports the cross-validated errors
against the targets and against the host's own noise floor (one run against its repeats'
median). The README's cost-model figures come from this command, so they can be measured again
on any machine rather than trusted.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.model_zoo import SHAPES, make_checkpoint
from planner.costmodel import fit as cm
from planner.measure.profiler import plan_again, plan_campaign, profile, space_for_this_host
from planner.spec.errors import FieldError
from planner.spec.workload import Workload
from planner.store.database import Store

# Eight shapes from 0.1M to 110M parameters, each bracketed by others in hidden size and depth,
# so leaving one out asks the model to interpolate (the two ends excepted) rather than guess.
# Bracketed in weight bytes too, from h256 on no more than about 2x apart: a host's last-level
# cache serves a model whose weights fit it far faster than one whose weights do not, and with
# nothing between h256 (7 MB in bf16) and h384 (25 MB), the fit without h256 could not tell where
# this host's edge falls (it took 32 MiB where the full fit takes 8 to 16) and priced h256 30%
# slow. h256x6 (14 MB) sits in that gap.
_SMALL_VOCAB = {**SHAPES["tiny"], "vocab_size": 2048}
REFERENCE_MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(SHAPES["tiny"]),
    "h128": {**_SMALL_VOCAB, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "h256": {**_SMALL_VOCAB, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "h256x6": {**_SMALL_VOCAB, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 1024,
               "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2},
    "h384": {**_SMALL_VOCAB, "vocab_size": 8192, "hidden_size": 384, "intermediate_size": 1024,
             "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
             "max_position_embeddings": 1024},
    "h512": {**_SMALL_VOCAB, "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536,
             "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
             "max_position_embeddings": 1024},
    "h640": {**_SMALL_VOCAB, "vocab_size": 16384, "hidden_size": 640, "intermediate_size": 1792,
             "num_hidden_layers": 8, "num_attention_heads": 10, "num_key_value_heads": 5,
             "max_position_embeddings": 1024},
    "llama-110m": dict(SHAPES["llama-110m"]),
}
# And a ninth: a trained byte-level target with its draft (`pilot models train`), so the
# store holds speculative decoding at a real acceptance rate.
PAIR = "pair"
PAIR_TRAIN_S = 120.0

# The profiling flags of the reference (README, "Cost model").
ISL, OSL, NUM_REQUESTS, REPEATS = "32:256", "16:64", 16, 3


@dataclass(frozen=True)
class FitBenchmark:
    report: dict[str, Any]
    runs: dict[str, int]  # new runs per model in this invocation
    seconds: float

    def summary(self) -> dict[str, Any]:
        """The headline figures: per cross-validation, median / p90 APE and coverage."""
        out = {}
        for section in ("by_run", "by_model"):
            if section in self.report:
                overall = self.report[section]["overall"]
                out[section] = {k: overall[k] for k in ("median_ape", "p90_ape", "coverage")}
        for section in ("noise_floor", "median_noise_floor", "sitting_noise_floor"):
            if self.report.get(section):
                floor = self.report[section]["overall"]
                out[section] = {k: floor[k] for k in ("median_ape", "p90_ape")}
        judged = (self.report.get("sitting_noise_floor") or {}).get("judged_by")
        if judged and judged["sittings"] > 1:
            out["judged_noise_floor"] = {k: judged[k] for k in ("median_ape", "p90_ape", "sittings")}
        return out


def check_names(names: Sequence[str]) -> None:
    """Before anything is made: every name is a reference model, and there is one at least."""
    unknown = [n for n in names if n not in REFERENCE_MODELS and n != PAIR]
    if unknown or not names:
        raise FieldError(f"unknown {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join([*REFERENCE_MODELS, PAIR])}", field="models")


def make_models(workdir: Path, names: Sequence[str], pair_train_s: float = PAIR_TRAIN_S
                ) -> dict[str, tuple[str, str | None]]:
    """Each model's checkpoint (and draft), made once per workdir."""
    check_names(names)
    out: dict[str, tuple[str, str | None]] = {}
    for seed, name in enumerate(names):
        target = workdir / "models" / name
        if name == PAIR:
            if not (target / "draft" / "config.json").is_file():
                from planner.bench.training import train_pair

                train_pair(target, seconds=pair_train_s, seed=seed)
            out[name] = (str(target / "target"), str(target / "draft"))
            continue
        if not (target / "config.json").is_file():
            shape = workdir / "models" / f"{name}.json"
            shape.parent.mkdir(parents=True, exist_ok=True)
            shape.write_text(json.dumps(REFERENCE_MODELS[name]))
            make_checkpoint(shape, target, seed=seed, dtype="float32")
        out[name] = (str(target), None)
    return out


def later_sittings(sittings: int, again: float) -> tuple[int, float]:
    """How many sittings follow each model's first, and the share of measurements each takes
    (`again`; all where it is 0). `again` > 0 with one sitting asked means one later sitting."""
    return max(sittings, 2 if again > 0 else 1) - 1, again or 1.0


def run_fit_benchmark(workdir: Path, budget_s: float, names: Sequence[str] = (*REFERENCE_MODELS, PAIR),
                      folds: int = 5, space: str = "cpu", repeats: int = REPEATS,
                      num_requests: int = NUM_REQUESTS, pair_train_s: float = PAIR_TRAIN_S,
                      again: float = 0.0, sittings: int = 1,
                      on_progress: Callable[[str, float], None] | None = None,
                      max_runs: int | None = None) -> FitBenchmark:
    """Profile each model for `budget_s` (0: fit what the store holds) or `max_runs` runs,
    whichever ends first, then fit and save.

    Then `sittings` - 1 later sittings measure each model's measurements again (the share
    `again` of them; all where it is 0), each after every model's previous one, so a
    measurement's runs span the host's spells and the report can say how far a median moves
    between sittings. `again` > 0 alone means one later sitting."""
    if sittings < 1:
        raise FieldError(f"must be >= 1, got {sittings}", field="sittings")
    later, share = later_sittings(sittings, again)
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{workdir / 'reference.db'}")
    models = make_models(workdir, names, pair_train_s)
    workload = Workload.from_flags(ISL, OSL, concurrency=1, num_requests=num_requests)
    search = space_for_this_host(space)
    runs: dict[str, int] = {}
    campaigns = {name: plan_campaign(store, model_dir, search if draft else search.without_drafts(),
                                     workload, draft, repeats=repeats)
                 for name, (model_dir, draft) in models.items()} if budget_s > 0 or later else {}

    def reporting(name: str) -> Callable[[str, float], None] | None:
        return (lambda label, elapsed: on_progress(f"{name}: {label}", elapsed)) if on_progress else None

    for name, campaign in campaigns.items() if budget_s > 0 else ():
        runs[name] = len(profile(store, campaign, workload, budget_s, on_progress=reporting(name),
                                 max_runs=max_runs).run_ids)
    for sitting in range(2, later + 2):
        for name, campaign in campaigns.items():
            later = plan_again(store, campaign, share, repeats, sitting=sitting)
            label = f"{name} sitting {sitting}"
            done = len(profile(store, later, workload, math.inf, on_progress=reporting(label)).run_ids)
            runs[name] = runs.get(name, 0) + done
    if on_progress:
        on_progress("fitting", 0.0)
    fitted = cm.fit(store, folds=folds)
    cm.save(store, fitted)
    return FitBenchmark(fitted.report, runs, time.perf_counter() - start)
