"""Worker settings (``moderator run``): environment variables ``MODERATOR_*``.

One pydantic-settings model, so validation, defaults and the README's
configuration reference come from one place. Every field has a description and
a default; list fields take comma-separated values (or a JSON list) in the
environment: ``MODERATOR_FETCH_ALLOW_NETWORKS=10.20.0.0/16,192.168.7.0/24``.
The CLI overrides a few of them from flags.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split(v: object) -> object:
    if isinstance(v, str):
        v = v.strip()
        if v.startswith("["):
            return json.loads(v)
        return [part.strip() for part in v.split(",") if part.strip()]
    return v


CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split)]


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class KafkaClientSettings(BaseSettings):
    """Where Kafka is and how to log in: shared by the worker and ``moderator produce``."""

    # hide_input_in_errors: a validation error would otherwise print every value, passwords included
    model_config = SettingsConfigDict(env_prefix="MODERATOR_", extra="ignore", validate_default=True,
                                      hide_input_in_errors=True)

    kafka_bootstrap_servers: str = Field(default="localhost:9092", description="Kafka bootstrap servers")
    kafka_security_protocol: str = Field(
        default="PLAINTEXT", pattern="^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$",
        description="Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    kafka_sasl_mechanism: str = Field(
        default="PLAIN", pattern="^(PLAIN|SCRAM-SHA-256|SCRAM-SHA-512)$",
        description="SASL mechanism when the protocol is SASL_*")
    kafka_sasl_username: str = Field(default="", description="SASL user name (from a Secret)")
    kafka_sasl_password: SecretStr = Field(default=SecretStr(""), description="SASL password (from a Secret)")
    kafka_ssl_cafile: str = Field(default="", description="CA bundle that signs the brokers' certificates")
    kafka_ssl_certfile: str = Field(default="", description="client certificate for mutual TLS")
    kafka_ssl_keyfile: str = Field(default="", description="client private key for mutual TLS")
    kafka_startup_timeout_s: float = Field(
        default=30.0, gt=0,
        description="at start, how long to wait for a broker to answer; a refused login or an untrusted "
                    "certificate fails at the first attempt (about 5 s) with a message naming the setting")

    @model_validator(mode="after")
    def _kafka_security_complete(self) -> "KafkaClientSettings":
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_username:
            raise ValueError(f"kafka_security_protocol={self.kafka_security_protocol} needs kafka_sasl_username")
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ValueError("kafka_ssl_certfile and kafka_ssl_keyfile go together (mutual TLS)")
        return self

    def kafka_security(self) -> dict:
        """kafka-python keyword arguments for the configured security protocol (both clients)."""
        p = self.kafka_security_protocol
        kw: dict = {"security_protocol": p}
        if p.startswith("SASL"):
            kw.update(sasl_mechanism=self.kafka_sasl_mechanism, sasl_plain_username=self.kafka_sasl_username,
                      sasl_plain_password=self.kafka_sasl_password.get_secret_value())
        if p.endswith("SSL"):
            for key, value in (("ssl_cafile", self.kafka_ssl_cafile), ("ssl_certfile", self.kafka_ssl_certfile),
                               ("ssl_keyfile", self.kafka_ssl_keyfile)):
                if value:
                    kw[key] = value
        return kw


class RedisClientSettings(BaseSettings):
    """Where Redis is and how to log in: the worker's caches and ``moderator classify``."""

    # hide_input_in_errors: a validation error would otherwise print every value, passwords included
    model_config = SettingsConfigDict(env_prefix="MODERATOR_", extra="ignore", validate_default=True,
                                      hide_input_in_errors=True)

    redis_url: str | None = Field(
        default=None, description="Redis for the image-embedding cache and policy embeddings; unset: no Redis")
    redis_username: str = Field(
        default="", description="Redis ACL user (Redis 6+); empty: the one in the URL, else `default`")
    redis_password: SecretStr = Field(
        default=SecretStr(""), description="Redis password (from a Secret); any characters, unlike one in the "
                                           "URL; empty: the one in the URL, if any")
    redis_ssl_ca_file: str = Field(
        default="", description="with a rediss:// URL: CA bundle that signs the server's certificate "
                                "(empty: the system's)")
    redis_ssl_certfile: str = Field(default="", description="with rediss://: client certificate, if Redis asks "
                                                            "for one (tls-auth-clients)")
    redis_ssl_keyfile: str = Field(default="", description="with rediss://: the client certificate's key")

    @model_validator(mode="after")
    def _redis_complete(self) -> "RedisClientSettings":
        tls = (self.redis_ssl_ca_file, self.redis_ssl_certfile, self.redis_ssl_keyfile)
        if any(tls) and not (self.redis_url or "").startswith("rediss://"):
            raise ValueError("redis_ssl_* settings need a rediss:// redis_url (TLS)")
        if bool(self.redis_ssl_certfile) != bool(self.redis_ssl_keyfile):
            raise ValueError("redis_ssl_certfile and redis_ssl_keyfile go together")
        if self.redis_url and self.redis_password.get_secret_value():
            from urllib.parse import urlsplit  # noqa: PLC0415

            if urlsplit(self.redis_url).password:
                raise ValueError("a password in redis_url and redis_password: give it in one place")
        if self.redis_url and self.redis_username:
            from urllib.parse import urlsplit  # noqa: PLC0415

            if urlsplit(self.redis_url).username:
                raise ValueError("a user name in redis_url and redis_username: give it in one place")
        return self

    def redis_options(self) -> dict:
        """redis-py keyword arguments beyond the URL: user, password, TLS files."""
        kw: dict = {}
        if self.redis_username:
            kw["username"] = self.redis_username
        if self.redis_password.get_secret_value():
            kw["password"] = self.redis_password.get_secret_value()
        for key, value in (("ssl_ca_certs", self.redis_ssl_ca_file), ("ssl_certfile", self.redis_ssl_certfile),
                           ("ssl_keyfile", self.redis_ssl_keyfile)):
            if value:
                kw[key] = value
        return kw


