"""Plans and options pilot deploy cannot use fail with a DeployError naming the field: the plan's
(`hardware.name`) or the option's (`model_pvc`); the CLI exits 2 naming the plan file's field or
the flag."""

from __future__ import annotations

import pytest
from support.deploy_plans import make_plan
from typer.testing import CliRunner

from planner.cli import app
from planner.deploy import DeployError, DeployOptions, build_manifests, gpu_resource_name, write_deployment
from planner.spec.errors import FieldError
from planner.spec.hardware import get_spec

runner = CliRunner()
PVC = DeployOptions(model_pvc="models")


def _error(plan, options=PVC) -> DeployError:
    with pytest.raises(DeployError) as err:
        build_manifests(plan, options)
    assert isinstance(err.value, (ValueError, FieldError))
    return err.value


def test_unknown_hardware_names_hardware_name(gpu_plan):
    plan = gpu_plan.model_copy(update={"hardware": gpu_plan.hardware.model_copy(update={"name": "tpu-v9"})})
    err = _error(plan)
    assert err.field == "hardware.name" and err.in_plan and "tpu-v9" in str(err)


def test_a_gpu_vendor_without_a_resource_name_names_hardware_name():
    # A spec from a vendor whose device plugin pilot has no resource name for.
    spec = get_spec("h100-sxm").model_copy(update={"name": "gaudi3", "vendor": "intel"})
    with pytest.raises(DeployError) as err:
        gpu_resource_name(spec)
    assert err.value.field == "hardware.name" and "'intel'" in str(err.value)
    assert gpu_resource_name(get_spec("h100-sxm")) == "nvidia.com/gpu"


def test_a_pilot_plan_wider_than_a_node_names_devices_per_replica(multi_node_plan):
    plan = multi_node_plan.model_copy(update={"serve_with": "pilot"})
    err = _error(plan)
    assert err.field == "hardware.devices_per_replica" and "one node" in str(err)


def test_data_parallelism_across_nodes_names_the_engine_field():
    plan = make_plan({"model": "m", "device": "cuda", "tensor_parallel_size": 8, "data_parallel_size": 2},
                     hardware="h100-sxm", kind="gpu", devices=16, serve_with="vllm", basis="vLLM 0.24.0")
    assert _error(plan).field == "engine.data_parallel_size"


def test_devices_that_disagree_with_the_parallelism_name_devices_per_replica(gpu_plan):
    plan = gpu_plan.model_copy(update={"hardware": gpu_plan.hardware.model_copy(update={"devices_per_replica": 2})})
    assert _error(plan).field == "hardware.devices_per_replica"


def test_a_hardware_kind_other_than_the_spec_s_names_hardware_kind(gpu_plan):
    plan = gpu_plan.model_copy(update={"hardware": gpu_plan.hardware.model_copy(update={"kind": "cpu"})})
    assert _error(plan).field == "hardware.kind"


def test_a_plan_without_the_latency_the_target_needs_names_it():
    plan = make_plan({"model": "m"}, e2e_p50=None)
    assert _error(plan).field == "predicted.e2e_p50"
    build_manifests(plan, DeployOptions(model_pvc="m", autoscaler="none"))  # without an autoscaler it deploys


@pytest.mark.parametrize("options, field", [
    (DeployOptions(), "model_pvc"),
    (DeployOptions(hf_model="org/model"), "hf_model"),  # pilot serve reads a folder
    (DeployOptions(model_pvc="m", name="Llama_8B"), "name"),
    (DeployOptions(model_pvc="m", namespace="Prod"), "namespace"),
    (DeployOptions(model_pvc="m", autoscaler="vpa"), "autoscaler"),
    (DeployOptions(model_pvc="m", min_replicas=3, max_replicas=2), "max_replicas"),
    (DeployOptions(model_pvc="m", memory="lots"), "memory"),
    (DeployOptions(model_pvc="m", model_subpath="../etc"), "model_subpath"),
    (DeployOptions(model_pvc="m", api_key_secret="a:b:c"), "api_key_secret"),
    (DeployOptions(model_pvc="m", prometheus_url="prometheus:9090"), "prometheus_url"),
])
def test_bad_options_name_the_option(cpu_plan, options, field):
    err = _error(cpu_plan, options)
    assert err.field == field and not err.in_plan


def test_a_draft_model_the_pod_cannot_see_names_the_engine_field(gpu_plan):
    engine = gpu_plan.engine.model_copy(update={"speculative_model": "models/draft", "num_speculative_tokens": 4})
    err = _error(gpu_plan.model_copy(update={"engine": engine}), DeployOptions(hf_model="org/model"))
    assert err.field == "engine.speculative_model"


def test_a_plan_without_a_release_needs_an_image(gpu_plan, tmp_path):
    plan = gpu_plan.model_copy(update={"basis": ""})
    with pytest.raises(DeployError) as err:
        write_deployment(plan, tmp_path, PVC)
    assert err.value.field == "image"
    write_deployment(plan, tmp_path, DeployOptions(model_pvc="m", image="vllm/vllm-openai:v0.11.0"))


def test_the_cli_names_the_plan_file_s_field_and_exits_2(multi_node_plan, tmp_path):
    plan_file = multi_node_plan.model_copy(update={"serve_with": "pilot"}).write(tmp_path / "plan.yaml")
    result = runner.invoke(app, ["deploy", "--plan", str(plan_file), "--out", str(tmp_path / "out"),
                                 "--model-pvc", "models"])
    assert result.exit_code == 2
    assert f"{plan_file}: hardware.devices_per_replica:" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    ([], "--model-pvc:"),
    (["--model-pvc", "m", "--max-replicas", "0"], "--max-replicas: must be at least 1"),
    (["--model-pvc", "m", "--autoscaler", "keda2"], "--autoscaler: 'keda2'"),
    (["--model-pvc", "m", "--node-selector", "gpu"], "--node-selector: expected KEY=VALUE"),
])
def test_the_cli_names_a_bad_flag_and_exits_2(cpu_plan, tmp_path, args, message):
    plan_file = cpu_plan.write(tmp_path / "plan.yaml")
    result = runner.invoke(app, ["deploy", "--plan", str(plan_file), "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_the_cli_names_a_missing_plan(tmp_path):
    result = runner.invoke(app, ["deploy", "--plan", str(tmp_path / "nope.yaml"), "--model-pvc", "m"])
    assert result.exit_code == 2 and "--plan: plan file not found" in result.output
