"""The Kubernetes objects of one plan, as dicts: a Deployment (or, for a replica spanning nodes, a
LeaderWorkerSet), its Service, the autoscaler, and the plan file the ConfigMap is generated from."""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.deploy import autoscale, engines
from planner.deploy.options import DeployOptions, check_name, default_name, secret_ref
from planner.deploy.resources import PodShape, container_resources, hardware_spec, pod_shape
from planner.deploy.weights import Weights, deployed_plan, weights_for
from planner.search.launch_args import export_notes
from planner.search.plan import Plan

LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
# In-flight requests get this long to finish when a pod is stopped (scale-down, rollout).
GRACE_S = 120


@dataclass
class Manifests:
    name: str
    plan: Plan  # as deployed: the pod's paths
    shape: PodShape
    image: str  # the base's image reference; the overlay may rename it
    resources: dict[str, dict]  # file name in the base -> object
    pod_pattern: str  # the serving pods' names, as the autoscaler's query selects them
    notes: list[str] = field(default_factory=list)

    @property
    def config_map_name(self) -> str:
        return f"{self.name}-plan"


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "llm-server",
            "app.kubernetes.io/part-of": "pilot"}


def _plan_annotations(plan: Plan) -> dict[str, str]:
    """What the plan promised, on the workload, for whoever finds it running."""
    return {"pilot/hardware": f"{plan.hardware.name} x{plan.hardware.devices_per_replica} per replica",
            "pilot/serve-with": plan.serve_with, "pilot/slos": ",".join(plan.slos),
            "pilot/load": f"{plan.load.kind} {plan.load.value:g} ({plan.load.per_replica:g} per replica)",
            "pilot/plan-created-at": plan.created_at.isoformat()}


def _container(plan: Plan, shape: PodShape, weights: Weights, image: str, spec: dict, leader: bool,
               options: DeployOptions) -> dict:
    container: dict = {"name": "server", "image": image, "imagePullPolicy": "IfNotPresent", **spec}
    env = list(weights.env)
    if options.api_key_secret is not None:
        env += engines.api_key_env(plan, *secret_ref(options.api_key_secret, "api_key_secret", "api-key"))
    if plan.serve_with == "pilot":
        # Every cache the engine's libraries keep under $HOME (read-only here) goes to the emptyDir.
        env += [{"name": "PILOT_CACHE", "value": engines.PILOT_CACHE},
                {"name": "XDG_CACHE_HOME", "value": engines.PILOT_CACHE},
                {"name": "TRITON_CACHE_DIR", "value": f"{engines.PILOT_CACHE}/triton"}]
    if env:
        container["env"] = env
    if leader:
        container["ports"] = [{"name": "http", "containerPort": engines.PORT, "protocol": "TCP"}]
        container.update(engines.probes(plan, shape.nodes))
    container["resources"] = container_resources(shape)
    mounts = [{"name": "plan", "mountPath": engines.PLAN_DIR, "readOnly": True}, *weights.mounts,
              {"name": "dshm", "mountPath": "/dev/shm"}]
    if plan.serve_with == "pilot":
        mounts += [{"name": "cache", "mountPath": engines.PILOT_CACHE}, {"name": "tmp", "mountPath": "/tmp"}]
        container["securityContext"] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}
    container["volumeMounts"] = mounts
    return container