def available_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class WorkerSettings(KafkaClientSettings, RedisClientSettings):
    """Everything ``moderator run`` can be told."""

    # hide_input_in_errors: a validation error would otherwise print every value, passwords included
    model_config = SettingsConfigDict(env_prefix="MODERATOR_", extra="ignore", validate_default=True,
                                      hide_input_in_errors=True)

    # --- model and policy -------------------------------------------------------
    model_dir: Path = Field(default=Path("/srv/moderator/model"),
                            description="exported model directory (ONNX encoders + manifest)")
    policy: Path = Field(default=Path("/etc/moderator/policy.yaml"), description="policy YAML file")
    policy_reload_interval_s: float = Field(
        default=2.0, ge=0, description="how often to check the policy file for a new version; 0 disables")
    shadow_policy: Path | None = Field(
        default=None, description="a second policy that decides every image too, on the same embedding; its "
                                  "decisions go to the shadow decisions topic only (reloaded like the policy)")

    # --- worker processes ----------------------------------------------------------------
    processes: int = Field(
        default=1, ge=1, le=64,
        description="worker processes in this container, each its own consumer-group member, encoder (and "
                    "CUDA context) and GIL, behind one /metrics /healthz /readyz port; a process that dies "
                    "is restarted. More than 1 lets one pod use many cores or feed one GPU (one process's "
                    "Python stops near 1,000 decisions/s)")

    # --- image encoder -----------------------------------------------------------------
    encoder_backend: Literal["onnx", "torch"] = Field(
        default="onnx", description="image encoder runtime: onnx (ONNX Runtime; the default image has no torch) "
                                    "or torch (needs moderator[train]; fp16 + CUDA graphs on a GPU)")
    ort_providers: CommaList = Field(
        default=[], description="ONNX Runtime execution providers in order, comma-separated; "
                                "empty: the best this build offers")
    ort_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime intra-op threads; 0: runtime default. With processes > 1 "
                                     "this is the pod's total: each worker process gets its share (at least 1)")
    ort_spin_wait: bool = Field(
        default=False, description="let ONNX Runtime's threads busy-wait between batches (faster alone, but "
                                   "it takes CPU from decoding and Kafka in the worker)")
    ort_io_binding: bool = Field(
        default=True, description="on the CUDA/TensorRT providers, bind inputs and outputs to the device "
                                  "(one copy each way per batch)")
    ort_trt_fp16: bool = Field(default=True, description="TensorRT provider: build fp16 engines")
    ort_trt_engine_cache_dir: str = Field(
        default="", description="TensorRT provider: directory for built engines (minutes to build; mount a "
                                "volume); empty: rebuild at every start")
    gpu_device_id: int = Field(default=0, ge=0, description="CUDA device for the GPU providers and torch")
    torch_device: str = Field(
        default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="torch backend device: auto (cuda when available), cpu, cuda or cuda:N")
    torch_fp16: bool = Field(default=True, description="torch backend on CUDA: fp16 weights and activations")
    torch_cuda_graphs: bool = Field(
        default=True, description="torch backend on CUDA: replay one CUDA graph per batch-size bucket")
    gpu_decode: bool = Field(
        default=True, description="torch backend on CUDA: decode JPEGs in batches with nvJPEG and resize on "
                                  "the GPU; other formats and any failure take the CPU path")
    jpeg_draft: bool = Field(
        default=True, description="decode JPEGs at least 2x the model input at 1/2, 1/4 or 1/8 scale in the "
                                  "DCT domain (never below the input size); false: always full size")

    # --- Kafka ------------------------------------------------------------------------
    input_topic: str = Field(default="images", description="topic of input events")
    consumer_group: str = Field(default="moderator", description="consumer group; replicas share partitions")
    decisions_topic: str = Field(default="decisions", description="every decision")
    flagged_topic: str = Field(default="flagged", description="copies of decisions whose action is flag")
    review_topic: str = Field(default="review", description="copies of escalate decisions (human review)")
    dead_letter_topic: str = Field(default="dead-letter", description="inputs that could not be decided")
    shadow_decisions_topic: str = Field(
        default="shadow-decisions", description="the shadow policy's decisions (never acted upon, best effort)")
    decision_format: Literal["json", "cloudevents"] = Field(
        default="json",
        description="how every output record (decisions, flagged and review copies, dead letters, shadow "
                    "decisions) is written: json (the record's JSON as the value) or cloudevents (CloudEvents 1.0, "
                    "Kafka protocol binding; types moderator.decision.v1, moderator.decision.shadow.v1, "
                    "moderator.deadletter.v1; source /moderator/<consumer_group>; the data is the same JSON)")
    decision_cloudevents_mode: Literal["binary", "structured"] = Field(
        default="binary",
        description="with decision_format=cloudevents: binary (attributes in ce_* headers, the value is the JSON "
                    "record) or structured (the value is an application/cloudevents+json envelope)")
    auto_offset_reset: str = Field(
        default="earliest", pattern="^(earliest|latest)$",
        description="where a group without committed offsets starts")
    session_timeout_ms: int = Field(
        default=10_000, ge=1000,
        description="group session timeout: how soon a crashed replica's partitions move")
    heartbeat_interval_ms: int = Field(default=2_000, ge=100, description="group heartbeat interval")
    max_poll_interval_ms: int = Field(default=300_000, ge=1000, description="max time between polls")
    poll_max_records: int = Field(default=256, ge=1, description="records taken per poll")
    consumer_fetch_min_bytes: int = Field(
        default=1, ge=1, description="the broker answers a fetch once it has this many bytes for it (Kafka's "
                                     "fetch.min.bytes; 1: as soon as there is a record)...")
    consumer_fetch_max_wait_ms: int = Field(
        default=500, ge=0, le=10_000, description="...or after this long (fetch.max.wait.ms). At low rates, raising both "
                                       "(e.g. 1048576 and 25) gathers several records per fetch: less CPU "
                                       "per event, up to this much more latency")
    commit_interval_ms: int = Field(default=500, ge=10, description="how often acknowledged offsets commit")
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        default="at_least_once",
        description="at_least_once: offsets commit after the outputs are acknowledged (a crash can repeat "
                    "decisions); exactly_once: each batch's outputs and offsets commit in one Kafka transaction "
                    "(readers must use isolation.level=read_committed)")
    transactional_id: str = Field(
        default="", description="exactly_once: this replica's transactional id, unique among live replicas; "
                                "empty: moderator-<consumer_group>-<client_id>. A stable one (a StatefulSet pod "
                                "name) lets a restarted replica end its predecessor's open transaction at once")
    transaction_timeout_ms: int = Field(
        default=30_000, ge=1000, le=900_000,
        description="exactly_once: the broker aborts a transaction open this long (a crashed replica's); "
                    "read_committed readers of its partitions wait at most this long")
    delivery_timeout_ms: int = Field(
        default=120_000, ge=1000,
        description="how long the producer retries a record before the worker gives up and stops")
    linger_ms: int = Field(default=5, ge=0, description="producer batching delay")
    client_id: str = Field(default_factory=_default_worker_id,
                           description="this replica's name (Kafka client id, logs, dead letters)")
    kafka_require_native_crc32c: bool = Field(
        default=True, description="refuse to start when kafka-python would checksum records in pure Python "
                                  "(the crc32c package is missing); false: log, export a 0 and run slowly")

    # --- batching and back-pressure ------------------------------------------------------
    max_batch: int = Field(default=32, ge=1, description="a batch closes at this many images...")
    max_wait_ms: int = Field(default=50, ge=0, description="...or this long after its first image is prepared")
    adaptive_batching: bool = Field(
        default=True, description="when the encoder is idle and no other record is being prepared, the prepared "
                                  "ones go at once instead of at max_wait_ms; under load batches still fill "
                                  "to max_batch")
    prepare_workers: int = Field(
        default=8, ge=1, description="threads that fetch image URLs (they wait on the network, so more than "
                                     "the cores)")
    decode_concurrency: int = Field(
        default=0, ge=0, description="threads that parse, hash, decode and preprocess (CPU work under the GIL: "
                                     "more than the cores only contend); 0: cores - 1, at least 1, at most 4")
    gil_switch_interval_ms: float = Field(
        default=0, ge=0, le=100,
        description="Python's GIL switch interval for the worker process (sys.setswitchinterval); 0: auto, "
                    "0.5 ms when the image encoder runs on a CUDA device (its thread gives the GIL up at every "
                    "GPU call and would wait up to Python's default 5 ms for it each time while the prepare "
                    "threads parse), Python's default otherwise")
    max_in_flight: int = Field(
        default=512, ge=1,
        description="consumed but unacknowledged records; above it fetching pauses (back-pressure)")
    max_in_flight_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1,
        description="bytes of in-flight record values; above it fetching pauses too")
    revoke_wait_ms: int = Field(
        default=5_000, ge=0,
        description="on partition revoke, how long to let in-flight work finish before dropping it")
    shutdown_grace_s: float = Field(
        default=20.0, ge=0, description="on SIGTERM, how long to drain in-flight work before closing")

    # --- input limits -------------------------------------------------------------------------
    max_event_bytes: int = Field(default=16 * 1024 * 1024, ge=1, description="largest record value accepted")
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1,
                                 description="largest image (inline data after base64, or fetched)")
    max_pixels: int = Field(default=40_000_000, ge=1, description="decompression-bomb cap on width x height")
    image_formats: CommaList = Field(default=["JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"],
                                     description="formats accepted (sniffed from the bytes)")

    # --- URL fetching ---------------------------------------------------------------------------
    fetch_connect_timeout_s: float = Field(default=2.0, gt=0, description="TCP/TLS connect timeout per hop")
    fetch_read_timeout_s: float = Field(default=5.0, gt=0, description="socket read timeout")
    fetch_total_timeout_s: float = Field(
        default=10.0, gt=0, description="whole fetch: DNS, redirects, headers and body (a server dripping bytes "
                                        "within the read timeout is cut off here)")
    fetch_dns_timeout_s: float = Field(default=2.0, gt=0, description="DNS lookup of each hop's host")
    fetch_max_redirects: int = Field(default=3, ge=0, description="redirects followed (each re-checked)")
    fetch_allow_networks: CommaList = Field(
        default=[], description="CIDRs exempt from the private-address block (e.g. an internal image store)")
    fetch_allow_hosts: CommaList = Field(
        default=[], description="host names exempt from the private-address block")
    fetch_user_agent: str = Field(default="moderator/0.1 (+image moderation)", description="User-Agent header")

    # --- caches -----------------------------------------------------------------------------------
    image_embedding_cache_ttl_s: int = Field(
        default=86_400, ge=0, description="image-embedding cache TTL (keyed by model + image content, so "
                                          "policy edits keep it); 0 disables the cache")
    redis_timeout_s: float = Field(default=0.5, gt=0, description="Redis socket timeout")
    redis_retry_s: float = Field(default=2.0, ge=0, description="after a Redis failure, skip it this long")

    # --- dead letters -----------------------------------------------------------------------------
    dead_letter_max_value_bytes: int = Field(
        default=256 * 1024, ge=0,
        description="originals up to this size are copied into the dead letter; larger ones get a pointer")

    # --- observability -----------------------------------------------------------------------------
    http_host: str = Field(default="0.0.0.0", description="address of the /metrics /healthz /readyz server")
    http_port: int = Field(default=8080, ge=0, le=65535, description="its port; 0 picks a free one")
    log_level: str = Field(default="INFO", description="root log level")
    log_json: bool = Field(default=True, description="structured JSON logs (one object per line)")

    @field_validator("fetch_allow_networks")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ValueError(f"not a network: {net!r} ({e})") from e
        return v

    @field_validator("image_formats")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [f.upper() for f in v]

    @model_validator(mode="after")
    def _sane(self) -> "WorkerSettings":
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be below session_timeout_ms")
        if self.fetch_total_timeout_s < self.fetch_connect_timeout_s:
            raise ValueError("fetch_total_timeout_s must be at least fetch_connect_timeout_s")
        return self

    def decode_slots(self, cpus: int | None = None) -> int:
        """``decode_concurrency``, with 0 resolved from ``cpus`` (default: the CPUs this process may use)."""
        if self.decode_concurrency:
            return self.decode_concurrency
        return min(4, max(1, (cpus or available_cpus()) - 1))

    def resolved_transactional_id(self) -> str:
        return self.transactional_id or f"moderator-{self.consumer_group}-{self.client_id}"

    def output_topics(self) -> tuple[str, str, str, str]:
        return self.decisions_topic, self.flagged_topic, self.review_topic, self.dead_letter_topic
