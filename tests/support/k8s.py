"""Kubernetes objects checked offline: the built-in kinds against the Kubernetes API's OpenAPI
schemas (kubernetes-validate, strict: an unknown field fails), and the CRDs pilot deploy writes
(KEDA's ScaledObject, LWS's LeaderWorkerSet) against their published schemas, converted to JSON
Schema and committed in data/k8s/ (its README names each source)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate

DATA = Path(__file__).parent / "data" / "k8s"
# The oldest Kubernetes LWS and KEDA's current releases support here, and a recent one.
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject-v1alpha1.json",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-v1.json",
}


@cache
def crd_schema(api_version: str, kind: str) -> dict:
    return json.loads((DATA / CRD_SCHEMAS[(api_version, kind)]).read_text())


def is_crd(document: dict) -> bool:
    return (document["apiVersion"], document["kind"]) in CRD_SCHEMAS


def validate(document: dict, version: str = KUBERNETES_VERSIONS[-1]) -> None:
    """Raise (jsonschema.ValidationError or kubernetes_validate's errors) unless `document` is a
    valid object of its kind."""
    if is_crd(document):
        jsonschema.Draft202012Validator(crd_schema(document["apiVersion"], document["kind"])).validate(document)
    else:
        kubernetes_validate.validate(document, version, strict=True)
