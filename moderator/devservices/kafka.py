"""A real single-node Kafka 4.x broker (KRaft) run as a local JVM process.

No Docker needed: the broker jars come from Maven Central once (``moderator/data/kafka/pom.xml``)
and are cached; each ``LocalKafka`` then formats a throwaway log dir and starts
``kafka.Kafka`` on free loopback ports. Start-up is a few seconds.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moderator.devservices._process import (
    LOOPBACK,
    ManagedProcess,
    Workdir,
    cache_dir,
    free_ports,
    port_open,
    require_executable,
    tail,
    wait_until,
)
from moderator.devservices.errors import KafkaLibsError, ServiceStartError
from moderator.devservices.tls import TestPki

KAFKA_VERSION = "4.4.0"
_BROKER_JAR = f"kafka_2.13-{KAFKA_VERSION}.jar"
_MAVEN_TIMEOUT_S = 900
_JAVA_HINT = "Kafka 4.x needs a Java 17+ runtime (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)."
_MAVEN_HINT = "It downloads the Kafka broker jars once (Debian/Ubuntu: apt-get install maven)."


def deploy_dir() -> Path:
    """The broker's Maven pom and log4j2 config (package data: ``moderator/data/kafka``);
    ``$MODERATOR_KAFKA_DEPLOY_DIR`` overrides."""
    configured = os.environ.get("MODERATOR_KAFKA_DEPLOY_DIR")
    if configured:
        return Path(configured).expanduser()
    from moderator.resources import KAFKA_BROKER_DIR  # noqa: PLC0415

    return KAFKA_BROKER_DIR


def _kafka_cache() -> Path:
    return cache_dir() / f"kafka-{KAFKA_VERSION}"


def kafka_libs_dir() -> Path:
    """Directory holding every jar a Kafka broker needs, resolving it with Maven on first use.

    Cached under ``$MODERATOR_CACHE_DIR/kafka-4.4.0/libs`` (default cache
    ``~/.cache/moderator``) and re-resolved when ``pom.xml`` changes. A file
    lock serialises concurrent first calls (pytest-xdist workers, parallel CI
    jobs sharing a cache). ``$MODERATOR_KAFKA_LIBS`` points at a ready-made
    directory instead, e.g. the ``libs/`` of an unpacked Kafka release.

    Raises:
        ToolNotInstalledError: ``mvn`` is not installed (and nothing is cached).
        KafkaLibsError: Maven failed; the message carries its output.
    """
    configured = os.environ.get("MODERATOR_KAFKA_LIBS")
    if configured:
        libs = Path(configured).expanduser()
        if not any(libs.glob("kafka_2.13-*.jar")):
            raise KafkaLibsError(f"MODERATOR_KAFKA_LIBS={libs} holds no kafka_2.13-*.jar")
        return libs

    cache = _kafka_cache()
    libs, marker = cache / "libs", cache / "libs.ok"
    pom = deploy_dir() / "pom.xml"
    wanted = _sha256(pom) if pom.is_file() else None
    if _cache_valid(libs, marker, wanted):
        return libs
    if wanted is None:
        raise KafkaLibsError(f"Kafka broker jars are not cached in {libs} and {pom} does not exist.")

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _cache_valid(libs, marker, wanted):  # another process finished it meanwhile
            return libs
        _resolve_with_maven(pom, cache)
        marker.write_text(wanted + "\n")
    return libs


def _cache_valid(libs: Path, marker: Path, wanted: str | None) -> bool:
    if not (marker.is_file() and (libs / _BROKER_JAR).is_file()):
        return False
    # No pom to compare against (installed package, no checkout): trust the cache.
    return wanted is None or marker.read_text().strip() == wanted


def _resolve_with_maven(pom: Path, cache: Path) -> None:
    mvn = require_executable("mvn", _MAVEN_HINT)
    staging = cache / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    cmd = [mvn, "-B", "-ntp", "-f", str(pom), "dependency:copy-dependencies",
           f"-DoutputDirectory={staging}"]
    try:
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=_MAVEN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise KafkaLibsError(
            f"Maven did not finish resolving the Kafka jars within {_MAVEN_TIMEOUT_S}s.\n"
            f"$ {shlex.join(cmd)}\n{_last_lines(exc.output)}") from None
    if result.returncode != 0 or not (staging / _BROKER_JAR).is_file():
        raise KafkaLibsError(
            f"Maven could not resolve the Kafka {KAFKA_VERSION} broker jars (exit {result.returncode}).\n"
            f"$ {shlex.join(cmd)}\n{_last_lines(result.stdout)}")
    # The log4j2 config travels with the jars so a cached install runs without the checkout.
    log_config = pom.parent / "log4j2.properties"
    if log_config.is_file():
        shutil.copy2(log_config, cache / "log4j2.properties")
    libs = cache / "libs"
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)


def _last_lines(output: str | bytes | None, lines: int = 80) -> str:
    if isinstance(output, bytes):
        output = output.decode("utf-8", errors="replace")
    return "\n".join((output or "<no output>").splitlines()[-lines:])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _log4j_config() -> Path | None:
    for candidate in (deploy_dir() / "log4j2.properties", _kafka_cache() / "log4j2.properties"):
        if candidate.is_file():
            return candidate
    return None


def new_cluster_id() -> str:
    """A KRaft cluster id as ``kafka-storage random-uuid`` makes one, without starting a JVM.

    Kafka's ``Uuid.toString`` is URL-safe base64 without padding. Like Kafka we
    reject ids starting with ``-``: argparse4j would read one as an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def kafka_ready(bootstrap_servers: str, timeout_s: float = 5.0, security: Mapping[str, object] | None = None) -> bool:
    """True when a broker answers metadata requests and at least one broker is unfenced.

    ``security``: kafka-python keyword arguments (``LocalKafka.client_security()``).
    """
    from kafka import KafkaAdminClient

    timeout_ms = int(timeout_s * 1000)
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers,
                                 client_id="moderator-devservices-probe",
                                 bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms,
                                 **dict(security or {}))
    except Exception:
        return False
    try:
        admin.list_topics()
        brokers = admin.describe_cluster().get("brokers", [])
        return any(not broker.get("is_fenced", False) for broker in brokers)
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            admin.close()


