"""Writing a plan's manifests as Kustomize expects them: a base that holds the plan's objects and
the plan file (a configMapGenerator, so a changed plan rolls the pods), and an overlay that puts
them in a namespace with an image from a registry. A platform team copies the overlay for each
environment; `kubectl apply -k OUT/overlays/NAMESPACE` deploys."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from planner.deploy.autoscale import query
from planner.deploy.engines import PLAN_FILE, default_image
from planner.deploy.manifests import CPU_IMAGE_NOTE, LWS_API, Manifests, build_manifests, image_notes
from planner.deploy.options import DeployError, DeployOptions
from planner.search.plan import Plan

KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
# Every file name the base may hold besides the plan and its kustomization.
STALE_CANDIDATES = ("deployment.yaml", "leaderworkerset.yaml", "service.yaml", "scaledobject.yaml", "hpa.yaml",
                    "kustomizeconfig.yaml")
# Kustomize knows where built-in kinds refer to a ConfigMap, not where a LeaderWorkerSet does: this
# tells it, so the generated name's hash suffix reaches the group's pods.
LWS_NAME_REFERENCES = {"nameReference": [{"kind": "ConfigMap", "version": "v1", "fieldSpecs": [
    {"kind": "LeaderWorkerSet", "group": LWS_API.split("/")[0],
     "path": f"spec/leaderWorkerTemplate/{template}/spec/volumes/configMap/name"}
    for template in ("leaderTemplate", "workerTemplate")]}]}


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (patches, shell lines), and no anchors: an object shared
    by two places is written out twice, as a person would."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _string)


def dump(document: object) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def split_image(reference: str) -> tuple[str, str | None, str | None]:
    """"repo/name:tag" or "repo/name@sha256:..." -> (name, tag, digest)."""
    if "@" in reference:
        name, digest = reference.split("@", 1)
        return name, None, digest
    head, _, last = reference.rpartition("/")
    if ":" in last:
        last, tag = last.split(":", 1)
        return (f"{head}/{last}" if head else last), tag, None
    return reference, None, None


def _has_registry(name: str) -> bool:
    # A first component with a dot or a port, or localhost, is a registry host (Docker's rule).
    first = name.split("/", 1)[0]
    return "/" in name and (first == "localhost" or bool(re.search(r"[.:]", first)))


def image_entry(base_image: str, image: str | None, registry: str | None) -> dict | None:
    """The overlay's `images:` entry renaming the base's image, or None to keep it."""
    if image is None and registry is None:
        return None
    base_name, _, _ = split_image(base_image)
    name, tag, digest = split_image(image or base_image)
    if registry is not None:
        if _has_registry(name):
            raise DeployError(f"the image {name} already names a registry", "registry")
        name = f"{registry.rstrip('/')}/{name}"
    entry = {"name": base_name, "newName": name}
    if digest:
        entry["digest"] = digest
    elif tag:
        entry["newTag"] = tag
    return entry


def overlay_image(manifests: Manifests, options: DeployOptions) -> str:
    """The image reference the overlay's pods run."""
    entry = image_entry(manifests.image, options.image, options.registry)
    if entry is None:
        return manifests.image
    suffix = f"@{entry['digest']}" if "digest" in entry else f":{entry['newTag']}" if "newTag" in entry else ""
    return entry["newName"] + suffix


def base_kustomization(manifests: Manifests) -> dict:
    document: dict = {"apiVersion": KUSTOMIZE_API, "kind": "Kustomization",
                      "resources": list(manifests.resources),
                      "configMapGenerator": [{"name": manifests.config_map_name, "files": [PLAN_FILE]}]}
    if "leaderworkerset.yaml" in manifests.resources:
        document["configurations"] = ["kustomizeconfig.yaml"]
    return document


def overlay_kustomization(manifests: Manifests, options: DeployOptions) -> dict:
    document: dict = {"apiVersion": KUSTOMIZE_API, "kind": "Kustomization",
                      "namespace": options.namespace, "resources": ["../../base"]}
    entry = image_entry(manifests.image, options.image if options.image != manifests.image else None,
                        options.registry)
    if entry is not None:
        document["images"] = [entry]
    if "scaledobject.yaml" in manifests.resources:
        # The query selects the namespace by name, which the namespace transformer does not rewrite.
        document["patches"] = [{
            "target": {"group": "keda.sh", "version": "v1alpha1", "kind": "ScaledObject", "name": manifests.name},
            "patch": dump([{"op": "replace", "path": "/spec/triggers/0/metadata/query",
                            "value": query(manifests.plan, options.namespace, manifests.pod_pattern)}])}]
    return document


def base_manifests(plan: Plan, options: DeployOptions) -> Manifests:
    """The base's objects: what any environment shares. The KEDA query names the default namespace
    (its one mention of a namespace) and the image is the engine's own; the overlay sets both."""
    options.check()
    try:
        base_image = default_image(plan)
    except DeployError:
        if options.image is None:
            raise
        base_image = options.image
    manifests = build_manifests(plan, dataclasses.replace(options, namespace="default", image=base_image))
    # Notes on the image are about the one the overlay runs.
    manifests.notes = [*(n for n in manifests.notes if not n.startswith(CPU_IMAGE_NOTE)),
                       *image_notes(plan, manifests.shape, overlay_image(manifests, options))]
    return manifests


def write_layout(manifests: Manifests, out_dir: str | Path, options: DeployOptions) -> list[Path]:
    """Write the base and the overlay for `options.namespace`; the paths written, base first."""
    out = Path(out_dir)
    base, overlay = out / "base", out / "overlays" / options.namespace
    files: dict[Path, str] = {base / name: dump(doc) for name, doc in manifests.resources.items()}
    files[base / PLAN_FILE] = manifests.plan.to_yaml()
    if "leaderworkerset.yaml" in manifests.resources:
        files[base / "kustomizeconfig.yaml"] = dump(LWS_NAME_REFERENCES)
    files[base / "kustomization.yaml"] = dump(base_kustomization(manifests))
    files[overlay / "kustomization.yaml"] = dump(overlay_kustomization(manifests, options))
    # Objects an earlier run wrote (another autoscaler, a Deployment before a LeaderWorkerSet) go,
    # so the base holds only what its kustomization lists.
    for stale in STALE_CANDIDATES:
        if base / stale not in files and (base / stale).is_file():
            (base / stale).unlink()
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)


def write_deployment(plan: Plan, out_dir: str | Path, options: DeployOptions | None = None) -> list[Path]:
    """Write the plan's base and overlay under `out_dir`; the paths written, base first. A
    DeployError names the plan's field or the option that prevents it."""
    options = options or DeployOptions()
    return write_layout(base_manifests(plan, options), out_dir, options)
