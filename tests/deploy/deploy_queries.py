"""The PromQL the dashboard and the alert rules run, and the metric names in it.

Expressions are parsed with ``promql-parser`` (a PromQL parser from PyPI), after Grafana's
template variables are replaced by values of the right shape, so a syntax error in a panel
fails here as well as in Grafana.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parents[2]
# One file each, shared by the chart (PrometheusRule, dashboard ConfigMap), compose and these checks;
# deploy/grafana/moderator-dashboard.json and deploy/prometheus/alerts.yaml are links to them.
DASHBOARD = ROOT / "helm" / "moderator" / "files" / "moderator-dashboard.json"
ALERTS = ROOT / "helm" / "moderator" / "files" / "alerts.yaml"

# Labels Prometheus attaches at scrape time (or histogram_quantile needs), not the exporter.
TARGET_LABELS = {"job", "instance"}
# Series Prometheus itself makes.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


@dataclass
class Selector:
    name: str
    labels: dict[str, str]
    where: str


@dataclass
class Queries:
    exprs: list[tuple[str, str]] = field(default_factory=list)   # (where, PromQL)
    recorded: set[str] = field(default_factory=set)               # names made by recording rules

    def selectors(self) -> list[Selector]:
        out = []
        for where, expr in self.exprs:
            out.extend(selectors(expr, where))
        return out

    def metric_names(self) -> dict[str, list[str]]:
        """Every series name read from the exporter -> where it is queried."""
        names: dict[str, list[str]] = defaultdict(list)
        for s in self.selectors():
            if s.name in self.recorded or s.name in PROMETHEUS_SERIES:
                continue
            names[s.name].append(s.where)
        return dict(names)


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables with parseable stand-ins ($__rate_interval -> 5m, $job -> x)."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}", "5m", expr)
    return re.sub(r"\$\{(\w+)(:\w+)?\}|\$(\w+)", "x", expr)


def selectors(expr: str, where: str = "") -> list[Selector]:
    try:
        ast = promql_parser.parse(expr)
    except Exception as e:  # the parser's error names the position
        raise AssertionError(f"{where}: PromQL does not parse: {e}\n{expr}") from e
    found: list[Selector] = []

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name: m.value for m in node.matchers.matchers}
            name = node.name or labels.get("__name__")
            labels.pop("__name__", None)
            found.append(Selector(name, labels, where))

    promql_parser.walk(ast, visit)
    return found


def dashboard_queries(path: Path = DASHBOARD) -> Queries:
    d = json.loads(path.read_text())
    q = Queries()

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(d.get("panels", [])):
        for t in p.get("targets", []):
            if "expr" in t:
                q.exprs.append((f"panel {p['id']} {p.get('title')!r} {t.get('refId')}", grafana_to_promql(t["expr"])))
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            query = v["query"] if isinstance(v["query"], str) else v["query"].get("query", "")
            m = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", query)
            q.exprs.append((f"variable {v['name']}", grafana_to_promql(m.group(1) if m else query)))
    return q


def rule_queries(path: Path = ALERTS) -> Queries:
    doc = yaml.safe_load(path.read_text())
    q = Queries()
    for g in doc["groups"]:
        for r in g["rules"]:
            if "record" in r:
                q.recorded.add(r["record"])
            q.exprs.append((f"{g['name']}/{r.get('record') or r.get('alert')}", r["expr"]))
    return q


def exposed_names(families) -> dict[str, tuple[str, set[str], int]]:
    """prometheus_client metric families -> {queryable name: (type, label names, sample count)}.

    Counters are queried as ``<name>_total``, histograms as ``_bucket``/``_sum``/``_count``,
    info metrics as ``<name>_info``: the names a PromQL query uses, not the family name.
    """
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "gauge": ("",),
                "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "unknown": ("",)}
    out: dict[str, tuple[str, set[str], int]] = {}
    for fam in families:
        per_name: dict[str, tuple[set[str], int]] = {fam.name + s: (set(), 0) for s in suffixes.get(fam.type, ("",))}
        for s in fam.samples:
            labels, n = per_name.get(s.name, (set(), 0))
            per_name[s.name] = (labels | set(s.labels), n + 1)
        for name, (labels, n) in per_name.items():
            out[name] = (fam.type, labels, n)
    return out
