"""The pods one replica of a plan needs: how many (one, or a group across nodes), the devices,
CPUs and memory of each, and the extended resource name its GPUs are requested by."""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.deploy.options import DeployError, DeployOptions
from planner.search.plan import Plan
from planner.spec.hardware import HardwareSpec, HardwareSpecError, get_spec

# The device plugins' resource names (NVIDIA's k8s-device-plugin, AMD's ROCm device plugin).
GPU_RESOURCES = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}
# cpu-host is priced as a 2-vCPU host (profiles/hardware/cpu-host.yaml: AWS m7i.large), so a CPU
# plan without num_threads was costed on that many.
CPU_HOST_VCPUS = 2
# A GPU pod's host memory: the server process, plus per GPU its worker process and the page cache
# the weights stream through on their way to the GPU.
GPU_POD_BASE_GIB, GPU_POD_PER_GPU_GIB = 8, 8
# /dev/shm: NCCL and the engines' processes exchange tensors through it; Docker's 64 MiB is too
# little once a replica has several GPUs (vLLM's Kubernetes guide uses 2Gi for one, LWS's 15Gi for 8).
SHM_GIB_PER_GPU, CPU_SHM_GIB = 2, 1


@dataclass(frozen=True)
class PodShape:
    nodes: int  # pods per replica: 1, or the size of a LeaderWorkerSet group
    gpus: int  # per pod
    gpu_resource: str | None
    cpus: int  # requested per pod (and the limit for a CPU plan)
    memory_gib: float  # requested and limited per pod, /dev/shm included
    shm_gib: float
    memory: str | None = None  # --memory as given, in place of memory_gib

    @property
    def memory_quantity(self) -> str:
        return self.memory or f"{self.memory_gib:g}Gi"

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1


def hardware_spec(plan: Plan) -> HardwareSpec:
    """The spec the plan names; a DeployError naming `hardware.name` if there is none."""
    try:
        spec = get_spec(plan.hardware.name)
    except HardwareSpecError as err:
        raise DeployError(str(err), "hardware.name", in_plan=True) from None
    if spec.kind != plan.hardware.kind:
        raise DeployError(f"{plan.hardware.kind!r}, but {spec.name} is a {spec.kind}", "hardware.kind",
                          in_plan=True)
    return spec


def gpu_resource_name(spec: HardwareSpec) -> str:
    """The extended resource a pod requests `spec`'s GPUs by."""
    if spec.vendor not in GPU_RESOURCES:
        raise DeployError(f"{spec.name}: no Kubernetes GPU resource name is known for vendor "
                          f"{spec.vendor!r} (known: {', '.join(f'{v}: {r}' for v, r in GPU_RESOURCES.items())})",
                          "hardware.name", in_plan=True)
    return GPU_RESOURCES[spec.vendor]


def pod_shape(plan: Plan, spec: HardwareSpec, options: DeployOptions) -> PodShape:
    """One replica's pods; a DeployError naming the plan's field where it cannot be placed."""
    engine, devices = plan.engine, plan.hardware.devices_per_replica
    if spec.kind == "cpu":
        if devices > 1:
            raise DeployError(f"{devices} hosts per replica: pilot's engine runs on one host",
                              "hardware.devices_per_replica", in_plan=True)
        # The plan pins the engine's threads to the pod's CPUs (weights.deployed_plan), so the
        # plan mounted says what the pod runs with, as it was measured or costed.
        cpus = options.cpus or engine.num_threads or CPU_HOST_VCPUS
        return PodShape(nodes=1, gpus=0, gpu_resource=None, cpus=cpus,
                        memory_gib=spec.memory_gb, shm_gib=CPU_SHM_GIB, memory=options.memory)
    resource = gpu_resource_name(spec)
    ranks = engine.tensor_parallel_size * engine.data_parallel_size
    if ranks != devices:
        raise DeployError(f"{devices} GPUs per replica, but tensor_parallel_size x data_parallel_size "
                          f"is {ranks}", "hardware.devices_per_replica", in_plan=True)
    nodes = math.ceil(devices / spec.max_devices_per_node)
    if nodes > 1:
        where = f"{devices} GPUs per replica, {spec.max_devices_per_node} per {spec.name} node"
        if plan.serve_with == "pilot":
            raise DeployError(f"{where}: pilot's engine runs on one node; plan it with --max-devices "
                              f"{spec.max_devices_per_node} or for vLLM/SGLang",
                              "hardware.devices_per_replica", in_plan=True)
        if engine.data_parallel_size > 1:
            raise DeployError(f"{where}: data parallelism across nodes is not deployed as one group; "
                              "deploy more replicas of data_parallel_size=1", "engine.data_parallel_size",
                              in_plan=True)
        if devices % nodes:
            raise DeployError(f"{where}: {devices} GPUs do not split evenly over {nodes} nodes",
                              "hardware.devices_per_replica", in_plan=True)
    gpus = devices // nodes
    # vLLM wants a core per GPU worker besides its API server and engine core.
    cpus = options.cpus or 2 + gpus
    return PodShape(nodes=nodes, gpus=gpus, gpu_resource=resource, cpus=cpus,
                    memory_gib=GPU_POD_BASE_GIB + GPU_POD_PER_GPU_GIB * gpus + SHM_GIB_PER_GPU * gpus,
                    shm_gib=SHM_GIB_PER_GPU * gpus, memory=options.memory)


def container_resources(shape: PodShape, gpus: int | None = None) -> dict:
    """requests/limits: a CPU plan's pod is Guaranteed (whole CPUs, limit = request, so the static
    CPU manager can pin them as on the measured host); a GPU pod has no CPU limit, whose throttling
    would stall the GPUs' feeding threads."""
    gpus = shape.gpus if gpus is None else gpus
    requests = {"cpu": str(shape.cpus), "memory": shape.memory_quantity}
    limits = {"memory": shape.memory_quantity}
    if shape.gpu_resource is None:
        limits["cpu"] = str(shape.cpus)
    else:
        requests[shape.gpu_resource] = limits[shape.gpu_resource] = str(gpus)
    return {"requests": requests, "limits": limits}
