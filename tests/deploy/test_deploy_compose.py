"""deploy/compose.yaml, loaded the way `docker compose config` loads it (compose-go: the Compose
Specification's schema, interpolation, normalisation, consistency), then checked for the wiring
between its services: the worker's settings, Prometheus's scrape target, Grafana's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deploy_support import ROOT, run

COMPOSE = ROOT / "deploy" / "compose.yaml"


@pytest.fixture(scope="module")
def project(compose_check, tmp_path_factory) -> dict:
    model_dir = tmp_path_factory.mktemp("model")
    r = run([compose_check, "-env", f"MODEL_DIR={model_dir}", "-profiles", "load", COMPOSE])
    return json.loads(r.stdout)


def test_compose_loads_with_every_service(project):
    assert set(project["services"]) == {"kafka", "redis", "worker", "producer", "prometheus", "grafana"}


def test_compose_needs_a_model_dir(compose_check):
    r = run([compose_check, COMPOSE], check=False)
    assert r.returncode != 0 and "MODEL_DIR" in r.stderr


def test_compose_check_is_live(compose_check, tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  a:\n    image: x\n    depends_on: [b]\n    restartt: always\n")
    r = run([compose_check, bad], check=False)
    assert r.returncode != 0 and "restartt" in r.stderr


def test_worker_service_is_the_image_with_valid_settings(project, monkeypatch):
    from moderator.config import WorkerSettings

    w = project["services"]["worker"]
    assert w["build"]["target"] == "cpu"
    assert (Path(w["build"]["context"]) / w["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert w["read_only"] is True and w["user"] == "10001:10001" and w["cap_drop"] == ["ALL"]
    env = w["environment"]
    unknown = {k.removeprefix("MODERATOR_").lower() for k in env if k.startswith("MODERATOR_")} - set(
        WorkerSettings.model_fields)
    assert not unknown, f"compose sets variables the worker ignores: {unknown}"
    for k in env:
        monkeypatch.setenv(k, env[k])
    s = WorkerSettings()
    kafka_env = project["services"]["kafka"]["environment"]
    assert f"PLAINTEXT://{s.kafka_bootstrap_servers}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert s.redis_url.startswith("redis://redis:")
    mounts = {v["target"]: v for v in w["volumes"]}
    assert mounts[str(s.model_dir)]["read_only"] is True
    policy_mount = mounts[str(s.policy.parent)]
    assert (Path(policy_mount["source"]) / s.policy.name).is_file(), "the policy the worker reads exists"
    deps = w["depends_on"]
    assert deps["kafka"]["condition"] == deps["redis"]["condition"] == "service_healthy"


def test_prometheus_scrapes_the_worker_and_loads_the_alerts(project):
    p = project["services"]["prometheus"]
    mounts = {v["target"]: Path(v["source"]) for v in p["volumes"]}
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    worker = project["services"][host]
    assert worker["environment"]["MODERATOR_HTTP_PORT"] == port
    assert job["metrics_path"] == "/metrics"
    for rule_file in config["rule_files"]:
        # deploy/prometheus/alerts.yaml links to the chart's rule file (one file for both)
        assert mounts[f"/etc/prometheus/{rule_file}"].resolve() == ROOT / "helm" / "moderator" / "files" / "alerts.yaml"


def test_grafana_gets_the_datasource_and_the_dashboard(project):
    g = project["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in g["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == ROOT / "deploy" / "grafana" / "provisioning"
    dash = mounts["/var/lib/grafana/dashboards/moderator-dashboard.json"]
    assert dash.resolve() == ROOT / "helm" / "moderator" / "files" / "moderator-dashboard.json"  # a link to the chart's
    assert g["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == \
        "/var/lib/grafana/dashboards/moderator-dashboard.json"
    ds = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yaml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
