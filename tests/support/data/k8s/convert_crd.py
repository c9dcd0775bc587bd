"""Turn a CustomResourceDefinition's openAPIV3Schema into the JSON Schema committed beside this
script (run by hand when a CRD is updated; the tests only read the result):

    python tests/support/data/k8s/convert_crd.py CRD.yaml VERSION OUT.json --source "..."

Kubernetes' dialect differs from JSON Schema in a few keywords: `nullable` becomes a "null"
type, `x-kubernetes-int-or-string` an integer-or-string, and objects with declared properties
reject others (as the API server's strict field validation does) unless the CRD preserves
unknown fields. Descriptions are dropped: they do not take part in validation and make up most
of the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def convert(node: Any) -> Any:
    if isinstance(node, list):
        return [convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description" or key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: convert(sub) for name, sub in value.items()}
        else:
            out[key] = convert(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("crd", type=Path)
    parser.add_argument("version", help="the CRD version to take, e.g. v1alpha1")
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", required=True, help="project, file, commit: kept in the output")
    args = parser.parse_args()
    crd = next(doc for doc in yaml.safe_load_all(args.crd.read_text()) if doc)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == args.version)
    schema = convert(version["schema"]["openAPIV3Schema"])
    # metadata is `type: object` in a CRD; the API server checks it with ObjectMeta's own rules.
    schema["properties"]["metadata"] = {"type": "object"}
    group = crd["spec"]["group"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{args.version}"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    document = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                "$comment": f"converted by convert_crd.py from {args.source}", **schema}
    args.out.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")


if __name__ == "__main__":
    main()
