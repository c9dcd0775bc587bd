"""`pilot deploy`: Kubernetes manifests (a Kustomize base and overlay) from a plan file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from planner.cli._common import console, fail, fail_error


def _selector(pairs: list[str]) -> dict[str, str]:
    selector: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--node-selector: expected KEY=VALUE, got {pair!r}")
        selector[key] = value
    return selector


def deploy(
    plan: Path = typer.Option(..., "--plan", help="a plan from `pilot recommend`"),
    out: Path = typer.Option(Path("deploy"), "--out", help="where base/ and overlays/NAMESPACE/ go"),
    namespace: str = typer.Option("default", "--namespace", help="the overlay's namespace"),
    name: Optional[str] = typer.Option(None, "--name", help="the objects' name; default: the model's"),
    image: Optional[str] = typer.Option(None, "--image", help="the server image; default: pilot:<version> "
                                        "(the Dockerfile's), or vllm/vllm-openai / lmsysorg/sglang at the "
                                        "release the plan was priced for"),
    registry: Optional[str] = typer.Option(None, "--registry", help="registry prefixed to the image, "
                                           "e.g. ghcr.io/acme"),
    autoscaler: str = typer.Option("keda", "--autoscaler", help="keda (reads Prometheus itself) | hpa "
                                   "(needs prometheus-adapter) | none; scales on running requests"),
    min_replicas: Optional[int] = typer.Option(None, "--min-replicas", help="default: the plan's replicas"),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", help="default: twice the plan's"),
    prometheus_url: Optional[str] = typer.Option(None, "--prometheus-url", help="what KEDA queries; default: "
                                                 "kube-prometheus-stack's in `monitoring`"),
    model_pvc: Optional[str] = typer.Option(None, "--model-pvc", help="a PersistentVolumeClaim holding the "
                                            "model's folder, mounted read-only at /models"),
    model_subpath: Optional[str] = typer.Option(None, "--model-subpath", help="the model's folder on the "
                                                "claim; default: the plan's folder name"),
    hf_model: Optional[str] = typer.Option(None, "--hf-model", help="vLLM/SGLang plans: ORG/NAME the server "
                                           "downloads in place of the plan's folder"),
    hf_token_secret: Optional[str] = typer.Option(None, "--hf-token-secret", help="SECRET[:KEY] with a "
                                                  "Hugging Face token (key default: token)"),
    cache_pvc: Optional[str] = typer.Option(None, "--cache-pvc", help="with --hf-model: a claim for the "
                                            "download cache; default: an emptyDir"),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="the name clients "
                                                    "send as `model`; default: the hub id or the folder"),
    api_key_secret: Optional[str] = typer.Option(None, "--api-key-secret", help="SECRET[:KEY] with the API "
                                                 "key clients must send (key default: api-key)"),
    cpus: Optional[int] = typer.Option(None, "--cpus", help="CPUs per pod; default: the plan's threads or "
                                       "its host's, 2 + GPUs on GPUs"),
    memory: Optional[str] = typer.Option(None, "--memory", help="memory per pod, e.g. 32Gi"),
    node_selector: list[str] = typer.Option([], "--node-selector", help="KEY=VALUE (repeatable), e.g. the "
                                            "GPU type's node label"),
) -> None:
    """Write Kubernetes manifests for a plan: a Deployment (or a LeaderWorkerSet for a replica
    spanning nodes), a Service, the plan in a ConfigMap and an autoscaler, as a Kustomize base and
    overlay. Apply with `kubectl apply -k OUT/overlays/NAMESPACE`."""
    from planner.deploy.kustomize import base_manifests, overlay_image, write_layout
    from planner.deploy.options import DEFAULT_PROMETHEUS_URL, DeployError, DeployOptions
    from planner.search.plan import Plan, PlanError

    try:
        loaded = Plan.from_file(plan)
    except FileNotFoundError as err:
        fail(f"--plan: {err}")
    except PlanError as err:
        fail(f"--plan: {err}")
    options = DeployOptions(
        name=name, namespace=namespace, image=image, registry=registry, autoscaler=autoscaler,
        min_replicas=min_replicas, max_replicas=max_replicas,
        prometheus_url=prometheus_url or DEFAULT_PROMETHEUS_URL, model_pvc=model_pvc,
        model_subpath=model_subpath, hf_model=hf_model, hf_token_secret=hf_token_secret, cache_pvc=cache_pvc,
        served_model_name=served_model_name, api_key_secret=api_key_secret, cpus=cpus, memory=memory,
        node_selector=_selector(node_selector))
    try:
        manifests = base_manifests(loaded, options)
        paths = write_layout(manifests, out, options)
        image_used = overlay_image(manifests, options)
    except DeployError as err:
        if err.in_plan:
            fail(f"{plan}: {err}")
        fail_error(err)
    shape = manifests.shape
    kind = "LeaderWorkerSet" if shape.multi_node else "Deployment"
    pods = f"{shape.nodes} pods of {shape.gpus} GPUs" if shape.multi_node else (
        f"a pod of {shape.gpus} GPU{'s' if shape.gpus != 1 else ''}" if shape.gpus else f"a pod of {shape.cpus} CPUs")
    console.print(f"{kind} {manifests.name}: {loaded.replicas} replica(s), each {pods}, "
                  f"served by {loaded.serve_with} ({image_used})")
    if autoscaler != "none":
        from planner.deploy.autoscale import in_flight_target, replica_bounds

        low, high = replica_bounds(loaded, options)
        console.print(f"autoscaler ({autoscaler}): {low}-{high} replicas, {in_flight_target(loaded):g} running "
                      "requests per replica (the plan's load per replica)")
    for note in manifests.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    for path in paths:
        print(path)
    print(f"apply: kubectl apply -k {out / 'overlays' / namespace}")