def wait_for_kafka(bootstrap_servers: str, timeout_s: float = 30.0) -> None:
    """Block until ``kafka_ready``; raise ``ServiceStartError`` after ``timeout_s``."""
    if not wait_until(lambda: kafka_ready(bootstrap_servers), timeout=timeout_s, interval=0.5):
        raise ServiceStartError(f"No Kafka broker answered at {bootstrap_servers} within {timeout_s:.0f}s.")


@dataclass(frozen=True)
class BrokerSecurity:
    """How ``LocalKafka`` secures its client listener (the controller's stays on loopback, plain).

    - ``SASL_SSL``: TLS, and SCRAM-SHA-512 logins for ``users`` (name -> password), created
      when the storage is formatted (``kafka-storage format --add-scram``); the broker logs in
      to itself as ``admin``.
    - ``SSL``: TLS only.

    ``mutual_tls`` makes the broker require a client certificate signed by its CA. The CA
    and certificates are made at start (``TestPki``) in the broker's workdir.
    """

    protocol: Literal["SASL_SSL", "SSL"] = "SASL_SSL"
    mutual_tls: bool = False
    users: Mapping[str, str] = field(default_factory=lambda: {"moderator": secrets.token_urlsafe(16)})
    mechanism: Literal["SCRAM-SHA-512"] = "SCRAM-SHA-512"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL")


