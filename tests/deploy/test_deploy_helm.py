"""The Helm chart, checked with the real tools: helm lint, helm template under every values file
in helm/moderator/ci/, and kubeconform against the Kubernetes schemas of the oldest and the
newest Kubernetes the chart supports and against the prometheus-operator and KEDA CRDs' schemas; plus the contract between the chart and the worker
(every MODERATOR_* variable is a setting the worker reads, with a value it accepts)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from deploy_support import CHART, ROOT, run

VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSIONS = ("1.29.0", "1.37.0")  # Chart.yaml's kubeVersion floor and the newest schemas we have
# Custom resources: validated against the schemas of their CRDs (deploy/tools/crd_schemas.py), and
# the fields that matter are asserted below as well.
CRD_KINDS = ("ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication")
CORE_KINDS_ALWAYS = {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}


def render(helm: Path, values: Path | None = None, *args: str, check: bool = True, kube: str = "1.33.0"):
    cmd = [helm, "template", "moderator", CHART, "--namespace", "moderation", "--kube-version", kube]
    if values is not None:
        cmd += ["-f", values]
    return run([*cmd, *args], check=check)


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(manifests: list[dict], kind: str) -> list[dict]:
    return [m for m in manifests if m["kind"] == kind]


def deployment(helm: Path, values: Path | None = None, *args: str) -> dict:
    (dep,) = by_kind(docs(render(helm, values, *args).stdout), "Deployment")
    return dep


def worker_container(dep: dict) -> dict:
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"]
    return c


def kubeconform_cmd(kubeconform: Path, schemas: Path, crds: Path, kube: str) -> list:
    """kubeconform -strict: Kubernetes kinds from `schemas`, custom resources from `crds`; no kind
    is skipped and a kind with no schema is an error."""
    return [kubeconform, "-strict", "-output", "json", "-verbose", "-kubernetes-version", kube,
            "-schema-location",
            f"{schemas}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/"
            "{{ .ResourceKind }}{{ .KindSuffix }}.json",
            "-schema-location", f"{crds}/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json"]


# --- the real tools ------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_helm_lint(helm, values):
    r = run([helm, "lint", "--strict", CHART, "-f", values, "--kube-version", "1.33.0"])
    assert "0 chart(s) failed" in r.stdout


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_rendered_manifests_match_kubernetes_schemas(helm, kubeconform, k8s_schemas, crd_schemas, values, kube,
                                                     tmp_path):
    rendered = tmp_path / "rendered.yaml"
    text = render(helm, values, kube=kube).stdout
    rendered.write_text(text)
    r = run([*kubeconform_cmd(kubeconform, k8s_schemas, crd_schemas, kube), rendered], check=False)
    report = json.loads(r.stdout)
    bad = [res for res in report["resources"] if res["status"] != "statusValid"]
    assert r.returncode == 0 and not bad, json.dumps(bad or report, indent=1)
    valid = [res["kind"] for res in report["resources"]]
    assert CORE_KINDS_ALWAYS <= set(valid), f"core kinds not validated: {CORE_KINDS_ALWAYS - set(valid)}"
    assert sorted(valid) == sorted(m["kind"] for m in docs(text)), "every rendered manifest was validated"


def test_kubeconform_catches_a_broken_manifest(helm, kubeconform, k8s_schemas, crd_schemas, tmp_path):
    """The schemas are live, the CRDs' too: a misspelt field and a wrong type are errors, not skips."""
    manifests = docs(render(helm, CHART / "ci" / "keda-values.yaml", "--set", "prometheusRule.enabled=true").stdout)
    dep = by_kind(manifests, "Deployment")[0]
    worker_container(dep)["imagePullPolicyy"] = "Always"
    dep["spec"]["replicas"] = "two"
    rule = by_kind(manifests, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0]
    rule["recordd"] = rule.pop("record")
    by_kind(manifests, "ServiceMonitor")[0]["spec"]["endpoints"][0]["interval"] = 15
    by_kind(manifests, "ScaledObject")[0]["spec"]["maxReplicaCount"] = "many"
    by_kind(manifests, "TriggerAuthentication")[0]["spec"]["secretTargetRef"][0]["paramater"] = "x"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(manifests))
    r = run([*kubeconform_cmd(kubeconform, k8s_schemas, crd_schemas, "1.37.0"), broken], check=False)
    assert r.returncode != 0
    errors = {res["kind"]: res.get("msg", "") for res in json.loads(r.stdout)["resources"]
              if res["status"] != "statusValid"}
    assert "imagePullPolicyy" in errors["Deployment"] and "replicas" in errors["Deployment"], errors
    assert "recordd" in errors["PrometheusRule"] and "interval" in errors["ServiceMonitor"], errors
    assert "maxReplicaCount" in errors["ScaledObject"] and "paramater" in errors["TriggerAuthentication"], errors


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "kafka.securityProtocol=SASL"], "securityProtocol"),
    (["--set", "worker.maxBatch=0"], "maxBatch"),
    (["--set", "worker.maxBatchSize=8"], "maxBatchSize"),
    (["--set", "model.source=s3"], "source"),
    (["--set", "kafka.topics.decisions=bad topic"], "decisions"),
    (["--set", "redis.url=redis://:secret@redis:6379"], "url"),
    (["--set", "gpu.count=0"], "count"),
])
def test_values_schema_rejects_bad_values(helm, args, message):
    r = render(helm, None, *args, check=False)
    assert r.returncode != 0, f"accepted {args}"
    assert message in r.stderr, r.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "autoscaling.keda.enabled=true", "--set", "autoscaling.hpa.enabled=true"], "at most one of keda and hpa"),
    (["--set", "kafka.securityProtocol=SASL_SSL"], "needs kafka.sasl.existingSecret"),
    (["--set", "model.source=volume"], "needs model.volume"),
    (["--set", "redis.existingSecret=redis"], "redis.url is empty"),
    (["--set", "redis.url=redis://r:6379", "--set", "redis.tls.existingSecret=ca"], "needs a rediss://"),
    (["--set", "redis.url=redis://r:6379", "--set", "redis.usernameKey=user"], "needs redis.existingSecret"),
    (["--set", "kafka.tls.certKey=tls.crt"], "certKey and keyKey"),
])
def test_template_guards(helm, args, message):
    r = render(helm, None, *args, check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr


# --- what the manifests say -------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_pod_security_probes_and_policy_mount(helm, values):
    manifests = docs(render(helm, values).stdout)
    dep = by_kind(manifests, "Deployment")[0]
    pod = dep["spec"]["template"]["spec"]
    c = worker_container(dep)

    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for ctr in pod["containers"] + pod.get("initContainers", []):
        sc = ctr["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, ctr["name"]
        assert sc["allowPrivilegeEscalation"] is False, ctr["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], ctr["name"]
    assert pod["automountServiceAccountToken"] is False

    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["resources"]["requests"]["memory"]

    env = {e["name"]: e for e in c["env"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # The policy ConfigMap is a directory mount (subPath mounts never see updates: no hot reload).
    assert "subPath" not in mounts["policy"]
    policy_file = Path(env["MODERATOR_POLICY"]["value"])
    assert policy_file.parent == Path(mounts["policy"]["mountPath"])
    cm_name = volumes["policy"]["configMap"]["name"]
    rendered_cms = {m["metadata"]["name"]: m for m in by_kind(manifests, "ConfigMap")}
    if cm_name in rendered_cms:
        policy = yaml.safe_load(rendered_cms[cm_name]["data"][policy_file.name])
        assert policy["version"] and policy["categories"]
    assert volumes["tmp"]["emptyDir"] and mounts["tmp"]["mountPath"] == "/tmp"

    # The metrics Service selects the pods and exposes the http port, ready or not.
    (svc,) = by_kind(manifests, "Service")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http" and svc["spec"]["publishNotReadyAddresses"] is True
    (pdb,) = by_kind(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > float(
        env["MODERATOR_SHUTDOWN_GRACE_S"]["value"])


def test_default_model_comes_from_a_model_image_into_an_emptydir(helm):
    dep = deployment(helm)
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    model_vol = next(v for v in pod["volumes"] if v["name"] == "model")
    assert "emptyDir" in model_vol
    model_dir = {e["name"]: e.get("value") for e in worker_container(dep)["env"]}["MODERATOR_MODEL_DIR"]
    assert any(m["mountPath"] == model_dir for m in init["volumeMounts"])
    assert model_dir in " ".join(init["command"])
    assert next(m for m in worker_container(dep)["volumeMounts"] if m["name"] == "model")["readOnly"] is True
    assert dep["spec"]["replicas"] == 2 and worker_container(dep)["image"].endswith(":0.1.0-cpu")


def test_gpu_values_request_gpus_and_schedule_on_gpu_nodes(helm):
    dep = deployment(helm, CHART / "ci" / "gpu-values.yaml")
    pod = dep["spec"]["template"]["spec"]
    c = worker_container(dep)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith("-gpu")
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MODERATOR_ORT_PROVIDERS"] == "CUDAExecutionProvider,CPUExecutionProvider"
    model_vol = next(v for v in pod["volumes"] if v["name"] == "model")
    assert model_vol["persistentVolumeClaim"]["claimName"] == "moderator-models"
    assert "initContainers" not in pod


def test_keda_values_scale_on_the_workers_own_consumer_group(helm):
    manifests = docs(render(helm, CHART / "ci" / "keda-values.yaml").stdout)
    dep = by_kind(manifests, "Deployment")[0]
    assert "replicas" not in dep["spec"], "KEDA owns the replica count"
    env = {e["name"]: e for e in worker_container(dep)["env"]}
    (so,) = by_kind(manifests, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (trigger,) = so["spec"]["triggers"]
    md = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert md["consumerGroup"] == env["MODERATOR_CONSUMER_GROUP"]["value"]
    assert md["topic"] == env["MODERATOR_INPUT_TOPIC"]["value"]
    assert md["bootstrapServers"] == env["MODERATOR_KAFKA_BOOTSTRAP_SERVERS"]["value"]
    assert md["sasl"] == "scram_sha512" and md["tls"] == "enable"
    assert all(isinstance(v, str) for v in md.values()), "KEDA trigger metadata must be strings"
    (ta,) = by_kind(manifests, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == ta["metadata"]["name"]
    assert {r["parameter"] for r in ta["spec"]["secretTargetRef"]} == {"username", "password", "ca"}
    (sm,) = by_kind(manifests, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "http-metrics" and sm["metadata"]["labels"]["release"]
    assert not by_kind(manifests, "HorizontalPodAutoscaler")


def test_credentials_only_come_from_secrets(helm):
    """SASL and Redis credentials are secretKeyRefs, each its own setting (never spliced into a URL)."""
    for values in VALUES_FILES:
        manifests = docs(render(helm, values).stdout)
        assert not by_kind(manifests, "Secret"), "the chart never holds credentials itself"
        for e in worker_container(by_kind(manifests, "Deployment")[0])["env"]:
            if re.search(r"PASSWORD|USERNAME|TOKEN", e["name"]):
                assert "secretKeyRef" in e.get("valueFrom", {}), e
    dep = deployment(helm, CHART / "ci" / "keda-values.yaml")
    env = worker_container(dep)["env"]
    by = {e["name"]: e for e in env}
    assert by["MODERATOR_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "moderator-kafka-user", "key": "password"}
    assert by["MODERATOR_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis", "key": "redis-password"}
    assert by["MODERATOR_REDIS_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "redis", "key": "redis-username"}
    assert by["MODERATOR_REDIS_URL"]["value"] == "rediss://redis-master.cache:6379/0"  # no credentials in it
    assert not any("$(" in e.get("value", "") for e in env), "no credential is spliced into a value"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["kafka-tls"]["secret"]["secretName"] == "kafka-cluster-ca"
    assert volumes["redis-tls"]["secret"]["secretName"] == "redis-ca"
    mounts = {m["name"]: m["mountPath"] for m in worker_container(dep)["volumeMounts"]}
    assert by["MODERATOR_REDIS_SSL_CA_FILE"]["value"] == mounts["redis-tls"] + "/ca.crt"


def test_hpa_values(helm):
    manifests = docs(render(helm, CHART / "ci" / "hpa-values.yaml").stdout)
    (hpa,) = by_kind(manifests, "HorizontalPodAutoscaler")
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}
    assert not by_kind(manifests, "ConfigMap"), "an existing ConfigMap was named"
    dep = by_kind(manifests, "Deployment")[0]
    assert "replicas" not in dep["spec"]
    assert not any(v["name"] == "model" for v in dep["spec"]["template"]["spec"]["volumes"])
    (pdb,) = by_kind(manifests, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": pdb["spec"]["selector"]}


def test_chart_starter_policy_is_the_repositorys(helm):
    assert (CHART / "files" / "policy.yaml").read_text() == (ROOT / "deploy" / "policies" / "default.yaml").read_text()


# --- the chart and the worker agree --------------------------------------------------------------

# Kafka security settings the chart passes for SASL/TLS values; moderator/config.py does not
# have them yet (see the README's Kubernetes section).

def rendered_settings_env(dep: dict) -> dict[str, str]:
    """The worker container's MODERATOR_* environment as the pod would see it (secrets faked)."""
    out: dict[str, str] = {}
    plain: dict[str, str] = {}
    for e in worker_container(dep)["env"]:
        if "value" in e:
            value = re.sub(r"\$\((\w+)\)", lambda m: plain.get(m.group(1), m.group(0)), e["value"])
        elif "secretKeyRef" in e["valueFrom"]:
            value = "from-secret"
        else:
            value = "pod-name-0"
        plain[e["name"]] = value
        if e["name"].startswith("MODERATOR_"):
            out[e["name"]] = value
    return out


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_every_env_var_is_a_worker_setting_it_accepts(helm, values, monkeypatch):
    from moderator.config import WorkerSettings

    env = rendered_settings_env(deployment(helm, values))
    fields = set(WorkerSettings.model_fields)
    unknown = {k.removeprefix("MODERATOR_").lower() for k in env} - fields
    for k in list(os.environ):
        if k.startswith("MODERATOR_") and k != "MODERATOR_CACHE_DIR":
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = WorkerSettings()  # raises on any value the worker would refuse
    assert str(settings.policy).startswith("/etc/moderator/policy/")
    assert settings.http_port == 8080 and settings.client_id == "pod-name-0"
    if values.stem == "keda-values":
        assert settings.fetch_allow_networks == ["10.20.0.0/16"]
        assert settings.session_timeout_ms == 15000 and settings.max_event_bytes == 16 * 1024 * 1024
        assert settings.redis_url == "rediss://redis-master.cache:6379/0"
        assert settings.redis_options() == {"username": "from-secret", "password": "from-secret",
                                            "ssl_ca_certs": "/etc/moderator/redis-tls/ca.crt"}
    if values.stem == "gpu-values":
        assert settings.ort_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
        assert settings.max_batch == 64
    if values.stem == "keda-values":  # SASL_SSL from Secrets reaches both Kafka clients
        kw = settings.kafka_security()
        assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_plain_username"] == "from-secret"
        assert kw["sasl_plain_password"] == "from-secret" and kw["ssl_cafile"].startswith("/")
    assert not unknown, f"the chart sets MODERATOR_* variables the worker ignores: {sorted(unknown)}"
