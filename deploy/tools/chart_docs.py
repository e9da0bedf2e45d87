"""The chart's README (helm/moderator/README.md), generated from values.yaml, helm-docs style.

A ``# -- description`` comment right above a key documents it; ``#`` lines right after it continue
the text (helm-docs' convention). Every leaf value gets a row (key, type, default, description); a
documented map gets a row of its own. Other comments are for the reader of values.yaml only.

Usage: python deploy/tools/chart_docs.py [--chart helm/moderator] [--check]
  --check: exit 1 (and say so) when README.md is not what values.yaml and Chart.yaml generate.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

DEFAULT_CHART = Path(__file__).resolve().parents[2] / "helm" / "moderator"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+|\"[^\"]+\"):(\s|$)")


def descriptions(values_text: str) -> dict[str, str]:
    """{dotted key: description} from the ``# --`` comments of values.yaml."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing maps
    pending: list[str] | None = None
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped[1:].strip())
            continue
        if not stripped:
            pending = None
            continue
        m = _KEY.match(line)
        if not m:  # a list item or a continuation: nothing to document
            pending = None
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = m["key"].strip('"')
        path = ".".join([k for _, k in stack] + [key])
        if pending is not None:
            out[path] = " ".join(p for p in pending if p)
        pending = None
        stack.append((indent, key))
    return out


def _type(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    return "object"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def rows(values: dict, docs: dict[str, str]) -> list[tuple[str, str, str, str]]:
    out = []

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                if path in docs:
                    out.append((path, "object", "", docs[path]))
                walk(v, path + ".")
            else:
                out.append((path, _type(v), json.dumps(v), docs.get(path, "")))

    walk(values, "")
    return out


def render(chart: Path) -> str:
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    values_text = (chart / "values.yaml").read_text()
    table = "\n".join(f"| `{k}` | {t} | `{_cell(d)}` | {_cell(desc)} |" if d else f"| `{k}` | {t} | | {_cell(desc)} |"
                      for k, t, d, desc in rows(yaml.safe_load(values_text), descriptions(values_text)))
    return f"""# {meta['name']}

{meta['description']}

Chart version {meta['version']}, app version {meta['appVersion']}, Kubernetes `{meta.get('kubeVersion', 'any')}`.
Installing, the values that matter and the kube-prometheus stack: the repository README's
"Deploy on Kubernetes". `values.schema.json` rejects unknown keys and bad values.

<!-- Generated from values.yaml by deploy/tools/chart_docs.py: edit the `# --` comments there, then
run `python deploy/tools/chart_docs.py` (tests/deploy fails on a stale README). -->

## Values

| Key | Type | Default | Description |
|-----|------|---------|-------------|
{table}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chart", type=Path, default=DEFAULT_CHART)
    p.add_argument("--check", action="store_true", help="fail when README.md is stale instead of writing it")
    a = p.parse_args(argv)
    readme = a.chart / "README.md"
    text = render(a.chart)
    if a.check:
        if not readme.is_file() or readme.read_text() != text:
            print(f"chart_docs: {readme} is stale: run python deploy/tools/chart_docs.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
