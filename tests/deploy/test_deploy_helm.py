"""The Helm chart, checked with the real tools: helm lint, helm template under every values file
in helm/moderator/ci/, and kubeconform against the Kubernetes schemas of the oldest and the
newest Kubernetes the chart supports and against the prometheus-operator and KEDA CRDs' schemas; plus the contract between the chart and the worker
(every MODERATOR_* variable is a setting the worker reads, with a value it accepts)."""

from __future__ import annotations

import json
import math
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
    (["--set", "banks.volume.persistentVolumeClaim.claimName=b", "--set", "banks.mountPath=/tmp/"], "overlaps /tmp"),
    (["--set", "banks.volume.persistentVolumeClaim.claimName=b", "--set", "banks.mountPath=/etc/moderator"],
     "overlaps /etc/moderator/policy"),
    (["--set", "banks.volume.persistentVolumeClaim.claimName=b", "--set", "banks.mountPath=/etc/moderator/policy/b"],
     "overlaps /etc/moderator/policy"),
    (["--set", "banks.volume.persistentVolumeClaim.claimName=b", "--set", "banks.mountPath=/"], "overlaps"),
])
def test_template_guards(helm, args, message):
    r = render(helm, None, *args, check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr


# --- what the manifests say -------------------------------------------------------------------


def test_banks_volume_is_mounted_read_only_where_the_policy_names_it(helm):
    manifests = docs(render(helm, None, "--set", "banks.volume.persistentVolumeClaim.claimName=moderator-banks",
                            "--set", "banks.subPath=prod").stdout)
    dep = by_kind(manifests, "Deployment")[0]
    mounts = {m["name"]: m for m in worker_container(dep)["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert mounts["banks"] == {"name": "banks", "mountPath": "/srv/moderator/banks", "readOnly": True,
                               "subPath": "prod"}
    assert volumes["banks"] == {"name": "banks", "persistentVolumeClaim": {"claimName": "moderator-banks"}}
    plain = by_kind(docs(render(helm, None).stdout), "Deployment")[0]  # none unless asked for
    assert "banks" not in {m["name"] for m in worker_container(plain)["volumeMounts"]}


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
    assert (CHART / "files" / "policy.yaml").read_text() == (ROOT / "moderator" / "data" / "policies" / "default.yaml").read_text()


# --- the chart and the worker agree --------------------------------------------------------------

# Kafka security settings the chart passes for SASL/TLS values; moderator/config.py does not
# have them yet (see the README's Kubernetes section).

def cpu_cores(quantity) -> float:
    q = str(quantity)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def resource_field(dep: dict, ref: dict) -> int:
    """What the kubelet puts in a downward-API resourceFieldRef for CPU: the quantity divided by
    the divisor, rounded up."""
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == ref["containerName"]]
    kind, _, resource = ref["resource"].partition(".")
    assert resource == "cpu", ref
    return math.ceil(cpu_cores(c["resources"][kind][resource]) / cpu_cores(ref.get("divisor", "1")))


def rendered_settings_env(dep: dict) -> dict[str, str]:
    """The worker container's MODERATOR_* environment as the pod would see it (secrets faked)."""
    out: dict[str, str] = {}
    plain: dict[str, str] = {}
    for e in worker_container(dep)["env"]:
        if "value" in e:
            value = re.sub(r"\$\((\w+)\)", lambda m: plain.get(m.group(1), m.group(0)), e["value"])
        elif "secretKeyRef" in e["valueFrom"]:
            value = "from-secret"
        elif "resourceFieldRef" in e["valueFrom"]:
            value = str(resource_field(dep, e["valueFrom"]["resourceFieldRef"]))
        else:
            value = "pod-name-0"
        plain[e["name"]] = value
        if e["name"].startswith("MODERATOR_"):
            out[e["name"]] = value
    return out


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_every_env_var_is_a_worker_setting_it_accepts(helm, values, monkeypatch):
    from moderator.config import WorkerSettings

    dep = deployment(helm, values)
    env = rendered_settings_env(dep)
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
    # ONNX Runtime's threads: the CPU request rounded up (downward API), unless set explicitly.
    assert settings.ort_threads == math.ceil(cpu_cores(worker_container(dep)["resources"]["requests"]["cpu"]))
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


# --- scheduling, resources, network, images, helm test ------------------------------------------

DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_ort_threads_follow_the_cpu_request(helm):
    env = {e["name"]: e for e in worker_container(deployment(helm))["env"]}
    assert env["MODERATOR_ORT_THREADS"]["valueFrom"] == {
        "resourceFieldRef": {"containerName": "worker", "resource": "requests.cpu", "divisor": "1"}}
    dep = deployment(helm, None, "--set", "resources.requests.cpu=2500m")
    assert rendered_settings_env(dep)["MODERATOR_ORT_THREADS"] == "3"
    env = {e["name"]: e for e in worker_container(deployment(helm, None, "--set", "worker.ortThreads=6"))["env"]}
    assert env["MODERATOR_ORT_THREADS"] == {"name": "MODERATOR_ORT_THREADS", "value": "6"}


def test_ephemeral_storage_request(helm):
    res = worker_container(deployment(helm))["resources"]
    assert res["requests"]["ephemeral-storage"] == "1Gi" and "ephemeral-storage" not in res["limits"]
    res = worker_container(deployment(helm, CHART / "ci" / "kube-prometheus-values.yaml"))["resources"]
    assert res["requests"]["ephemeral-storage"] == "1500Mi" and res["limits"]["ephemeral-storage"] == "3Gi"
    assert res["requests"]["cpu"] == "1" and res["limits"]["memory"] == "2Gi"
    res = worker_container(deployment(helm, None, "--set", "resources.requests.ephemeral-storage=5Gi"))["resources"]
    assert res["requests"]["ephemeral-storage"] == "5Gi", "resources wins"
    res = worker_container(deployment(helm, None, "--set", "ephemeralStorage.request="))["resources"]
    assert "ephemeral-storage" not in res["requests"]
    assert render(helm, None, "--set", "ephemeralStorage.request=lots", check=False).returncode != 0


def test_image_digests(helm):
    dep = deployment(helm, None, "--set", f"image.digest={DIGEST}", "--set", "image.tag=ignored",
                     "--set", f"model.image.digest={DIGEST}")
    assert worker_container(dep)["image"] == f"ghcr.io/moderator/moderator@{DIGEST}"
    assert dep["spec"]["template"]["spec"]["initContainers"][0]["image"] == f"ghcr.io/moderator/moderator-model@{DIGEST}"
    r = render(helm, None, "--set", "image.digest=sha256:abc", check=False)
    assert r.returncode != 0 and "digest" in r.stderr


def test_pod_anti_affinity(helm):
    dep = deployment(helm)
    (term,) = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["weight"] == 100 and term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    hard = deployment(helm, None, "--set", "podAntiAffinity=hard")["spec"]["template"]["spec"]["affinity"]
    (req,) = hard["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert req["topologyKey"] == "kubernetes.io/hostname" and list(hard["podAntiAffinity"]) == [
        "requiredDuringSchedulingIgnoredDuringExecution"]
    assert "affinity" not in deployment(helm, None, "--set", "podAntiAffinity=none")["spec"]["template"]["spec"]
    own = deployment(helm, None, "--set", "affinity.nodeAffinity.x=y")["spec"]["template"]["spec"]["affinity"]
    assert own == {"nodeAffinity": {"x": "y"}}, "affinity replaces the default"
    assert render(helm, None, "--set", "podAntiAffinity=always", check=False).returncode != 0


def egress_ports(np: dict) -> list[set[tuple[int, str]]]:
    return [{(p["port"], p["protocol"]) for p in rule.get("ports", [])} for rule in np["spec"]["egress"]]


def test_network_policy(helm):
    assert not by_kind(docs(render(helm).stdout), "NetworkPolicy")
    manifests = docs(render(helm, CHART / "ci" / "keda-values.yaml", "--set", "networkPolicy.enabled=true").stdout)
    (np,) = by_kind(manifests, "NetworkPolicy")
    dep = by_kind(manifests, "Deployment")[0]
    assert np["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = np["spec"]["ingress"]
    assert ingress == {"ports": [{"port": "http", "protocol": "TCP"}]}, "metrics port, from anywhere"
    # DNS, Kafka's bootstrap port (kafka-0.kafka:9093,...), Redis (rediss://redis-master.cache:6379), fetching
    assert egress_ports(np) == [{(53, "UDP"), (53, "TCP")}, {(9093, "TCP")}, {(6379, "TCP")},
                                {(80, "TCP"), (443, "TCP")}]
    fetch = np["spec"]["egress"][3]
    assert fetch["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
    assert all("to" not in rule for rule in np["spec"]["egress"][:3]), "no peers given: any destination"

    manifests = docs(render(helm, CHART / "ci" / "kube-prometheus-values.yaml").stdout)
    (np,) = by_kind(manifests, "NetworkPolicy")
    egress = np["spec"]["egress"]
    assert egress_ports(np) == [{(53, "UDP"), (53, "TCP")}, {(9092, "TCP"), (9094, "TCP")}, {(6380, "TCP")},
                                {(443, "TCP")}, {(8443, "TCP")}]
    assert egress[0]["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert egress[1]["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kafka"}
    assert egress[2]["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "cache"}
    assert egress[3]["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0",
                                            "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}]
    (ingress,) = np["spec"]["ingress"]
    monitoring, test_pod = ingress["from"]
    assert monitoring["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    (pod,) = [m for m in by_kind(manifests, "Pod")]
    assert test_pod["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), \
        "the helm test pod may still reach /readyz"
    assert not np["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), \
        "the policy must not select the test pod: its egress would stop it reaching the Service"
    (np,) = by_kind(docs(render(helm, None, "--set", "networkPolicy.enabled=true").stdout), "NetworkPolicy")
    assert egress_ports(np) == [{(53, "UDP"), (53, "TCP")}, {(9092, "TCP")}, {(80, "TCP"), (443, "TCP")}], "no Redis"
    r = render(helm, None, "--set", "networkPolicy.enabled=true", "--set", "kafka.bootstrapServers=kafka", check=False)
    assert r.returncode != 0 and "has no :port" in r.stderr


def test_helm_test_pod_checks_readyz_on_the_service(helm):
    manifests = docs(render(helm).stdout)
    (pod,) = by_kind(manifests, "Pod")
    (svc,) = by_kind(manifests, "Service")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    script = " ".join(c["command"])
    url = f"http://{svc['metadata']['name']}.moderation.svc:{svc['spec']['ports'][0]['port']}/readyz"
    assert f"wget -q -T 5 -O - {url}" in script and f"curl -fsS -m 5 {url}" in script
    assert c["image"] == "busybox:1.37"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True and pod["spec"]["automountServiceAccountToken"] is False
    labels = pod["metadata"]["labels"].items()
    (deploy,) = by_kind(manifests, "Deployment")
    (pdb,) = by_kind(manifests, "PodDisruptionBudget")
    for name, selector in (("Service", svc["spec"]["selector"]), ("Deployment", deploy["spec"]["selector"]["matchLabels"]),
                           ("PodDisruptionBudget", pdb["spec"]["selector"]["matchLabels"])):
        assert not selector.items() <= labels, f"the {name}'s selector matches the test pod"
    (pod,) = by_kind(docs(render(helm, CHART / "ci" / "kube-prometheus-values.yaml").stdout), "Pod")
    assert pod["spec"]["containers"][0]["image"] == "curlimages/curl:8.17.0"
    assert "+ 60 ))" in pod["spec"]["containers"][0]["command"][2]
    assert not by_kind(docs(render(helm, None, "--set", "tests.enabled=false").stdout), "Pod")


def test_helm_test_script_waits_for_a_ready_worker(helm, tmp_path):
    """The test pod's script, run here against a local /readyz that is not ready for its first
    answers: it exits 0 once one answers 200, and 1 when none does in time."""
    import http.server
    import subprocess
    import threading

    answers: list[int] = []

    class Readyz(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            code = 200 if self.path == "/readyz" and self.server.ready_after <= len(answers) else 503
            answers.append(code)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"ok" if code == 200 else b"not ready")

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Readyz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # never ready: 5 s, so the script asks at least twice (0 s and after its 2 s sleep) even when a
        # loaded machine starts it late in a second (with 3 s it was once asked only once)
        for ready_after, timeout, rc in ((2, 30, 0), (10**6, 5, 1)):
            answers.clear()
            server.ready_after = ready_after
            (pod,) = by_kind(docs(render(helm, None, "--set", f"tests.timeoutSeconds={timeout}").stdout), "Pod")
            script = pod["spec"]["containers"][0]["command"][2].replace(
                "http://moderator.moderation.svc:8080/readyz", f"http://127.0.0.1:{server.server_port}/readyz")
            r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
            assert r.returncode == rc, (r.stdout, r.stderr, answers)
            assert answers[:2] == [503, 503] and (answers[-1] == 200) == (rc == 0)
    finally:
        server.shutdown()


# --- the chart's README ---------------------------------------------------------------------------

CHART_DOCS = ROOT / "deploy" / "tools" / "chart_docs.py"


def test_chart_readme_is_generated_from_values(tmp_path):
    """helm/moderator/README.md is what deploy/tools/chart_docs.py makes of values.yaml (helm-docs'
    `# --` comments): --check passes here and fails on a chart whose values changed since."""
    import shutil
    import sys

    run([sys.executable, CHART_DOCS, "--check"])
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"| `prometheusRule.runbookBaseUrl` | string | `\"\"` |" in readme
    assert "| `networkPolicy.kafka.extraPorts` | list | `[]` | More broker ports" in readme
    assert f"| `replicaCount` | int | `{values['replicaCount']}` | Replicas when no autoscaler is on." in readme

    chart = tmp_path / "moderator"
    shutil.copytree(CHART, chart)
    text = (chart / "values.yaml").read_text()
    (chart / "values.yaml").write_text(text.replace("replicaCount: 2", "replicaCount: 3"))
    r = run([sys.executable, CHART_DOCS, "--chart", chart, "--check"], check=False)
    assert r.returncode == 1 and "stale" in r.stderr
    run([sys.executable, CHART_DOCS, "--chart", chart])
    assert "| `replicaCount` | int | `3` |" in (chart / "README.md").read_text()
    run([sys.executable, CHART_DOCS, "--chart", chart, "--check"])


def test_new_values_are_documented():
    """Every value of the kube-prometheus, network and test features has a `# --` description
    (its own or its map's), so the chart README explains it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chart_docs", CHART_DOCS)
    chart_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chart_docs)
    text = (CHART / "values.yaml").read_text()
    docs_ = chart_docs.descriptions(text)
    rows = chart_docs.rows(yaml.safe_load(text), docs_)
    sections = ("prometheusRule.", "grafanaDashboard.", "networkPolicy.", "tests.", "ephemeralStorage.",
                "podAntiAffinity", "image.digest", "model.image.digest", "worker.ortThreads", "affinity")
    new = [k for k, *_ in rows if k.startswith(sections)]
    assert len(new) > 25
    undocumented = [k for k in new if not any(p in docs_ for p in
                                              (".".join(k.split(".")[:i]) for i in range(1, k.count(".") + 2)))]
    assert not undocumented, undocumented
