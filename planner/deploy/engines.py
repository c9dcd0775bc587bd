"""The serving container of each engine a plan can name: its image, command, metrics and probes.

`pilot serve` runs from the image the repository's Dockerfile builds, reading the plan mounted
from a ConfigMap; vLLM and SGLang run from their projects' images with the plan's arguments
(planner.search.launch_args), the release the plan's predictions rest on pinned as the tag.
A replica spanning nodes runs as a LeaderWorkerSet group, vLLM over a Ray cluster the way the LWS
project's vLLM example starts one, SGLang with its own multi-node launcher."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from dataclasses import dataclass

from engine.config import EngineConfig
from planner.deploy.options import DeployError
from planner.search.launch_args import sglang_args, vllm_args
from planner.search.plan import Plan

PORT = 8000
PLAN_DIR = "/etc/pilot"
PLAN_FILE = "plan.yaml"
# The Dockerfile's ENTRYPOINT; the manifests add `--config` and the served name as arguments.
PILOT_ENTRYPOINT = ("pilot", "serve", "--host", "0.0.0.0", "--port", str(PORT))
PILOT_IMAGE = "pilot"
# Where the image's non-root user compiles the engine's CPU kernels on first start (they are
# built for the node's CPU, so not at image build time): an emptyDir, the root filesystem being
# read-only.
PILOT_CACHE = "/var/cache/pilot"
PILOT_UID = 10001
IMAGES = {"vllm": "vllm/vllm-openai", "sglang": "lmsysorg/sglang"}
# The vLLM image's script that starts (leader) or joins (worker) the group's Ray cluster.
VLLM_MULTI_NODE = "/vllm-workspace/examples/online_serving/multi-node-serving.sh"
SGLANG_DIST_PORT = 20000
# Prometheus gauges of requests in the running batch, per engine.
RUNNING_METRIC = {"pilot": "pilot:num_requests_running", "vllm": "vllm:num_requests_running",
                  "sglang": "sglang:num_running_reqs"}
_RELEASE = {"vllm": re.compile(r"\bvLLM (\d+\.\d+\.\d+)"), "sglang": re.compile(r"\bSGLang (\d+\.\d+\.\d+)")}


def default_image(plan: Plan) -> str:
    """pilot:<this version>, or the vLLM/SGLang image of the release the plan was priced for."""
    if plan.serve_with == "pilot":
        return f"{PILOT_IMAGE}:{importlib.metadata.version('pilot')}"
    release = _RELEASE[plan.serve_with].search(plan.basis)
    if release is None:
        raise DeployError(f"the plan does not say which {plan.serve_with} release it was priced for "
                          "(its basis names none): pass --image", "image")
    return f"{IMAGES[plan.serve_with]}:v{release.group(1)}"


@dataclass(frozen=True)
class Commands:
    """`command`/`args` of the leader (or only) container, and of the workers in a group."""

    leader: dict
    worker: dict | None = None


def commands(plan: Plan, config: EngineConfig, served_name: str, nodes: int) -> Commands:
    if plan.serve_with == "pilot":
        # The ENTRYPOINT is the Dockerfile's; only what varies by plan is given here.
        return Commands({"args": ["--config", f"{PLAN_DIR}/{PLAN_FILE}", "--served-model-name", served_name]})
    if plan.serve_with == "vllm":
        argv = [*vllm_args(config, PORT), "--served-model-name", served_name]
        if nodes == 1:
            return Commands({"command": argv[:2], "args": argv[2:]})
        # $(LWS_*) are expanded by the kubelet from the variables LWS sets in every pod.
        leader = (f"bash {VLLM_MULTI_NODE} leader --ray_cluster_size=$(LWS_GROUP_SIZE) && exec "
                  + shlex.join([*argv, "--distributed-executor-backend", "ray"]))
        worker = f"bash {VLLM_MULTI_NODE} worker --ray_address=$(LWS_LEADER_ADDRESS)"
        return Commands({"command": ["sh", "-c", leader]}, {"command": ["sh", "-c", worker]})
    argv = [*sglang_args(config, PORT), "--host", "0.0.0.0", "--enable-metrics",
            "--served-model-name", served_name]
    if nodes == 1:
        return Commands({"command": argv[:3], "args": argv[3:]})
    # Every node runs the launcher; rank 0 (the leader) serves HTTP.
    group = ["--nnodes", "$(LWS_GROUP_SIZE)", "--node-rank", "$(LWS_WORKER_INDEX)",
             "--dist-init-addr", f"$(LWS_LEADER_ADDRESS):{SGLANG_DIST_PORT}"]
    return Commands({"command": argv[:3], "args": argv[3:] + group}, {"command": argv[:3], "args": argv[3:] + group})


def api_key_env(plan: Plan, secret: str, key: str) -> list[dict]:
    """The variable each server reads its API key from (SGLang's is passed as --api-key)."""
    name = {"pilot": "PILOT_API_KEY", "vllm": "VLLM_API_KEY", "sglang": "SGLANG_API_KEY"}[plan.serve_with]
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}]


def probes(plan: Plan, nodes: int) -> dict:
    """startup/readiness/liveness on /health: it answers once the model is loaded, and pilot's
    returns 503 once its engine has died. Startup may take a download: 30 min on GPUs."""
    startup_minutes = 10 if plan.serve_with == "pilot" else 30 * nodes
    http = {"httpGet": {"path": "/health", "port": "http"}}
    return {
        "startupProbe": {**http, "periodSeconds": 10, "failureThreshold": startup_minutes * 6},
        "readinessProbe": {**http, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
        "livenessProbe": {**http, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
    }
