"""What `pilot deploy` is told besides the plan, checked before anything is built: names, the
image, the autoscaler, and where the pod finds the model's weights."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from planner.spec.errors import FieldError

AUTOSCALERS = ("keda", "hpa", "none")
# kube-prometheus-stack's Prometheus (the operator's `prometheus-operated` Service) in `monitoring`.
DEFAULT_PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"
# DNS-1035 label: what a Service name must be. 40 characters leaves room for the suffixes pods
# and generated ConfigMaps get (`-<hash>-<id>`, `-<group>-<worker>`, `-plan-<hash>`) within 63.
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 40
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# A resource.Quantity as people write memory: 24Gi, 24G, 25769803776.
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
# ORG/NAME on the Hugging Face hub.
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DeployError(FieldError):
    """A plan or an option `pilot deploy` cannot turn into manifests. `field` names the plan's
    field (`hardware.name`) when `in_plan`, else the option (`model_pvc`)."""

    def __init__(self, message: str, field: str | None = None, in_plan: bool = False) -> None:
        super().__init__(message, field)
        self.in_plan = in_plan


@dataclass(frozen=True)
class DeployOptions:
    name: str | None = None  # default: from the model's name
    namespace: str = "default"
    image: str | None = None  # default: pilot:<version>, or the vLLM/SGLang release the plan is for
    registry: str | None = None  # prefixed to the image's repository
    autoscaler: str = "keda"
    min_replicas: int | None = None  # default: the plan's replicas
    max_replicas: int | None = None  # default: twice the plan's replicas
    prometheus_url: str = DEFAULT_PROMETHEUS_URL
    model_pvc: str | None = None  # a claim holding the model directory, mounted read-only
    model_subpath: str | None = None  # the model's folder in it; default: the plan's folder name
    hf_model: str | None = None  # vLLM/SGLang: ORG/NAME the server downloads instead
    hf_token_secret: str | None = None  # SECRET[:KEY] holding a Hugging Face token
    cache_pvc: str | None = None  # a claim for the Hugging Face cache (else an emptyDir)
    served_model_name: str | None = None
    api_key_secret: str | None = None  # SECRET[:KEY] holding the API key clients must send
    cpus: int | None = None
    memory: str | None = None  # per pod, a Kubernetes quantity
    node_selector: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """Raise a DeployError naming the first option that cannot be used."""
        if self.name is not None:
            check_name(self.name, "name")
        if not _NAMESPACE.match(self.namespace) or len(self.namespace) > 63:
            raise DeployError(f"{self.namespace!r} is not a namespace name (lower-case letters, "
                              "digits and '-', at most 63)", "namespace")
        if self.autoscaler not in AUTOSCALERS:
            raise DeployError(f"{self.autoscaler!r}; choose from {', '.join(AUTOSCALERS)}", "autoscaler")
        if self.min_replicas is not None and self.min_replicas < 1:
            raise DeployError(f"must be at least 1, got {self.min_replicas}", "min_replicas")
        if self.max_replicas is not None and self.max_replicas < 1:
            raise DeployError(f"must be at least 1, got {self.max_replicas}", "max_replicas")
        if self.cpus is not None and self.cpus < 1:
            raise DeployError(f"must be at least 1, got {self.cpus}", "cpus")
        if self.memory is not None and not _QUANTITY.match(self.memory):
            raise DeployError(f"{self.memory!r} is not a memory quantity (e.g. 24Gi)", "memory")
        if self.hf_model is not None and not _HF_ID.match(self.hf_model):
            raise DeployError(f"{self.hf_model!r} is not a Hugging Face model id (ORG/NAME)", "hf_model")
        for option in ("model_pvc", "cache_pvc"):
            claim = getattr(self, option)
            if claim is not None and not _NAMESPACE.match(claim):
                raise DeployError(f"{claim!r} is not a PersistentVolumeClaim name", option)
        if self.model_subpath is not None and (self.model_subpath.startswith("/")
                                               or ".." in self.model_subpath.split("/")):
            raise DeployError(f"{self.model_subpath!r} must be a relative path inside the claim",
                              "model_subpath")
        for option in ("hf_token_secret", "api_key_secret"):
            value = getattr(self, option)
            if value is not None:
                secret_ref(value, option)
        if not self.prometheus_url.startswith(("http://", "https://")):
            raise DeployError(f"{self.prometheus_url!r} is not an http(s) URL", "prometheus_url")


def check_name(name: str, field: str) -> str:
    if not _NAME.match(name) or len(name) > MAX_NAME:
        raise DeployError(f"{name!r} is not usable as a name: lower-case letters, digits and '-', "
                          f"starting with a letter, at most {MAX_NAME} characters", field)
    return name


def default_name(model: str) -> str:
    """A DNS-1035 name from the model's folder or hub id: "models/Llama-3.1-8B" -> "llama-3-1-8b"."""
    base = model.rstrip("/").rsplit("/", 1)[-1].lower()
    name = re.sub(r"[^a-z0-9]+", "-", base).strip("-")[:MAX_NAME].rstrip("-")
    if not name or not name[0].isalpha():
        name = ("llm-" + name)[:MAX_NAME].rstrip("-")
    return name


def secret_ref(value: str, field: str, default_key: str = "token") -> tuple[str, str]:
    """SECRET[:KEY] -> (secret, key)."""
    secret, _, key = value.partition(":")
    if not _NAMESPACE.match(secret) or (key and not re.match(r"^[-._a-zA-Z0-9]+$", key)):
        raise DeployError(f"{value!r}: expected SECRET or SECRET:KEY", field)
    return secret, key or default_key