class LocalKafka:
    """Single-node KRaft Kafka broker+controller on loopback, in a temp dir.

    Usage::

        with LocalKafka() as kafka:
            producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)

    Args:
        heap: JVM ``-Xmx``; default ``$MODERATOR_KAFKA_HEAP`` or ``512m``.
        startup_timeout: seconds to wait for the broker to serve metadata.
        broker_config: ``server.properties`` entries added to / overriding the defaults.
        log_level: root Log4j level (the broker log is ``<workdir>/logs/server.log``).
        libs_dir: broker jars; default ``kafka_libs_dir()``.
        java: the java executable.
        security: TLS (and SASL) on the client listener; default plaintext. Clients then
            need ``client_security()`` (kafka-python keyword arguments) or ``settings_env()``
            (``MODERATOR_KAFKA_*`` variables for a worker).

    Extra JVM flags can be passed with ``$MODERATOR_KAFKA_JVM_OPTS``.
    """

    def __init__(self, *, heap: str | None = None, startup_timeout: float = 90.0,
                 broker_config: Mapping[str, str] | None = None, log_level: str = "WARN",
                 libs_dir: Path | None = None, java: str = "java",
                 security: BrokerSecurity | None = None) -> None:
        self.heap = heap or os.environ.get("MODERATOR_KAFKA_HEAP", "512m")
        self.startup_timeout = startup_timeout
        self.broker_config = dict(broker_config or {})
        self.log_level = log_level
        self.libs_dir = libs_dir
        self.java = java
        self.security = security
        self.pki: TestPki | None = None
        self.port: int | None = None
        self.controller_port: int | None = None
        self._workdir: Workdir | None = None
        self.startup_seconds: float | None = None
        self.restart_seconds: float | None = None
        self._process: ManagedProcess | None = None

    @property
    def bootstrap_servers(self) -> str:
        if self.port is None:
            raise RuntimeError("LocalKafka is not started")
        return f"{LOOPBACK}:{self.port}"

    def client_security(self, user: str | None = None, *, password: str | None = None,
                        cafile: Path | None = None, client_cert: tuple[Path, Path] | None = None) -> dict:
        """kafka-python keyword arguments for this broker: ``user`` (default: the first of
        ``security.users``; ``"admin"``: the broker's own), its password unless ``password``
        says otherwise, the broker's CA unless ``cafile``, and with mutual TLS the client
        certificate unless ``client_cert`` (cert, key). Plaintext brokers: ``{}``."""
        sec = self.security
        if sec is None:
            return {}
        if self.pki is None:
            raise RuntimeError("LocalKafka is not started")
        kw: dict = {"security_protocol": sec.protocol, "ssl_cafile": str(cafile or self.pki.ca_cert)}
        if sec.sasl:
            user = user or next(iter(sec.users))
            known = sec.admin_password if user == "admin" else sec.users.get(user, "")
            kw.update(sasl_mechanism=sec.mechanism, sasl_plain_username=user,
                      sasl_plain_password=known if password is None else password)
        if sec.mutual_tls or client_cert:
            cert, key = client_cert or (self.pki.client_cert, self.pki.client_key)
            kw.update(ssl_certfile=str(cert), ssl_keyfile=str(key))
        return kw

    def settings_env(self, user: str | None = None, **overrides: object) -> dict[str, str]:
        """``MODERATOR_KAFKA_*`` environment variables that point a worker (or ``moderator
        produce``) at this broker, as ``client_security(user, **overrides)`` would."""
        kw = self.client_security(user, **overrides)  # type: ignore[arg-type]
        names = {"security_protocol": "KAFKA_SECURITY_PROTOCOL", "sasl_mechanism": "KAFKA_SASL_MECHANISM",
                 "sasl_plain_username": "KAFKA_SASL_USERNAME", "sasl_plain_password": "KAFKA_SASL_PASSWORD",
                 "ssl_cafile": "KAFKA_SSL_CAFILE", "ssl_certfile": "KAFKA_SSL_CERTFILE",
                 "ssl_keyfile": "KAFKA_SSL_KEYFILE"}
        env = {f"MODERATOR_{names[k]}": str(v) for k, v in kw.items()}
        env["MODERATOR_KAFKA_BOOTSTRAP_SERVERS"] = self.bootstrap_servers
        return env

    @property
    def workdir(self) -> Path | None:
        """The broker's temp dir (config, data, logs); deleted by ``stop()``."""
        return self._workdir.path if self._workdir else None

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "logs" / "server.log" if self.workdir else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def start(self) -> LocalKafka:
        if self.running:
            return self
        started = time.monotonic()
        java = require_executable(self.java, _JAVA_HINT)
        libs = self.libs_dir or kafka_libs_dir()
        self._workdir = Workdir("moderator-kafka-")
        workdir = self._workdir.path
        try:
            self.port, self.controller_port = free_ports(2)
            if self.security is not None:
                self.pki = TestPki.create(workdir / "tls")
            props = workdir / "server.properties"  # holds the broker's own SASL password: owner only
            props.touch(mode=0o600)
            props.write_text(_render_properties(self._config()))
            self._format_storage(java, libs, props)
            self._process = ManagedProcess(
                [java, *self._jvm_flags(), "-cp", f"{libs}/*", "kafka.Kafka", str(props)],
                log_path=workdir / "stdout.log", cwd=workdir)
            self._process.start()
            self._wait_ready(self._process, self.port)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would; its data, ports and config stay for ``restart()``."""
        if self._process is None:
            raise RuntimeError("LocalKafka is not started")
        self._process.kill()

    def restart(self) -> LocalKafka:
        """Start the broker again on the same data and ports (after ``kill()``); returns once it
        serves metadata. ``restart_seconds`` says how long that took."""
        if self._process is None or self._workdir is None or self.port is None:
            raise RuntimeError("LocalKafka is not started")
        if self._process.running:
            return self
        started = time.monotonic()
        self._process.start()
        self._wait_ready(self._process, self.port)
        self.restart_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Terminate the broker (SIGKILL after 20s) and delete its data."""
        if self._process is not None:
            self._process.stop(timeout=20)
            self._process = None
        if self._workdir is not None:
            self._workdir.remove()
            self._workdir = None

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _config(self) -> dict[str, str]:
        assert self.workdir is not None
        broker, controller = f"{LOOPBACK}:{self.port}", f"{LOOPBACK}:{self.controller_port}"
        config = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # Dynamic quorum (KIP-853), the Kafka 4.x default; goes with `format --standalone`.
            "controller.quorum.bootstrap.servers": controller,
            "listeners": f"PLAINTEXT://{broker},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{broker},CONTROLLER://{controller}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.workdir / "data"),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            # One partition instead of 50: the first consumer group on a fresh
            # broker would otherwise wait for 50 log creations.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        if self.security is not None:
            config.update(self._security_config(broker, controller))
        config.update(self.broker_config)
        return config

    def _security_config(self, broker: str, controller: str) -> dict[str, str]:
        sec, pki = self.security, self.pki
        assert sec is not None and pki is not None
        name = sec.protocol  # the listener is named after its protocol
        config = {
            "listeners": f"{name}://{broker},CONTROLLER://{controller}",
            "advertised.listeners": f"{name}://{broker},CONTROLLER://{controller}",
            "inter.broker.listener.name": name,
            "listener.security.protocol.map": f"CONTROLLER:PLAINTEXT,{name}:{name}",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(pki.server_keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(pki.ca_cert),
            # a SASL_SSL listener ignores the unprefixed setting (KIP-684)
            f"listener.name.{name.lower()}.ssl.client.auth": "required" if sec.mutual_tls else "none",
        }
        if sec.sasl:
            prefix = f"listener.name.{name.lower()}.{sec.mechanism.lower()}"
            config.update({
                "sasl.enabled.mechanisms": sec.mechanism,
                "sasl.mechanism.inter.broker.protocol": sec.mechanism,
                f"{prefix}.sasl.jaas.config": (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required "
                    f'username="admin" password="{sec.admin_password}";'),
            })
        return config

    def _scram_flags(self) -> list[str]:
        sec = self.security
        if sec is None or not sec.sasl:
            return []
        users = {"admin": sec.admin_password, **sec.users}
        flags = []
        for user, password in users.items():
            if any(c in user + password for c in '"\\,[]='):
                raise ValueError(f"SCRAM user {user!r}: names and passwords here avoid quotes, "
                                 "backslashes, commas, brackets and '='")
            flags += ["--add-scram", f'{sec.mechanism}=[name="{user}",password="{password}"]']
        return flags

    def _log_flags(self) -> list[str]:
        assert self.workdir is not None
        flags = [f"-Dkafka.logs.dir={self.workdir / 'logs'}", f"-Dkafka.log.level={self.log_level}"]
        config = _log4j_config()
        if config is not None:
            flags.append(f"-Dlog4j2.configurationFile={config}")
        return flags

    def _jvm_flags(self) -> list[str]:
        return [
            "-Xms128m", f"-Xmx{self.heap}",
            # Throwaway broker on a small box: start fast, stay small.
            "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            *self._log_flags(),
            *shlex.split(os.environ.get("MODERATOR_KAFKA_JVM_OPTS", "")),
        ]

    def _format_storage(self, java: str, libs: Path, props: Path) -> None:
        cmd = [java, "-Xmx256m", "-XX:TieredStopAtLevel=1", *self._log_flags(), "-cp", f"{libs}/*",
               "kafka.tools.StorageTool", "format", "--standalone",
               "-t", new_cluster_id(), "-c", str(props), *self._scram_flags()]
        try:
            result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise ServiceStartError(f"Formatting Kafka storage timed out.\n{_last_lines(exc.output)}") from None
        if result.returncode != 0:
            raise ServiceStartError(
                f"Formatting Kafka storage failed (exit {result.returncode}).\n"
                f"$ {shlex.join(_redact_scram(cmd))}\n{_last_lines(result.stdout)}")

    def _wait_ready(self, process: ManagedProcess, port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout

        def died() -> bool:
            return not process.running

        up = wait_until(lambda: port_open(port), timeout=self.startup_timeout,
                        interval=0.1, abort=died)
        while up and not died() and time.monotonic() < deadline:
            if kafka_ready(self.bootstrap_servers, timeout_s=min(5.0, max(1.0, deadline - time.monotonic())),
                           security=self.client_security("admin")):
                return
            time.sleep(0.2)
        if died():
            what = f"Kafka broker exited with code {process.returncode} during startup."
        else:
            what = f"Kafka broker did not become ready within {self.startup_timeout:.0f}s."
        raise ServiceStartError(f"{what}\n{self._diagnostics()}")

    def _diagnostics(self) -> str:
        assert self.workdir is not None
        server_log, stdout_log = self.workdir / "logs" / "server.log", self.workdir / "stdout.log"
        return (f"--- {server_log} (tail) ---\n{tail(server_log)}\n"
                f"--- {stdout_log} (tail) ---\n{tail(stdout_log)}")


def _redact_scram(cmd: list[str]) -> list[str]:
    return [re.sub(r'password="[^"]*"', 'password="***"', part) for part in cmd]


def _render_properties(config: Mapping[str, str]) -> str:
    # Backslashes are the one .properties escape our values can contain (paths).
    return "".join(f"{key}={str(value).replace(chr(92), chr(92) * 2)}\n" for key, value in config.items())
