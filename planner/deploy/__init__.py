"""Kubernetes manifests from a plan (`pilot deploy`): the serving pods and their shape
(`resources`), the engine's container (`engines`), where the weights come from (`weights`), the
autoscaler on the server's Prometheus metrics (`autoscale`), the objects of each kind
(`manifests`), and the Kustomize layout they are written in (`kustomize`).

It reads a finished plan and writes files: it imports `planner.spec` (hardware specs, errors) and
`planner.search` (the plan, the vLLM and SGLang arguments) and nothing above them."""

from planner._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "DeployError": "options",
    "DeployOptions": "options",
    "Manifests": "manifests",
    "build_manifests": "manifests",
    "write_deployment": "kustomize",
    "in_flight_target": "autoscale",
    "gpu_resource_name": "resources",
})
