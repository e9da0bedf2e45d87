"""JSON schemas of CustomResourceDefinitions in kubeconform's CRD layout, from the CRD YAMLs.

The chart renders custom resources of prometheus-operator (ServiceMonitor, PrometheusRule) and
KEDA (ScaledObject, TriggerAuthentication). Their CRDs ship in the projects' Go modules, which the
Go module proxy serves (``go mod download -json MODULE@VERSION`` names the unpacked directory);
deploy/tools/install-tools.sh fetches them and runs this. For each served version of each CRD this
writes ``OUT/<group>/<kind in lower case>_<version>.json``, kubeconform's
``-schema-location 'OUT/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json'``.

The openAPIV3Schema becomes a strict JSON schema the way kubeconform's openapi2jsonschema does it:
objects with declared properties reject unknown fields (unless x-kubernetes-preserve-unknown-fields),
x-kubernetes-int-or-string becomes "integer or string", nullable allows null; apiVersion and kind
are pinned to the CRD's.

Usage: python deploy/tools/crd_schemas.py --out DIR CRD.yaml...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def strict(node):
    """An OpenAPI v3 structural schema node -> a JSON schema node that rejects unknown fields."""
    if isinstance(node, list):
        return [strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def schemas_of(crd: dict) -> dict[str, dict]:
    """{relative output path: JSON schema} for every served version of one CRD."""
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    out = {}
    for v in spec["versions"]:
        if not v.get("served", True) or "schema" not in v:
            continue
        schema = strict(v["schema"]["openAPIV3Schema"])
        props = schema.setdefault("properties", {})
        props["apiVersion"] = {"type": "string", "enum": [f"{group}/{v['name']}"]}
        props["kind"] = {"type": "string", "enum": [kind]}
        schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind"})
        schema["$schema"] = "http://json-schema.org/draft-07/schema#"
        out[f"{group}/{kind.lower()}_{v['name']}.json"] = schema
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("crds", nargs="+", type=Path, help="CRD YAML files")
    a = p.parse_args(argv)
    n = 0
    for f in a.crds:
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            for rel, schema in schemas_of(doc).items():
                dest = a.out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(json.dumps(schema, separators=(",", ":")))
                n += 1
    if not n:
        print("crd_schemas: no CRD versions with a schema found", file=sys.stderr)
        return 1
    print(f"crd_schemas: wrote {n} schemas to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
