"""What the step-time model reads of a step: its composition, the configuration, and the
physics terms of the roofline and beyond (`PHYSICS`), as the columns of `feature_matrix`."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from engine.rules import prefills_row_by_row
from planner.costmodel.roofline import TERMS, Deployment, Device, step_terms, weight_bytes_per_param

COMPOSITION = ("num_seqs", "num_prefill_seqs", "num_decode_seqs", "num_prefill_tokens",
               "num_decode_tokens", "context_tokens", "num_draft_tokens")
# The physics terms beyond the roofline's (docs/cost-model.md has what each was measured to fix):
# "prefill_pass": a layer pass run op by op, which steps whose prompts are too long to run as
#   fused decode rows pay (`engine.rules.prefills_row_by_row`) and the roofline does not see;
# "weights_cached_s": the share of weight reads the last-level cache serves (`cache_bytes_`),
#   priced apart from those from memory ("weights_s");
# "int4_unpack_s": int4 weights over the FLOP rate, since unpacking is work per weight, not per byte;
# "attention_scores_s": layers x query heads x token pairs over the FLOP rate, since a score
#   costs about the same whatever the head dimension.
PHYSICS = ("step", "seq", "layer_pass", *TERMS, "prefill_pass", "weights_cached_s", "int4_unpack_s",
           "attention_scores_s")
DIRECT = PHYSICS[1:PHYSICS.index("weights_cached_s")]  # read straight from FEATURES
# Saved models name their features (`to_dict`), so this order is free.
FEATURES = (*DIRECT[:-1], *COMPOSITION, "tensor_parallel_size", "data_parallel_size",
            "weight_bytes_per_param", "num_speculative_tokens", "num_layers", "hidden_size",
            "busy_peers",
            # How slow the host ran meanwhile against its typical moment (planner.measure.host_speed):
            # one core, then every core at once.
            "host_slowdown", "host_parallel_slowdown", "prefill_pass",
            # Forward passes the step runs: the target's and, with a draft, k draft passes. The
            # per-step overhead is charged per pass (`per_pass_`).
            "forward_passes",
            # Weight bytes every process of the deployment holds at once (replicas x ranks):
            # what competes for the one cache of a CPU host.
            "resident_weight_bytes", "int4_unpack_s", "attention_scores_s",
            # 1 where the engine core served clients through `pilot serve`: the server process
            # shares the host's cores with it.
            "served")


def feature_matrix(deployment: Deployment, device: Device,
                   steps: Mapping[str, np.ndarray]) -> np.ndarray:
    """[n, len(FEATURES)] for n steps of one deployment on one device. `steps` holds the
    COMPOSITION columns and, for data-parallel deployments, "busy_peers" (`fit_data.busy_peers`:
    how many other replicas were mid-step meanwhile; none if absent), and "host_slowdown" and
    "host_parallel_slowdown" (`planner.measure.host_speed.slowdown` of its two readings; 1.0, a typical
    moment, if absent), and "served" (1 through `pilot serve`; 0, in process, if absent)."""
    comp = {name: np.asarray(steps[name], dtype=float) for name in COMPOSITION}
    n = len(comp["num_seqs"])

    def optional(name: str, default: float) -> np.ndarray:
        return np.asarray(steps[name], dtype=float) if name in steps else np.full(n, default)

    terms = step_terms(deployment, device, comp["num_seqs"], comp["num_prefill_seqs"],
                       comp["num_prefill_tokens"], comp["num_decode_tokens"], comp["context_tokens"],
                       comp["num_draft_tokens"])
    decoding = (comp["num_decode_seqs"] > 0).astype(float)
    op_by_op = (comp["num_prefill_seqs"] > 0) & ~prefills_row_by_row(comp["num_prefill_seqs"],
                                                                      comp["num_prefill_tokens"])
    draft_layers = deployment.draft.num_layers if deployment.draft is not None else 0
    layer_pass = deployment.target.num_layers + decoding * deployment.num_speculative_tokens * draft_layers
    constants = {
        "tensor_parallel_size": deployment.tensor_parallel_size,
        "data_parallel_size": deployment.data_parallel_size,
        "weight_bytes_per_param": weight_bytes_per_param(deployment.dtype, deployment.quantization,
                                                         deployment.group_size),
        "num_speculative_tokens": deployment.num_speculative_tokens,
        "num_layers": deployment.target.num_layers, "hidden_size": deployment.target.hidden_size,
        "resident_weight_bytes": deployment.weight_bytes * deployment.tensor_parallel_size
                                 * deployment.data_parallel_size,
        "int4_unpack_s": (deployment.target.weight_params / deployment.tensor_parallel_size / device.flops
                          if deployment.quantization == "int4" else 0.0),
    }
    columns = {"seq": comp["num_seqs"], "layer_pass": layer_pass, **terms, **comp,
               "forward_passes": 1.0 + decoding * (deployment.num_speculative_tokens if deployment.draft else 0),
               "prefill_pass": op_by_op * float(deployment.target.num_layers),
               **{k: np.full(n, float(v)) for k, v in constants.items()},
               "busy_peers": optional("busy_peers", 0.0), "host_slowdown": optional("host_slowdown", 1.0),
               "host_parallel_slowdown": optional("host_parallel_slowdown", 1.0),
               "served": optional("served", 0.0)}
    return np.column_stack([columns[name] for name in FEATURES])