def _pod(plan: Plan, shape: PodShape, weights: Weights, image: str, command: dict, leader: bool,
         options: DeployOptions, name: str, labels: dict) -> dict:
    volumes = [{"name": "plan", "configMap": {"name": f"{name}-plan"}}, *weights.volumes,
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shape.shm_gib:g}Gi"}}]
    spec: dict = {"terminationGracePeriodSeconds": GRACE_S,
                  "containers": [_container(plan, shape, weights, image, command, leader, options)]}
    if plan.serve_with == "pilot":
        volumes += [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
        # The image's user (Dockerfile: USER 10001), stated so the kubelet can check it is not root.
        spec["securityContext"] = {"runAsNonRoot": True, "runAsUser": engines.PILOT_UID,
                                   "runAsGroup": engines.PILOT_UID, "fsGroup": engines.PILOT_UID,
                                   "seccompProfile": {"type": "RuntimeDefault"}}
    spec["volumes"] = volumes
    if options.node_selector:
        spec["nodeSelector"] = dict(options.node_selector)
    if shape.gpu_resource is not None:
        # GPU node pools are commonly tainted with the resource name (GKE and AKS do it themselves).
        spec["tolerations"] = [{"key": shape.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    metadata: dict = {"labels": labels}
    if leader:
        metadata["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": str(engines.PORT),
                                   "prometheus.io/path": "/metrics"}
    return {"metadata": metadata, "spec": spec}


CPU_IMAGE_NOTE = "the pilot image as built by default has CPU torch"


def image_notes(plan: Plan, shape: PodShape, image: str) -> list[str]:
    """A GPU plan for pilot's engine run from the image tagged as the default build (CPU torch)."""
    if plan.serve_with != "pilot" or shape.gpu_resource is None:
        return []
    if image.rsplit(":", 1)[-1] != engines.default_image(plan).rsplit(":", 1)[-1]:
        return []
    return [f"{CPU_IMAGE_NOTE}: build it with a CUDA torch (--build-arg TORCH_INDEX_URL=.../whl/cu128), "
            "tag it apart (e.g. 0.1.0-cu128) and pass --image"]


def build_manifests(plan: Plan, options: DeployOptions | None = None) -> Manifests:
    """Every object of the plan's deployment; a DeployError naming the field that prevents it."""
    options = options or DeployOptions()
    options.check()
    spec = hardware_spec(plan)
    shape = pod_shape(plan, spec, options)
    weights = weights_for(plan, options)
    name = options.name or check_name(default_name(options.hf_model or plan.engine.model), "name")
    image = options.image or engines.default_image(plan)
    deployed = deployed_plan(plan, weights, shape)
    labels = _labels(name)
    selector = {"app.kubernetes.io/name": name}
    command = engines.commands(plan, weights.config, weights.served_name, shape.nodes)
    if plan.serve_with == "sglang" and options.api_key_secret is not None:
        command.leader.setdefault("args", []).extend(["--api-key", "$(SGLANG_API_KEY)"])
    annotations = _plan_annotations(plan)
    resources: dict[str, dict] = {}
    if not shape.multi_node:
        workload_kind = {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        resources["deployment.yaml"] = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": {"replicas": plan.replicas, "selector": {"matchLabels": selector},
                     # Capacity is kept while a new pod loads: the plan's replicas are what hold its load.
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": _pod(plan, shape, weights, image, command.leader, True, options, name, labels)}}
        pod_pattern = f"{name}-[a-z0-9]+-[a-z0-9]+"
        service_selector = selector
    else:
        workload_kind = {"apiVersion": LWS_API, "kind": "LeaderWorkerSet", "name": name}
        leader_labels, worker_labels = {**labels, "role": "leader"}, {**labels, "role": "worker"}
        resources["leaderworkerset.yaml"] = {
            "apiVersion": LWS_API, "kind": "LeaderWorkerSet",
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": {"replicas": plan.replicas, "startupPolicy": "LeaderCreated",
                     "leaderWorkerTemplate": {
                         "size": shape.nodes,
                         # One rank lost stops the collective: the whole group restarts together.
                         "restartPolicy": "RecreateGroupOnPodRestart",
                         "leaderTemplate": _pod(plan, shape, weights, image, command.leader, True, options,
                                                name, leader_labels),
                         "workerTemplate": _pod(plan, shape, weights, image, command.worker or {}, False,
                                                options, name, worker_labels)}}}
        # Leaders are <name>-<group>; workers <name>-<group>-<index> and serve no metrics.
        pod_pattern = f"{name}-[0-9]+"
        service_selector = {LWS_NAME_LABEL: name, "role": "leader"}
    resources["service.yaml"] = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
        "spec": {"type": "ClusterIP", "selector": service_selector,
                 "ports": [{"name": "http", "port": engines.PORT, "targetPort": "http", "protocol": "TCP"}]}}
    if options.autoscaler == "keda":
        resources["scaledobject.yaml"] = autoscale.scaled_object(name, workload_kind, plan, options,
                                                                 pod_pattern, labels)
    elif options.autoscaler == "hpa":
        resources["hpa.yaml"] = autoscale.horizontal_pod_autoscaler(name, workload_kind, plan, options, labels)
    notes = [*weights.notes]
    if plan.serve_with != "pilot":
        notes += [n for n in export_notes(plan.engine) if n.startswith("quantization")]
    notes += image_notes(plan, shape, image)
    if shape.multi_node and options.model_pvc is not None:
        notes.append(f"every pod of a group mounts {options.model_pvc}: it must be ReadOnlyMany or ReadWriteMany")
    return Manifests(name=name, plan=deployed, shape=shape, image=image, resources=resources,
                     pod_pattern=pod_pattern, notes=notes)
