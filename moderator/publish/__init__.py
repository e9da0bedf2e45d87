"""Publish stage: decisions and dead letters out, acknowledged before anything commits.

``DecisionPublisher`` owns one idempotent producer (``acks=all``): a retried send
never duplicates a record, and ``acks=all`` means "on every in-sync replica".
Every record is keyed by event id (so one event's records share a partition) and
carries the model and policy versions in headers. A decision goes to
``decisions``; a ``flag`` is copied to ``flagged`` and an ``escalate`` to
``review``. Callers get one callback per *input*, once all its records are
acknowledged -- the worker commits that input's offset only then.

``ShadowPublisher`` sends a shadow policy's decisions to ``shadow-decisions`` on its own
producer and thread: nothing waits for them, and no trouble on that topic (missing,
refused, full) can block, abort or fail the live producer.

``OutputFormat`` (``MODERATOR_DECISION_FORMAT``): ``json`` writes each record's JSON as the
value (the default, unchanged); ``cloudevents`` writes every output record -- decisions, their
``flagged``/``review`` copies, dead letters and shadow decisions -- as a CloudEvents 1.0 event
in the Kafka protocol binding, with the official SDK, ``binary`` (the attributes in ``ce_*``
headers, the value the same JSON bytes) or ``structured`` (an ``application/cloudevents+json``
envelope whose ``data`` is the record). The ``moderator-*`` headers stay in both.
Attributes: ``type`` ``moderator.decision.v1`` / ``moderator.decision.shadow.v1`` /
``moderator.deadletter.v1``; ``source`` ``/moderator/<consumer group>``; ``subject`` the
input's event id; ``time`` when it was decided (failed); ``datacontenttype``
``application/json``; ``id`` a name-based UUID (v5) of type, source, the input record
(topic/partition/offset) and event id, so a replay of the input after a crash or a rebalance
repeats the id and a reader can drop the duplicate (one event copied to ``flagged`` or
``review`` keeps its id). Extensions: ``policyversion``, ``policysha256``, ``modelsha256``,
``modelarch``, ``action`` (decisions); ``reason``, ``policyversion``, ``modelsha256``
(dead letters).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Literal

from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkCloudEvent
from kafka import KafkaProducer

from moderator import metrics
from moderator.schemas import DeadLetter, DeadLetterSource, Decision, OriginalValue

log = logging.getLogger(__name__)

H_MODEL = "moderator-model-sha256"
H_MODEL_ARCH = "moderator-model-architecture"
H_POLICY_VERSION = "moderator-policy-version"
H_POLICY_SHA = "moderator-policy-sha256"
H_ACTION = "moderator-action"
H_REASON = "moderator-reason"
H_CACHED = "moderator-cached"
H_SHADOW = "moderator-shadow"


CE_DECISION = "moderator.decision.v1"
CE_SHADOW_DECISION = "moderator.decision.shadow.v1"
CE_DEAD_LETTER = "moderator.deadletter.v1"
# namespace of the name-based (v5) CloudEvents ids; fixed forever: changing it changes every id
CE_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:moderator:cloudevents")
_CE_FORMAT = JSONFormat()

DecisionFormat = Literal["json", "cloudevents"]
CloudEventsMode = Literal["binary", "structured"]


@dataclass(frozen=True)
class OutputFormat:
    """How every output record is written (see the module docstring)."""

    format: DecisionFormat = "json"
    mode: CloudEventsMode = "binary"
    source: str = "/moderator"

    @classmethod
    def from_settings(cls, s) -> "OutputFormat":
        """From ``WorkerSettings``: ``decision_format``, ``decision_cloudevents_mode``, ``consumer_group``."""
        return cls(s.decision_format, s.decision_cloudevents_mode, f"/moderator/{s.consumer_group}")

    @property
    def cloudevents(self) -> bool:
        return self.format == "cloudevents"

    def event_id(self, ce_type: str, input_record: str, event_id: str | None) -> str:
        return str(uuid.uuid5(CE_ID_NAMESPACE, f"{ce_type}\n{self.source}\n{input_record}\n{event_id or ''}"))

    def decision(self, d: Decision, ce_type: str, value: bytes,
                 headers: list[tuple[str, bytes]]) -> tuple[bytes, list[tuple[str, bytes]]]:
        # a decision the worker did not bind to its input (another caller): named by what decided it
        record = d.input_record or f"decision:{d.policy_sha256}:{d.model_sha256}:{d.image_sha256}"
        return self._encode(ce_type, self.event_id(ce_type, record, d.event_id), d.event_id, d.decided_at,
                            {"policyversion": d.policy_version, "policysha256": d.policy_sha256,
                             "modelsha256": d.model_sha256, "modelarch": d.model_architecture, "action": d.action},
                            d, value, headers)

    def dead_letter(self, dead: DeadLetter, value: bytes,
                    headers: list[tuple[str, bytes]]) -> tuple[bytes, list[tuple[str, bytes]]]:
        src = dead.source
        return self._encode(CE_DEAD_LETTER, self.event_id(CE_DEAD_LETTER, f"{src.topic}/{src.partition}/{src.offset}",
                                                          dead.event_id),
                            dead.event_id, dead.failed_at,
                            {"reason": dead.reason, "policyversion": dead.policy_version,
                             "modelsha256": dead.model_sha256}, dead, value, headers)

    def _encode(self, ce_type: str, ce_id: str, subject: str | None, time_iso: str, extensions: dict,
                record, value: bytes, headers: list[tuple[str, bytes]]) -> tuple[bytes, list[tuple[str, bytes]]]:
        attrs = {"specversion": "1.0", "id": ce_id, "source": self.source, "type": ce_type,
                 "time": datetime.fromisoformat(time_iso), "datacontenttype": "application/json",
                 **{k: v for k, v in extensions.items() if v}}
        if subject:
            attrs["subject"] = subject
        if self.mode == "binary":  # the value stays the record's JSON bytes
            msg = ce_kafka.to_binary(SdkCloudEvent(attrs, value), _CE_FORMAT)
        else:
            msg = ce_kafka.to_structured(SdkCloudEvent(attrs, record.model_dump(mode="json")), _CE_FORMAT)
        return msg.value, [*(h for h in headers if h[0] != "content-type"), *msg.headers.items()]


@dataclass(frozen=True)
class Topics:
    decisions: str = "decisions"
    flagged: str = "flagged"
    review: str = "review"
    dead_letter: str = "dead-letter"


@dataclass(frozen=True)
class SourceRecord:
    """Where an input came from, and its bytes (for dead letters)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None


