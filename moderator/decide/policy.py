"""Loading and validating policy files (YAML -> ``PolicyDoc``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from moderator.errors import PolicyError
from moderator.schemas import PolicyDoc


@dataclass(frozen=True)
class LoadedPolicy:
    doc: PolicyDoc
    path: Path | None
    sha256: str  # of the file's bytes: what was audited is what was loaded


def _format_validation(path: Path | str, err: ValidationError, raw: dict) -> str:
    lines = [f"{path}: invalid policy ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = e["loc"]
        parts: list[str] = []
        node = raw
        for key in loc:
            if isinstance(key, int) and isinstance(node, list) and key < len(node):
                item = node[key]
                cid = item.get("id") if isinstance(item, dict) else None
                parts.append(f"[{key}]" + (f"(id={cid})" if cid else ""))
                node = item
            else:
                parts.append(f".{key}" if parts else str(key))
                node = node.get(key) if isinstance(node, dict) else None
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {''.join(parts)}: {msg}" if parts else f"  {msg}")
    return "\n".join(lines)


def parse_policy(data: bytes, source: Path | str = "<policy>") -> LoadedPolicy:
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise PolicyError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: a policy must be a YAML mapping, got {type(raw).__name__}")
    try:
        doc = PolicyDoc.model_validate(raw)
    except ValidationError as e:
        raise PolicyError(_format_validation(source, e, raw)) from e
    return LoadedPolicy(doc, Path(source) if not isinstance(source, Path) else source,
                        hashlib.sha256(data).hexdigest())


def load_policy(path: Path | str) -> LoadedPolicy:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PolicyError(f"{path}: cannot read policy: {e.strerror or e}") from e
    return parse_policy(data, path)


def prompt_set(doc: PolicyDoc) -> list[tuple[str, tuple[str, ...]]]:
    """The unique (prompt, templates) pairs of the enabled categories, in a canonical order."""
    pairs = set()
    for c in doc.categories:
        if not c.enabled:
            continue
        templates = tuple(c.templates if c.templates is not None else doc.templates)
        for p in (*c.prompts, *c.contrast_prompts):
            pairs.add((p, templates))
    return sorted(pairs)


def prompt_set_sha256(pairs: list[tuple[str, tuple[str, ...]]]) -> str:
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()
