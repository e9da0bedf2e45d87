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

    def check(listed: bool, labels: list[str], kept: str, dropped: str) -> None:
        """``listed``: ``labels`` are the ones kept (by / on), else the ones dropped (without / ignoring)."""
        if listed:
            missing = [lbl for lbl in ROUTING_LABELS if lbl not in labels]
            if missing:
                problems.append(f"{kept} ({', '.join(labels)}) drops {missing}")
        elif any(lbl in labels for lbl in ROUTING_LABELS):
            problems.append(f"{dropped} ({', '.join(labels)}) drops a routing label")

    def visit(node) -> None:
        if isinstance(node, promql_parser.AggregateExpr):
            m = node.modifier
            if m is None:
                problems.append(f"{node.op} without `by` drops every label")
            else:
                check(m.type == promql_parser.AggModifierType.By, m.labels, "by", "without")
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier and node.modifier.matching:
            m = node.modifier.matching
            check(m.type == promql_parser.LabelModifierType.Include, m.labels, "on", "ignoring")

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


# --- the PrometheusRule -----------------------------------------------------------------------

KUBE_PROMETHEUS = CHART / "ci" / "kube-prometheus-values.yaml"


def prometheus_rule(helm, *args: str) -> dict:
    (pr,) = by_kind(docs(render(helm, None, "--set", "prometheusRule.enabled=true", *args).stdout), "PrometheusRule")
    return pr


def test_prometheus_rule_is_off_by_default(helm):
    manifests = docs(render(helm).stdout)
    assert not by_kind(manifests, "PrometheusRule")
    assert not [cm for cm in by_kind(manifests, "ConfigMap") if cm["metadata"]["name"].endswith("-dashboard")]


