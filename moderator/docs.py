"""Reference tables generated from the code: the README's configuration reference (from
``moderator.config.WorkerSettings``) and metrics reference (from ``moderator.metrics``).

The README holds each table between ``<!-- BEGIN GENERATED: name -->`` and
``<!-- END GENERATED: name -->``; ``moderator docs --write`` refreshes them and
``moderator docs --check`` (run by the tests) fails when they are stale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic_core import PydanticUndefined

_MARK = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[\w-]+) -->\n).*?(<!-- END GENERATED: (?P=name) -->)", re.S)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(field) -> str:
    if field.default_factory is not None:
        name = getattr(field.default_factory, "__name__", "")
        return "`<hostname>-<pid>`" if "worker_id" in name else "(computed)"
    value = field.default
    if value is PydanticUndefined:
        return "(required)"
    if value is None:
        return "unset"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _constraints(field) -> str:
    out = []
    for m in field.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sym} {getattr(m, attr)}")
        if getattr(m, "pattern", None):
            out.append("one of " + ", ".join(f"`{p}`" for p in m.pattern.strip("^$()").split("|")))
    return f" ({', '.join(out)})" if out else ""


def config_reference() -> str:
    """Markdown table: every ``moderator run`` setting, its environment variable and flag, default, meaning."""
    from moderator.config import WorkerSettings
    from moderator.settings_cli import flag_of

    prefix = WorkerSettings.model_config.get("env_prefix", "")
    rows = ["| environment variable | `moderator run` flag | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in WorkerSettings.model_fields.items():
        desc = (field.description or "").strip()
        if not desc:
            raise ValueError(f"WorkerSettings.{name} has no description")
        rows.append(f"| `{prefix}{name.upper()}` | `{flag_of(name)}` | {_cell(_default(field))} "
                    f"| {_cell(desc + _constraints(field))} |")
    return "\n".join(rows) + "\n"


_QUERY_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                   "info": ("_info",), "summary": ("_sum", "_count"), "enum": ("",)}


def metrics_reference() -> str:
    """Markdown table: every metric in ``moderator.metrics`` with its type, labels and help."""
    from prometheus_client.metrics import MetricWrapperBase

    import moderator.metrics as m

    rows = ["| metric (as queried) | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for obj in vars(m).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        kind = obj._type  # noqa: SLF001 (prometheus_client has no public accessor)
        names = " ".join(f"`{obj._name}{s}`" for s in _QUERY_SUFFIXES.get(kind, ("",)))  # noqa: SLF001
        labels = ", ".join(f"`{lbl}`" for lbl in obj._labelnames) or "–"  # noqa: SLF001
        if kind == "info":
            labels = "info labels (set at start)"
        rows.append(f"| {names} | {kind} | {labels} | {_cell(obj._documentation)} |")  # noqa: SLF001
    return "\n".join(rows) + "\n"


GENERATORS = {"config-reference": config_reference, "metrics-reference": metrics_reference}


def render(text: str) -> str:
    """``text`` with every generated block replaced by its current content."""
    def sub(match: re.Match) -> str:
        gen = GENERATORS.get(match.group("name"))
        if gen is None:
            raise ValueError(f"unknown generated block: {match.group('name')}")
        return match.group(1) + gen() + match.group(3)

    return _MARK.sub(sub, text)


def update_readme(path: Path, *, check: bool) -> bool:
    """Refresh (or, with ``check``, only compare) the README's generated blocks. True if up to date."""
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if new == text:
        return True
    if not check:
        path.write_text(new, encoding="utf-8")
    return False
