"""The chart under the kube-prometheus stack: one rules file and one dashboard file shared by the
chart (PrometheusRule, Grafana sidecar ConfigMap) and compose, alerts that keep `namespace` and
`job` for Alertmanager routing, and the rendered rules checked by promtool."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import promql_parser
import pytest
import yaml

from deploy_queries import ALERTS, DASHBOARD
from deploy_support import CHART, ROOT, run
from test_deploy_helm import by_kind, docs, render

PROMETHEUS = ROOT / "deploy" / "prometheus"
ROUTING_LABELS = ("namespace", "job")


def rules(path: Path = ALERTS) -> list[dict]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


# --- one file each ----------------------------------------------------------------------------


def test_rules_and_dashboard_are_one_file_each():
    """compose, promtool's unit tests and the chart read the same files; the deploy/ paths are links."""
    assert ALERTS.parent == DASHBOARD.parent == CHART / "files"
    for link, target in ((PROMETHEUS / "alerts.yaml", ALERTS),
                         (ROOT / "deploy" / "grafana" / "moderator-dashboard.json", DASHBOARD)):
        assert link.is_symlink() and link.resolve() == target, f"{link} must link to {target}, not copy it"
        assert not target.is_symlink()
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yaml").read_text())
    assert [(PROMETHEUS / f).resolve() for f in tests["rule_files"]] == [ALERTS]
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert [(PROMETHEUS / f).resolve() for f in config["rule_files"]] == [ALERTS]


def test_helm_package_carries_the_files(helm, tmp_path):
    """The packaged chart (what a chart repository serves) holds both files byte for byte."""
    run([helm, "package", CHART, "--destination", tmp_path])
    (tgz,) = tmp_path.glob("moderator-*.tgz")
    with tarfile.open(tgz) as tar:
        for f in (ALERTS, DASHBOARD):
            member = tar.getmember(f"moderator/files/{f.name}")
            assert member.isfile(), f"{f.name} is packaged as a link"
            assert tar.extractfile(member).read() == f.read_bytes()
        assert not any(n.startswith("moderator/ci/") for n in tar.getnames()), ".helmignore keeps ci/ out"


# --- every aggregation keeps namespace and job --------------------------------------------------


def routing_problems(expr: str) -> list[str]:
    """Aggregations and vector matches in `expr` that drop `namespace` or `job`."""
    problems: list[str] = []

    def visit(node) -> None:
        if isinstance(node, promql_parser.AggregateExpr):
            m = node.modifier
            if m is None:
                problems.append(f"{node.op} without `by` drops every label")
            elif m.type == promql_parser.AggModifierType.By:
                missing = [lbl for lbl in ROUTING_LABELS if lbl not in m.labels]
                if missing:
                    problems.append(f"by ({', '.join(m.labels)}) drops {missing}")
            elif any(lbl in m.labels for lbl in ROUTING_LABELS):
                problems.append(f"without ({', '.join(m.labels)}) drops a routing label")
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier and node.modifier.matching:
            m = node.modifier.matching
            if m.type == promql_parser.LabelModifierType.Include:
                missing = [lbl for lbl in ROUTING_LABELS if lbl not in m.labels]
                if missing:
                    problems.append(f"on ({', '.join(m.labels)}) matches across {missing}")
            elif any(lbl in m.labels for lbl in ROUTING_LABELS):
                problems.append(f"ignoring ({', '.join(m.labels)}) matches across a routing label")

    promql_parser.walk(promql_parser.parse(expr), visit)
    return problems


def test_every_aggregation_keeps_namespace_and_job():
    problems = {r.get("alert") or r["record"]: routing_problems(r["expr"]) for r in rules()}
    assert not any(problems.values()), json.dumps({k: v for k, v in problems.items() if v}, indent=1)
    assert sum("by (" in r["expr"] for r in rules()) >= 5, "the check saw the aggregations"


@pytest.mark.parametrize("expr", [
    "sum(rate(x[5m]))",
    "sum by (job) (rate(x[5m]))",
    "max without (namespace) (x)",
    "sum by (namespace, job) (x) / on (job) group_left () sum by (namespace, job) (y)",
    "x and ignoring (namespace) y",
])
def test_routing_check_catches_a_dropped_label(expr):
    assert routing_problems(expr)


def test_target_down_and_absent_alerts_exist():
    by_name = {r["alert"]: r for r in rules() if "alert" in r}
    assert promql_parser.parse(by_name["ModeratorWorkerDown"]["expr"]).lhs.name == "up"
    absent = promql_parser.parse(by_name["ModeratorNoWorkerUp"]["expr"])
    assert isinstance(absent, promql_parser.Call) and absent.func.name == "absent"