def test_prometheus_rule_renders_the_rules_file(helm):
    """The PrometheusRule's groups are the file's, rule for rule: same names, order, durations,
    annotations and expressions, except the `up` selectors, which name this release's job and
    namespace instead of matching any job called *moderator*."""
    pr = prometheus_rule(helm, "--set", "prometheusRule.labels.release=kube-prometheus-stack")
    assert pr["apiVersion"] == "monitoring.coreos.com/v1"
    assert pr["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pr["metadata"]["labels"]["app.kubernetes.io/instance"] == "moderator"
    file_groups = yaml.safe_load(ALERTS.read_text())["groups"]
    groups = pr["spec"]["groups"]
    assert [(g["name"], g.get("interval")) for g in groups] == [(g["name"], g.get("interval")) for g in file_groups]
    up = 'up{namespace="moderation", job="moderator"}'
    for g, fg in zip(groups, file_groups):
        assert [r.get("alert") or r["record"] for r in g["rules"]] == [r.get("alert") or r["record"] for r in fg["rules"]]
        for r, fr in zip(g["rules"], fg["rules"]):
            assert r["expr"] == fr["expr"].replace('up{job=~".*moderator.*"}', up)
            assert r.get("for") == fr.get("for") and r.get("annotations") == fr.get("annotations")
            extra = {"namespace": "moderation", "job": "moderator"} if "absent(" in fr["expr"] else {}
            assert r.get("labels") == ({**fr["labels"], **extra} if "alert" in fr else None)
    exprs = [r["expr"] for g in groups for r in g["rules"]]
    assert sum(up in e for e in exprs) == 2 and not any("=~\".*moderator.*\"" in e for e in exprs)


def test_prometheus_rule_runbooks_and_alert_labels(helm):
    pr = prometheus_rule(helm, "--set", "prometheusRule.runbookBaseUrl=https://runbooks.example/moderator/",
                         "--set", "prometheusRule.alertLabels.team=trust-safety", "--set", "fullnameOverride=cf")
    alerts_ = [r for g in pr["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts_) == len([r for r in rules() if "alert" in r])
    for a in alerts_:
        assert a["annotations"]["runbook_url"] == f"https://runbooks.example/moderator/{a['alert'].lower()}"
        assert a["labels"]["team"] == "trust-safety" and a["labels"]["severity"] in ("warning", "critical")
    by_name = {a["alert"]: a for a in alerts_}
    assert by_name["ModeratorNoWorkerUp"]["labels"]["job"] == "cf"  # the Service's name: a ServiceMonitor's job
    assert 'up{namespace="moderation", job="cf"}' in by_name["ModeratorWorkerDown"]["expr"]
    for args in (["--set", "prometheusRule.alertLabels.severity=info"],
                 ["--set", "prometheusRule.runbookBaseUrl=runbooks"]):
        r = render(helm, None, "--set", "prometheusRule.enabled=true", *args, check=False)
        assert r.returncode != 0 and "prometheusRule" in r.stderr, r.stderr


RENDERED_RULE_TESTS = """
rule_files: [rendered.yaml]
evaluation_interval: 1m
tests:
  # Namespace "moderation" (this release) never gets a worker up; "other" runs its own, healthy.
  - interval: 1m
    input_series:
      - series: 'up{namespace="moderation", job="moderator", instance="10.0.0.1:8080"}'
        values: '0x30'
      - series: 'up{namespace="other", job="moderator", instance="10.0.1.1:8080"}'
        values: '1x30'
    alert_rule_test:
      - eval_time: 20m
        alertname: ModeratorNoWorkerUp
        exp_alerts:
          - exp_labels: {severity: critical, namespace: moderation, job: moderator}
            exp_annotations: %(no_worker_up)s
      - eval_time: 20m
        alertname: ModeratorWorkerDown
        exp_alerts:
          - exp_labels: {severity: critical, namespace: moderation, job: moderator, instance: "10.0.0.1:8080"}
            exp_annotations: %(worker_down)s
"""


def test_rendered_prometheus_rule_passes_promtool(helm, promtool, tmp_path):
    """The rendered rules load in Prometheus (promtool check, lint included) and the absent()
    alert fires for this release's namespace, labelled with it, while another namespace's worker
    is up."""
    pr = prometheus_rule(helm)
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump({"groups": pr["spec"]["groups"]}))
    run([promtool, "check", "rules", "--lint=all", "--lint-fatal", tmp_path / "rendered.yaml"])
    by_name = {r["alert"]: r for g in pr["spec"]["groups"] for r in g["rules"] if "alert" in r}
    annotations = {}
    for name, instance in (("ModeratorNoWorkerUp", None), ("ModeratorWorkerDown", "10.0.0.1:8080")):
        a = dict(by_name[name]["annotations"])
        a = {k: v.replace("{{ $labels.instance }}", instance or "").replace("{{ $labels.job }}", "moderator")
             for k, v in a.items()}
        annotations[name] = json.dumps(a)
    (tmp_path / "rendered.test.yaml").write_text(RENDERED_RULE_TESTS % {
        "no_worker_up": annotations["ModeratorNoWorkerUp"], "worker_down": annotations["ModeratorWorkerDown"]})
    r = run([promtool, "test", "rules", tmp_path / "rendered.test.yaml"])
    assert "SUCCESS" in r.stdout


# --- the dashboard ConfigMap ------------------------------------------------------------------


def dashboard_configmap(manifests: list[dict]) -> dict:
    (cm,) = [cm for cm in by_kind(manifests, "ConfigMap") if "moderator-dashboard.json" in cm.get("data", {})]
    return cm


def test_dashboard_configmap_holds_the_dashboard_file(helm):
    cm = dashboard_configmap(docs(render(helm, None, "--set", "grafanaDashboard.enabled=true").stdout))
    assert cm["data"]["moderator-dashboard.json"] == DASHBOARD.read_text()
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "moderator"}
    assert "namespace" not in cm["metadata"]

    cm = dashboard_configmap(docs(render(
        helm, None, "--set", "grafanaDashboard.enabled=true", "--set", "grafanaDashboard.label=dashboards",
        "--set", "grafanaDashboard.labelValue=moderation", "--set", "grafanaDashboard.folderAnnotation=k8s-folder",
        "--set", "grafanaDashboard.folder=Trust and Safety", "--set", "grafanaDashboard.namespace=monitoring",
        "--set", "grafanaDashboard.extraLabels.team=ts").stdout))
    assert cm["metadata"]["labels"]["dashboards"] == "moderation" and "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["labels"]["team"] == "ts"
    assert cm["metadata"]["annotations"] == {"k8s-folder": "Trust and Safety"}
    assert cm["metadata"]["namespace"] == "monitoring"
    cm = dashboard_configmap(docs(render(helm, None, "--set", "grafanaDashboard.enabled=true",
                                         "--set", "grafanaDashboard.folder=").stdout))
    assert "annotations" not in cm["metadata"]


def test_dashboard_datasource_is_a_variable():
    """Every query and variable names its data source as ${datasource}, a variable over the Prometheus
    data sources: kube-prometheus-stack's Grafana (uid `prometheus`) and compose's both fill it."""
    d = json.loads(DASHBOARD.read_text())
    refs = []

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "datasource":
                    refs.append((where, v))
                walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}/{i}")

    walk(d, "")
    # Grafana's built-in annotation source exists in every Grafana.
    builtin = {"type": "grafana", "uid": "-- Grafana --"}
    refs = [(w, v) for w, v in refs if not (w.startswith("/annotations/") and v == builtin)]
    assert len(refs) > 10
    wrong = [r for r in refs if r[1] != {"type": "prometheus", "uid": "${datasource}"}]
    assert not wrong, wrong
    (var,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert var["name"] == "datasource" and var["query"] == "prometheus"
    assert "__inputs" not in d, "an export with __inputs needs an import step; the sidecar loads it as is"


def test_kube_prometheus_values_render_everything(helm):
    manifests = docs(render(helm, KUBE_PROMETHEUS).stdout)
    kinds = {m["kind"] for m in manifests}
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds
    release = {m["kind"]: m["metadata"]["labels"].get("release") for m in manifests
               if m["kind"] in ("ServiceMonitor", "PrometheusRule")}
    assert release == {"ServiceMonitor": "kube-prometheus-stack", "PrometheusRule": "kube-prometheus-stack"}
    assert dashboard_configmap(manifests)["metadata"]["annotations"]["grafana_folder"] == "Moderation"