def _text_or_b64(raw: bytes) -> tuple[str, str]:
    try:
        return "utf-8", raw.decode("utf-8")
    except UnicodeDecodeError:
        return "base64", base64.b64encode(raw).decode("ascii")


def _utf8(text: str) -> str:
    """``text`` with anything UTF-8 cannot carry (a lone surrogate) escaped: a dead letter must
    always be publishable."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def build_dead_letter(src: SourceRecord, reason: str, error: str, *, event_id: str | None,
                      worker: str, max_value_bytes: int, policy_version: str | None = None,
                      model_sha256: str | None = None) -> DeadLetter:
    value = src.value or b""
    if len(value) <= max_value_bytes:
        encoding, copied = _text_or_b64(value)
    else:
        encoding, copied = None, None
    key = None
    if src.key is not None:
        enc, text = _text_or_b64(src.key)
        key = text if enc == "utf-8" else f"base64:{text}"
    return DeadLetter(
        event_id=_utf8(event_id) if event_id else event_id, reason=reason, error=_utf8(error[:2000]),
        source=DeadLetterSource(topic=src.topic, partition=src.partition, offset=src.offset,
                                timestamp_ms=src.timestamp_ms, key=key),
        original=OriginalValue(encoding=encoding, value=copied, size_bytes=len(value),
                               sha256=hashlib.sha256(value).hexdigest(),
                               pointer=f"kafka://{src.topic}/{src.partition}/{src.offset}"),
        policy_version=policy_version, model_sha256=model_sha256, worker=worker,
        failed_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    )


class _AllAcked:
    """Calls ``on_acked`` once ``n`` sends succeed, or ``on_failed`` at the first failure."""

    def __init__(self, n: int, on_acked: Callable[[], None], on_failed: Callable[[Exception], None]) -> None:
        self._left = n
        self._failed = False
        self._lock = threading.Lock()
        self._on_acked, self._on_failed = on_acked, on_failed

    def ok(self, topic: str, started: float) -> None:
        metrics.RECORDS_PUBLISHED.labels(topic=topic).inc()
        with self._lock:
            self._left -= 1
            fire = self._left == 0 and not self._failed
        if fire:
            metrics.STAGE_SECONDS.labels(stage="publish").observe(time.perf_counter() - started)
            self._on_acked()

    def fail(self, topic: str, err: Exception) -> None:
        metrics.PUBLISH_ERRORS.labels(topic=topic).inc()
        with self._lock:
            first = not self._failed
            self._failed = True
        if first:
            self._on_failed(err)


class DecisionPublisher:
    def __init__(self, bootstrap_servers: str, topics: Topics = Topics(), *, client_id: str = "moderator",
                 linger_ms: int = 5, delivery_timeout_ms: int = 120_000, max_request_size: int = 4 * 1048576,
                 security: dict | None = None, producer: KafkaProducer | None = None,
                 transactional_id: str | None = None, transaction_timeout_ms: int = 60_000,
                 output: OutputFormat = OutputFormat()) -> None:
        self.topics = topics
        self.output = output
        txn: dict = {}
        if transactional_id:  # exactly-once: a record may not outlive the transaction it belongs to
            txn = {"transactional_id": transactional_id, "transaction_timeout_ms": transaction_timeout_ms}
            delivery_timeout_ms = min(delivery_timeout_ms, transaction_timeout_ms)
        self.producer = producer or KafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id=f"{client_id}-producer",
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            delivery_timeout_ms=delivery_timeout_ms,
            request_timeout_ms=min(30_000, delivery_timeout_ms - linger_ms - 1),
            max_request_size=max_request_size,
            reconnect_backoff_max_ms=2_000,
            **txn,
            **(security or {}),
        )

    @staticmethod
    def _headers(model_sha: str, model_arch: str | None, policy_version: str, policy_sha: str,
                 extra: dict[str, str]) -> list[tuple[str, bytes]]:
        h = {"content-type": "application/json", H_MODEL: model_sha, H_POLICY_VERSION: policy_version,
             H_POLICY_SHA: policy_sha, **extra}
        if model_arch:
            h[H_MODEL_ARCH] = model_arch
        return [(k, v.encode()) for k, v in h.items() if v]

    def publish_decision(self, decision: Decision, on_acked: Callable[[], None],
                         on_failed: Callable[[Exception], None]) -> None:
        value = decision.model_dump_json().encode()
        headers = self._headers(decision.model_sha256, decision.model_architecture, decision.policy_version,
                                decision.policy_sha256,
                                {H_ACTION: decision.action, H_CACHED: "true" if decision.cached else "false"})
        if self.output.cloudevents:
            value, headers = self.output.decision(decision, CE_DECISION, value, headers)
        topics = [self.topics.decisions]
        if decision.action == "flag":
            topics.append(self.topics.flagged)
        elif decision.action == "escalate":
            topics.append(self.topics.review)
        self._send_all(topics, decision.event_id.encode(), value, headers, on_acked, on_failed)

    def publish_dead_letter(self, dead: DeadLetter, key: bytes | None, on_acked: Callable[[], None],
                            on_failed: Callable[[Exception], None]) -> None:
        headers = self._headers(dead.model_sha256 or "", None, dead.policy_version or "", "",
                                {H_REASON: dead.reason})
        value = dead.model_dump_json().encode()
        if self.output.cloudevents:
            value, headers = self.output.dead_letter(dead, value, headers)
        self._send_all([self.topics.dead_letter], key, value, headers, on_acked, on_failed)

    def _send_all(self, topics: list[str], key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
                  on_acked: Callable[[], None], on_failed: Callable[[Exception], None]) -> None:
        started = time.perf_counter()
        done = _AllAcked(len(topics), on_acked, on_failed)
        for topic in topics:
            try:
                fut = self.producer.send(topic, value=value, key=key, headers=headers)
            except Exception as e:  # buffer full past max_block_ms, producer closed, record too large
                done.fail(topic, e)
                return
            fut.add_callback(lambda _md, t=topic: done.ok(t, started))
            fut.add_errback(lambda err, t=topic: done.fail(t, err))

    def flush(self, timeout_s: float | None = None) -> None:
        self.producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self.producer.close(timeout=timeout_s)


class ShadowPublisher:
    """A shadow policy's decisions: best effort, isolated from the live path.

    The encode thread only enqueues (``submit`` never blocks: a full queue drops the record and
    counts it); a thread of its own serialises and sends on a separate, non-transactional,
    non-idempotent producer whose sends block at most ``max_block_ms``. A failed send is counted
    in ``moderator_shadow_errors_total{stage="publish"}`` and logged at most once a minute.
    """

    def __init__(self, bootstrap_servers: str, topic: str, *, client_id: str = "moderator", linger_ms: int = 5,
                 security: dict | None = None, max_queue: int = 10_000, max_block_ms: int = 2_000,
                 producer: KafkaProducer | None = None, output: OutputFormat = OutputFormat()) -> None:
        self.topic = topic
        self.output = output
        self.producer = producer or KafkaProducer(
            bootstrap_servers=bootstrap_servers, client_id=f"{client_id}-shadow", acks="all",
            enable_idempotence=False, linger_ms=linger_ms, max_block_ms=max_block_ms,
            delivery_timeout_ms=30_000, request_timeout_ms=10_000, reconnect_backoff_max_ms=2_000,
            **(security or {}))
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._run, name="shadow-publisher", daemon=True)
        self._last_log = 0.0

    def check_topic(self, timeout_s: float) -> None:
        """The topic exists (or the broker auto-creates it) and this client sees it: else a start
        error, not a stream of dropped records."""
        from moderator.errors import ModeratorError  # noqa: PLC0415

        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self.producer.partitions_for(self.topic):
                    return
            except Exception as e:  # KafkaTimeoutError while metadata is unknown
                last = e
            time.sleep(0.5)
        raise ModeratorError(f"shadow decisions topic {self.topic!r} is not available after {timeout_s:.0f}s "
                             f"({type(last).__name__ if last else 'no partitions'}): create it, or unset "
                             "MODERATOR_SHADOW_POLICY", reason="shadow_topic_unavailable")

    def start(self) -> "ShadowPublisher":
        self._thread.start()
        return self

    def submit(self, decision: Decision) -> None:
        try:
            self._queue.put_nowait(decision)
        except queue.Full:
            self._failed(RuntimeError("shadow queue full"), stage="queue_full")

    def _run(self) -> None:
        while True:
            d = self._queue.get()
            if d is None:
                return
            try:
                headers = DecisionPublisher._headers(
                    d.model_sha256, d.model_architecture, d.policy_version, d.policy_sha256,
                    {H_ACTION: d.action, H_SHADOW: "true"})
                value = d.model_dump_json().encode()
                if self.output.cloudevents:
                    value, headers = self.output.decision(d, CE_SHADOW_DECISION, value, headers)
                fut = self.producer.send(self.topic, value=value, key=d.event_id.encode(), headers=headers)
                fut.add_callback(lambda _md: metrics.RECORDS_PUBLISHED.labels(topic=self.topic).inc())
                fut.add_errback(self._failed)
            except Exception as e:  # metadata timeout, record too large, producer closed
                self._failed(e)

    def _failed(self, err: Exception, stage: str = "publish") -> None:
        metrics.SHADOW_ERRORS.labels(stage=stage).inc()
        now = time.monotonic()
        if now - self._last_log > 60:
            self._last_log = now
            log.warning("shadow decision not published (%s: %s); live decisions are unaffected "
                        "(moderator_shadow_errors_total counts them)", type(err).__name__, err)

    def close(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(None, timeout=max(0.1, timeout_s / 2))
        except queue.Full:
            pass
        if self._thread.is_alive():
            self._thread.join(max(0.1, deadline - time.monotonic()))
        try:
            self.producer.close(timeout=max(0.5, deadline - time.monotonic()))
        except Exception as e:
            log.warning("shadow producer close: %s", e)


__all__ = ["CE_DEAD_LETTER", "CE_DECISION", "CE_SHADOW_DECISION", "DecisionPublisher", "OutputFormat",
           "ShadowPublisher", "SourceRecord", "Topics", "build_dead_letter"]
