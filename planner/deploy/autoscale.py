"""Scaling a plan's replicas on the server's own Prometheus gauge of running requests.

The target is what one replica holds in flight at the load it was planned for: by Little's law
the per-replica request rate times the predicted end-to-end latency (the predicted median: the
mean is a little higher, so the autoscaler adds a replica slightly early), or the per-replica
clients for a concurrency plan, capped at the batch the engine admits. Scaling on the running
batch, not the waiting queue: the engines admit every request up to max_num_seqs at once, so the
queue stays empty until the batch is full, when the plan's latencies are already past.

KEDA is the default: it reads Prometheus directly with one query. An HPA on a Pods metric needs
the custom metrics API served by prometheus-adapter with a rule that renames the gauge
(docs/deploy.md has it)."""

from __future__ import annotations

from planner.deploy.engines import RUNNING_METRIC
from planner.deploy.options import DeployError, DeployOptions
from planner.search.plan import Plan

# Pods take minutes to start: a burst shorter than a minute is not worth one, and capacity is
# given back slowly, one replica every two minutes after five quiet ones.
SCALE_UP_WINDOW_S, SCALE_DOWN_WINDOW_S, SCALE_DOWN_PERIOD_S = 60, 300, 120
POLLING_INTERVAL_S = 15


def in_flight_target(plan: Plan) -> float:
    """Requests one replica runs at the plan's load (the autoscaler's per-replica target)."""
    if plan.load.kind == "concurrency":
        in_flight = plan.load.per_replica
    else:
        e2e = plan.predicted.get("e2e_p50")
        if e2e is None:
            raise DeployError("the plan predicts no end-to-end latency, which the autoscaler's target "
                              "is made from: pass --autoscaler none", "predicted.e2e_p50", in_plan=True)
        in_flight = plan.load.per_replica * e2e.value
    batch = plan.engine.max_num_seqs * plan.engine.data_parallel_size
    return round(max(min(in_flight, batch), 0.01), 2)


def replica_bounds(plan: Plan, options: DeployOptions) -> tuple[int, int]:
    """(min, max): the plan's replicas hold its load, so they are the floor; twice that the cap."""
    low = options.min_replicas or plan.replicas
    high = options.max_replicas or max(2 * plan.replicas, low)
    if high < low:
        raise DeployError(f"{high} is below the {low} replicas kept at least (--min-replicas, default the "
                          "plan's)", "max_replicas")
    return low, high


def query(plan: Plan, namespace: str, pod_pattern: str) -> str:
    """The replicas' running requests summed; the autoscaler divides by the per-replica target."""
    return (f'sum({RUNNING_METRIC[plan.serve_with]}{{namespace="{namespace}",pod=~"{pod_pattern}"}})')


def _behavior() -> dict:
    return {"scaleUp": {"stabilizationWindowSeconds": SCALE_UP_WINDOW_S},
            "scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S,
                          "policies": [{"type": "Pods", "value": 1, "periodSeconds": SCALE_DOWN_PERIOD_S}]}}


def scaled_object(name: str, target: dict, plan: Plan, options: DeployOptions, pod_pattern: str,
                  labels: dict) -> dict:
    low, high = replica_bounds(plan, options)
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": target,
            "minReplicaCount": low, "maxReplicaCount": high,
            "pollingInterval": POLLING_INTERVAL_S,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior()}},
            "triggers": [{"type": "prometheus", "metricType": "AverageValue", "metadata": {
                "serverAddress": options.prometheus_url,
                "query": query(plan, options.namespace, pod_pattern),
                "threshold": f"{in_flight_target(plan):g}",
            }}],
        },
    }


def hpa_metric_name(plan: Plan) -> str:
    """The gauge as prometheus-adapter's rule renames it (the custom metrics API takes no ':')."""
    return RUNNING_METRIC[plan.serve_with].replace(":", "_")


def horizontal_pod_autoscaler(name: str, target: dict, plan: Plan, options: DeployOptions,
                              labels: dict) -> dict:
    low, high = replica_bounds(plan, options)
    milli = round(in_flight_target(plan) * 1000)
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": target, "minReplicas": low, "maxReplicas": high,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": hpa_metric_name(plan)},
                "target": {"type": "AverageValue",
                           "averageValue": str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"}}}],
            "behavior": _behavior(),
        },
    }
