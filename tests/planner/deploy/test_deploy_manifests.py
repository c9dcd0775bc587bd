"""What `pilot deploy` puts in each object: the engine's command and config, the pod's shape, the
probes, the weights' volume, and the autoscaler's target made from the plan."""

from __future__ import annotations

import shlex

import pytest
import yaml
from support.deploy_plans import make_plan

from planner.cli.serve import load_serving_config
from planner.deploy import DeployOptions, build_manifests, in_flight_target
from planner.deploy.engines import PLAN_DIR, PLAN_FILE, RUNNING_METRIC
from planner.search.launch_args import vllm_args

PVC = DeployOptions(model_pvc="models")


def _pod(manifests, template: str = "leaderTemplate") -> dict:
    if "deployment.yaml" in manifests.resources:
        return manifests.resources["deployment.yaml"]["spec"]["template"]
    return manifests.resources["leaderworkerset.yaml"]["spec"]["leaderWorkerTemplate"][template]


def _container(manifests, template: str = "leaderTemplate") -> dict:
    (container,) = _pod(manifests, template)["spec"]["containers"]
    return container


def test_a_cpu_plan_is_a_deployment_of_pilot_serve_reading_the_mounted_plan(cpu_plan, tmp_path):
    manifests = build_manifests(cpu_plan, PVC)
    assert set(manifests.resources) == {"deployment.yaml", "service.yaml", "scaledobject.yaml"}
    deployment = manifests.resources["deployment.yaml"]
    assert deployment["spec"]["replicas"] == cpu_plan.replicas
    container = _container(manifests)
    assert container["image"] == "pilot:0.1.0" and "command" not in container  # the image's ENTRYPOINT
    assert container["args"][:2] == ["--config", f"{PLAN_DIR}/{PLAN_FILE}"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[PLAN_DIR]["readOnly"] and mounts["/models"]["readOnly"]
    # What the ConfigMap holds is a plan pilot serve reads, with the pod's paths and threads.
    (tmp_path / PLAN_FILE).write_text(manifests.plan.to_yaml())
    config, plan_fields = load_serving_config(tmp_path / PLAN_FILE)
    assert config.model == "/models/smollm2-135m"
    assert config.num_threads == manifests.shape.cpus == 2  # cpu-host is costed as 2 vCPUs
    assert config.data_parallel_size == 2 and config.quantization == "int8"  # the rest as planned
    assert plan_fields["replicas"] == 1


def test_a_cpu_pod_is_guaranteed_whole_cpus_and_runs_as_non_root(cpu_plan):
    manifests = build_manifests(cpu_plan, DeployOptions(model_pvc="models", cpus=4, memory="6Gi"))
    resources = _container(manifests)["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "4", "memory": "6Gi"}
    assert manifests.plan.engine.num_threads == 4
    pod = _pod(manifests)["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert _container(manifests)["securityContext"]["readOnlyRootFilesystem"]


def test_probes_read_health_on_the_served_port(cpu_plan, gpu_plan):
    for plan, options in ((cpu_plan, PVC), (gpu_plan, PVC)):
        container = _container(build_manifests(plan, options))
        port = container["ports"][0]
        assert port == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}


def test_a_vllm_plan_runs_vllm_serve_with_the_plan_s_arguments_on_one_gpu(gpu_plan):
    manifests = build_manifests(gpu_plan, DeployOptions(hf_model="meta-llama/Llama-3.1-8B-Instruct",
                                                        hf_token_secret="hf"))
    container = _container(manifests)
    argv = container["command"] + container["args"]
    expected = vllm_args(gpu_plan.engine.model_copy(update={"model": "meta-llama/Llama-3.1-8B-Instruct"}))
    assert argv[:len(expected)] == expected
    assert argv[len(expected):] == ["--served-model-name", "meta-llama/Llama-3.1-8B-Instruct"]
    assert container["image"] == "vllm/vllm-openai:v0.24.0"  # the release the plan was priced for
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert "cpu" not in resources["limits"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert _pod(manifests)["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_a_vllm_plan_reads_its_weights_from_a_claim_with_the_folder_mapped(gpu_plan):
    manifests = build_manifests(gpu_plan, DeployOptions(model_pvc="weights", model_subpath="llama/8b-awq"))
    container = _container(manifests)
    assert container["args"][0] == "/models/llama/8b-awq"
    volumes = {v["name"]: v for v in _pod(manifests)["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    assert manifests.plan.engine.model == "/models/llama/8b-awq"
    assert shlex.split(manifests.plan.launch["vllm"])[2] == "/models/llama/8b-awq"


def test_an_amd_plan_asks_for_amd_gpus(gpu_plan):
    plan = gpu_plan.model_copy(update={"hardware": gpu_plan.hardware.model_copy(update={"name": "mi300x"})})
    assert _container(build_manifests(plan, PVC))["resources"]["limits"]["amd.com/gpu"] == "1"


def test_the_autoscaler_target_is_what_a_replica_holds_in_flight_at_the_planned_load(gpu_plan, cpu_plan):
    # Little's law: 4 requests/s per replica, each in flight for the predicted 1.665 s.
    assert in_flight_target(gpu_plan) == pytest.approx(4 * 1.665, abs=0.01)
    # A concurrency plan: its clients per replica; never beyond the batch the engine admits.
    assert in_flight_target(cpu_plan) == 4.0
    busy = make_plan({"model": "m", "max_num_seqs": 8}, load=("rate", 20.0), e2e_p50=2.0)
    assert in_flight_target(busy) == 8
    scaled = build_manifests(gpu_plan, PVC).resources["scaledobject.yaml"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["metadata"]["threshold"] == "6.66" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["query"].startswith(f"sum({RUNNING_METRIC['vllm']}{{namespace=\"default\"")
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                "name": "llama-3-1-8b"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 2)


def test_an_hpa_scales_on_the_same_target_through_the_custom_metrics_api(cpu_plan):
    options = DeployOptions(model_pvc="models", autoscaler="hpa", min_replicas=2, max_replicas=6)
    manifests = build_manifests(cpu_plan, options)
    hpa = manifests.resources["hpa.yaml"]
    metric = hpa["spec"]["metrics"][0]["pods"]
    assert metric["metric"]["name"] == "pilot_num_requests_running"
    assert metric["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert "scaledobject.yaml" not in manifests.resources
    assert set(build_manifests(cpu_plan, DeployOptions(model_pvc="m", autoscaler="none")).resources) == {
        "deployment.yaml", "service.yaml"}


def test_a_replica_wider_than_a_node_is_a_leaderworkerset_running_vllm_over_ray(multi_node_plan):
    manifests = build_manifests(multi_node_plan, DeployOptions(model_pvc="weights"))
    assert "deployment.yaml" not in manifests.resources
    lws = manifests.resources["leaderworkerset.yaml"]
    assert lws["spec"]["replicas"] == 2
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    for template in ("leaderTemplate", "workerTemplate"):
        assert _container(manifests, template)["resources"]["limits"]["nvidia.com/gpu"] == "8"
    leader, worker = _container(manifests), _container(manifests, "workerTemplate")
    script = leader["command"][2]
    assert leader["command"][:2] == ["sh", "-c"]
    assert "multi-node-serving.sh leader --ray_cluster_size=$(LWS_GROUP_SIZE) && exec vllm serve" in script
    flags = shlex.split(script.split("&& exec ", 1)[1])
    assert flags[flags.index("--tensor-parallel-size") + 1] == "16"
    assert flags[flags.index("--distributed-executor-backend") + 1] == "ray"
    assert "worker --ray_address=$(LWS_LEADER_ADDRESS)" in worker["command"][2]
    assert "startupProbe" in leader and "ports" not in worker and "readinessProbe" not in worker
    service = manifests.resources["service.yaml"]
    assert service["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": "llama-3-1-70b", "role": "leader"}
    scaled = manifests.resources["scaledobject.yaml"]["spec"]
    assert scaled["scaleTargetRef"]["kind"] == "LeaderWorkerSet"
    assert 'pod=~"llama-3-1-70b-[0-9]+"' in scaled["triggers"][0]["metadata"]["query"]  # leaders only
    assert any("ReadOnlyMany" in note for note in manifests.notes)


def test_an_sglang_plan_runs_its_launcher_with_metrics_on(gpu_plan):
    plan = gpu_plan.model_copy(update={"serve_with": "sglang", "basis": "SGLang 0.5.4 on h100-sxm"})
    manifests = build_manifests(plan, PVC)
    container = _container(manifests)
    assert container["image"] == "lmsysorg/sglang:v0.5.4"
    assert container["command"] == ["python", "-m", "sglang.launch_server"]
    assert {"--enable-metrics", "0.0.0.0"} <= set(container["args"])
    assert RUNNING_METRIC["sglang"] in manifests.resources["scaledobject.yaml"]["spec"]["triggers"][0][
        "metadata"]["query"]


def test_every_object_dumps_to_plain_yaml(cpu_plan, multi_node_plan):
    from planner.deploy.kustomize import dump

    for plan in (cpu_plan, multi_node_plan):
        for document in build_manifests(plan, PVC).resources.values():
            text = dump(document)
            assert "&id" not in text and yaml.safe_load(text) == document


def test_a_gpu_plan_for_pilot_is_told_to_use_a_cuda_image(gpu_plan):
    from planner.deploy.kustomize import base_manifests

    plan = gpu_plan.model_copy(update={"serve_with": "pilot"})
    manifests = build_manifests(plan, PVC)
    assert _container(manifests)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any("CUDA torch" in note for note in manifests.notes)
    mirrored = base_manifests(plan, DeployOptions(model_pvc="m", registry="r.io"))
    assert any("CUDA torch" in note for note in mirrored.notes)
    cuda = DeployOptions(model_pvc="m", image="pilot:0.1.0-cu128")
    assert not any("CUDA" in note for note in build_manifests(plan, cuda).notes)
    assert not any("CUDA" in note for note in base_manifests(plan, cuda).notes)
