"""Where the pod finds the model: a PersistentVolumeClaim holding the model's directory, mounted
read-only at /models with the plan's paths mapped into it, or (for vLLM and SGLang) a Hugging Face
id the server downloads into a cache volume. Also the plan as the pod reads it: its paths are the
pod's, and a CPU plan's threads are pinned to the pod's CPUs."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from engine.config import EngineConfig
from planner.deploy.options import DeployError, DeployOptions, secret_ref
from planner.deploy.resources import PodShape
from planner.search.launch_args import as_shell, sglang_args, vllm_args
from planner.search.plan import Plan

MODEL_MOUNT = "/models"
# The vLLM and SGLang images run as root and keep the hub's downloads here.
HF_CACHE = "/root/.cache/huggingface"


@dataclass
class Weights:
    config: EngineConfig  # the plan's engine with the pod's paths
    served_name: str
    volumes: list[dict] = field(default_factory=list)
    mounts: list[dict] = field(default_factory=list)
    env: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _folder(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def weights_for(plan: Plan, options: DeployOptions) -> Weights:
    """The engine config, volumes and environment that give the pod the plan's model."""
    engine = plan.engine
    if options.hf_model and plan.serve_with == "pilot":
        raise DeployError("pilot serve reads a model directory; put it on a claim and pass "
                          "--model-pvc (pilot models pull fetches hub models into a folder)", "hf_model")
    if options.model_pvc is None and options.hf_model is None:
        hint = "--model-pvc CLAIM" + (" or --hf-model ORG/NAME" if plan.serve_with != "pilot" else "")
        raise DeployError(f"the pod needs the weights of {engine.model}: pass {hint}", "model_pvc")
    update: dict[str, str] = {}
    weights = Weights(config=engine, served_name="")
    if options.model_pvc is not None:
        weights.volumes.append({"name": "models", "persistentVolumeClaim": {
            "claimName": options.model_pvc, "readOnly": True}})
        weights.mounts.append({"name": "models", "mountPath": MODEL_MOUNT, "readOnly": True})
    # Each path of the plan becomes its folder on the claim (the model's may be renamed).
    for key in ("model", "tokenizer", "speculative_model"):
        path = getattr(engine, key)
        if path is None or (key == "tokenizer" and path == engine.model):
            continue
        if key == "model" and options.hf_model is not None:
            update[key] = options.hf_model
        elif options.model_pvc is None:
            raise DeployError(f"{path} is a local folder the pod cannot see: pass --model-pvc with a "
                              "claim holding it", f"engine.{key}", in_plan=True)
        else:
            sub = options.model_subpath if key == "model" and options.model_subpath else _folder(path)
            update[key] = posixpath.join(MODEL_MOUNT, sub)
        weights.notes.append(f"engine.{key}: {path} -> {update[key]}")
    if engine.tokenizer is not None and engine.tokenizer == engine.model:
        update["tokenizer"] = update["model"]
    if options.hf_model is not None:
        cache = ({"persistentVolumeClaim": {"claimName": options.cache_pvc}} if options.cache_pvc
                 else {"emptyDir": {}})
        weights.volumes.append({"name": "hf-cache", **cache})
        weights.mounts.append({"name": "hf-cache", "mountPath": HF_CACHE})
        weights.env.append({"name": "HF_HOME", "value": HF_CACHE})
    if options.hf_token_secret is not None:
        secret, key = secret_ref(options.hf_token_secret, "hf_token_secret")
        weights.env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    weights.config = engine.model_copy(update=update)
    weights.served_name = options.served_model_name or options.hf_model or _folder(engine.model)
    return weights


def deployed_plan(plan: Plan, weights: Weights, shape: PodShape) -> Plan:
    """The plan the pod mounts: the pod's paths, and for a CPU plan its threads pinned to the
    pod's CPUs (the engine would take as many from the cgroup's quota; the plan says so)."""
    config = weights.config
    notes = [f"deploy: {note}" for note in weights.notes]
    if shape.gpu_resource is None and config.num_threads != shape.cpus:
        notes.append(f"deploy: engine.num_threads: {config.num_threads} -> {shape.cpus} (the pod's CPUs)")
        config = config.model_copy(update={"num_threads": shape.cpus})
    launch = {"vllm": as_shell(vllm_args(config)), "sglang": as_shell(sglang_args(config))}
    return plan.model_copy(update={"engine": config, "launch": {k: launch.get(k, v) for k, v in plan.launch.items()},
                                   "notes": [*plan.notes, *notes]})
