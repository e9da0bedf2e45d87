"""``moderator produce``: input events onto a topic, for the demo, the tests and benchmarks.

Sources: a directory of images, or synthetic demo images (coloured shapes drawn
by ``moderator.model.synth``, whose class is known, so what the worker decides
can be checked per event id). Events go out, at a given rate or as fast as
possible with ``created_at`` (or the CloudEvent ``time``) stamped at send time, in
one of the envelopes the worker reads (``ENVELOPES``):

- ``json``: an ``InputEvent``;
- ``cloudevents``: CloudEvents structured mode, ``data`` the ``InputEvent``;
- ``cloudevents-base64``: structured mode, ``data_base64`` the image bytes (``datacontenttype: image/*``);
- ``cloudevents-binary``: binary mode (``ce_*`` headers), the value the ``InputEvent`` as JSON without
  its id (the CloudEvent's ``id`` names it);
- ``cloudevents-binary-image``: binary mode, the value the image bytes (``content-type: image/*``);
- ``raw``: the image bytes, the event id as the record key.

CloudEvents are written by the official SDK (``cloudevents.core.bindings.kafka``). ``malformed_events()`` is a catalogue of
bad inputs, each with the dead-letter reason it must get.

A tool, not part of the worker: it may import the offline model package
(pure Pillow + numpy for the synthetic images).
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

Envelope = Literal["json", "cloudevents", "cloudevents-base64", "cloudevents-binary", "cloudevents-binary-image",
                   "raw"]
ENVELOPES: tuple[str, ...] = Envelope.__args__  # type: ignore[attr-defined]
CE_SOURCE = "urn:moderator:produce"
CE_TYPE = "com.example.image.uploaded"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
_CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
                  "BMP": "image/bmp", "TIFF": "image/tiff"}


@dataclass
class OutgoingEvent:
    """One record to send. ``expect`` is what the test or demo expects back:
    a class label (``"red star"``), ``"file:<name>"``, or ``"dead_letter:<reason>"``."""

    id: str | None
    expect: str
    envelope: Envelope = "json"
    image: bytes | None = None
    url: str | None = None
    content_type: str | None = None
    metadata: dict | None = None
    raw_value: bytes | None = None  # sent as is (malformed events)
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    def record(self, now: float | None = None) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
        """(key, value, headers) with ``created_at`` = now."""
        created = datetime.fromtimestamp(now or time.time(), timezone.utc).isoformat(timespec="milliseconds")
        key = self.key if self.key is not None else (self.id.encode() if self.id else None)
        if self.raw_value is not None:
            return key, self.raw_value, list(self.headers)
        if self.envelope == "raw":
            ctype = self.content_type or "image/png"
            return key, self.image, [("content-type", ctype.encode()), *self.headers]
        if self.envelope.startswith("cloudevents"):
            return self._cloudevent(key, created)
        value = event_dict(self.id, image=self.image, url=self.url, content_type=self.content_type,
                           metadata=self.metadata, created_at=created)
        return key, json.dumps(value).encode(), list(self.headers)

    def _cloudevent(self, key: bytes | None, created: str) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
        """The event through the CloudEvents SDK, in the envelope's mode."""
        image_ctype = self.content_type or "image/png"
        attrs = {"specversion": "1.0", "id": self.id or str(uuid.uuid4()), "source": CE_SOURCE, "type": CE_TYPE,
                 "time": datetime.fromisoformat(created)}
        if self.envelope in ("cloudevents-base64", "cloudevents-binary-image"):
            if self.image is None:
                raise ValueError(f"envelope {self.envelope} carries image bytes, not a URL")
            event = CloudEvent({**attrs, "datacontenttype": image_ctype}, self.image)
        else:  # the input event as JSON; binary mode leaves its id to the CloudEvent's
            data = event_dict(self.id if self.envelope == "cloudevents" else None, image=self.image, url=self.url,
                              content_type=self.content_type, metadata=self.metadata)
            if data["id"] is None:
                del data["id"]
            event = CloudEvent({**attrs, "datacontenttype": "application/json"}, data)
        write = ce_kafka.to_binary if self.envelope.startswith("cloudevents-binary") else ce_kafka.to_structured
        msg = write(event, JSONFormat())
        return key, msg.value, [*msg.headers.items(), *self.headers]


def event_dict(event_id: str | None, *, image: bytes | None = None, url: str | None = None,
               content_type: str | None = None, metadata: dict | None = None,
               created_at: str | None = None) -> dict:
    """An ``InputEvent`` as a JSON-ready dict (see ``moderator.schemas.InputEvent``)."""
    src = {"url": url} if url is not None else {"data": base64.b64encode(image or b"").decode("ascii")}
    out: dict = {"id": event_id, "image": src}
    if content_type:
        out["content_type"] = content_type
    if metadata is not None:
        out["metadata"] = metadata
    if created_at:
        out["created_at"] = created_at
    return out


def cloudevent_dict(ce_id: str, data: dict, *, time_iso: str | None = None,
                    source: str = "urn:moderator:produce", type_: str = "com.example.image.uploaded") -> dict:
    """A CloudEvents 1.0 structured-mode envelope around an input event."""
    out = {"specversion": "1.0", "id": ce_id, "source": source, "type": type_,
           "datacontenttype": "application/json", "data": data}
    if time_iso:
        out["time"] = time_iso
    return out


def encode_image(img, fmt: str = "PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_args)
    return buf.getvalue()


# --- sources ------------------------------------------------------------------------


def synthetic_events(n: int, seed: int = 0, *, size: int = 96, fmt: str = "PNG",
                     envelopes: Sequence[Envelope] = ("json",), duplicate_rate: float = 0.0,
                     classes: Sequence[str] | None = None, id_prefix: str = "synth") -> Iterator[OutgoingEvent]:
    """``n`` events of synthetic shapes with known labels, drawn deterministically from ``seed``.

    ``duplicate_rate`` re-sends an earlier image under a new id (content-hash cache hits).
    Envelopes cycle through ``envelopes``.
    """
    from moderator.model import synth  # noqa: PLC0415 (pure Pillow + numpy)

    _check_envelopes(envelopes)
    names = list(classes or synth.class_names())
    rng = np.random.default_rng([seed, 3_000_017])
    seen: list[tuple[bytes, str]] = []
    for i in range(n):
        if seen and rng.random() < duplicate_rate:
            data, label = seen[int(rng.integers(len(seen)))]
        else:
            label = names[int(rng.integers(len(names)))]
            colour, shape = label.split(" ", 1)
            data = encode_image(synth.draw_sample(rng, size, colour, shape).image, fmt)
            seen.append((data, label))
        yield OutgoingEvent(id=f"{id_prefix}-{seed}-{i:06d}", expect=label, envelope=envelopes[i % len(envelopes)],
                            image=data, content_type=_CONTENT_TYPES.get(fmt.upper()),
                            metadata={"source": "synthetic", "label": label})


def directory_events(path: Path | str, *, envelopes: Sequence[Envelope] = ("json",),
                     id_prefix: str = "file") -> Iterator[OutgoingEvent]:
    """One event per image file under ``path`` (recursive, sorted)."""
    _check_envelopes(envelopes)
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for i, p in enumerate(files):
        envelope = envelopes[i % len(envelopes)]
        # a CloudEvent of the image bytes names their type (the worker sniffs the format either way)
        ctype = mimetypes.guess_type(p.name)[0] if envelope in ("cloudevents-base64", "cloudevents-binary-image") \
            else None
        yield OutgoingEvent(id=f"{id_prefix}-{i:06d}-{p.stem}"[:200], expect=f"file:{p.name}",
                            envelope=envelope, image=p.read_bytes(), content_type=ctype,
                            metadata={"path": str(p)})


def _check_envelopes(envelopes: Sequence[str]) -> None:
    unknown = [e for e in envelopes if e not in ENVELOPES]
    if unknown or not envelopes:
        raise ValueError(f"unknown envelope(s) {unknown}: choose from {', '.join(ENVELOPES)}")


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's signature)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def malformed_events(id_prefix: str = "bad", seed: int = 0) -> list[OutgoingEvent]:
    """A catalogue of bad inputs for the demo: each must land on the dead-letter topic
    with the reason in its ``expect``. (The tests have a longer table.)"""
    from PIL import Image  # noqa: PLC0415

    good_png = encode_image(Image.new("RGB", (32, 32), (200, 30, 30)))
    jpeg = encode_image(Image.new("RGB", (64, 64), (30, 30, 200)), "JPEG", quality=90)
    p = f"{id_prefix}-{seed}"

    def ev(n: str, reason: str, **kw) -> OutgoingEvent:
        return OutgoingEvent(id=kw.pop("id", f"{p}-{n}"), expect=f"dead_letter:{reason}", **kw)

    return [
        ev("json", "malformed_json", raw_value=b'{"id": "x", "image": '),
        ev("array", "invalid_event", raw_value=b"[1, 2, 3]"),
        ev("noid", "missing_id", raw_value=json.dumps({"image": {"data": "AAAA"}}).encode(), key=b""),
        ev("both", "invalid_image_source", raw_value=json.dumps(
            {"id": f"{p}-both", "image": {"url": "https://example.com/a.png", "data": "AAAA"}}).encode()),
        ev("neither", "invalid_image_source", raw_value=json.dumps({"id": f"{p}-neither", "image": {}}).encode()),
        ev("b64", "invalid_base64", raw_value=json.dumps(
            {"id": f"{p}-b64", "image": {"data": "not base64!!"}}).encode()),
        ev("empty", "empty_image", image=b""),
        ev("text", "not_an_image", image=b"I am a text file, not a picture.\n" * 4),
        ev("truncated", "truncated_image", image=jpeg[: len(jpeg) // 2]),
        ev("bomb", "decompression_bomb", image=png_header_only(50_000, 50_000)),
        ev("metadata-url", "url_address_blocked", url="http://169.254.169.254/latest/meta-data/"),
        ev("private-url", "url_address_blocked", url="http://10.0.0.1/cat.png"),
        ev("ftp-url", "url_scheme_not_allowed", url="ftp://example.com/cat.png"),
        ev("ce03", "unsupported_envelope", raw_value=json.dumps(
            {"specversion": "0.3", "id": f"{p}-ce03", "source": "x", "type": "y",
             "data": event_dict(f"{p}-ce03", image=good_png)}).encode()),
        ev("rawnokey", "missing_id", id=None, image=good_png, envelope="raw", key=b""),
    ]


def interleave(good: Iterable[OutgoingEvent], bad: Sequence[OutgoingEvent], every: int) -> Iterator[OutgoingEvent]:
    """``good`` with one of ``bad`` after every ``every`` good events (leftovers at the end)."""
    bad_iter = iter(bad)
    for i, e in enumerate(good, 1):
        yield e
        if every > 0 and i % every == 0:
            b = next(bad_iter, None)
            if b is not None:
                yield b
    yield from bad_iter


# --- sending ----------------------------------------------------------------------------


@dataclass
class ProduceReport:
    sent: int
    seconds: float
    expected: dict[str, str]  # event id (or key, or "#<n>" when neither) -> expect
    bytes: int = 0
    sent_at: dict[str, float] = field(default_factory=dict)  # same keys -> unix time of send
    started_at: float = 0.0
    client: str = "kafka-python"  # CLIENTS

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else float("inf")


Client = Literal["kafka-python", "librdkafka"]
CLIENTS: tuple[str, ...] = Client.__args__  # type: ignore[attr-defined]
_SEND_BLOCK_S = 60.0  # a send waits at most this long for room (kafka-python's max_block_ms)


def require_confluent_kafka():
    """The ``confluent_kafka`` module, or ``MissingDependency`` saying how to get it."""
    try:
        import confluent_kafka  # noqa: PLC0415
    except ImportError:
        from moderator.errors import MissingDependency  # noqa: PLC0415

        raise MissingDependency("the librdkafka client (--load-generator librdkafka) needs confluent-kafka: "
                                "pip install 'moderator[dev]' or pip install confluent-kafka") from None
    return confluent_kafka


class _KafkaPythonSender:
    """kafka-python, the worker's own client: always installed."""

    def __init__(self, bootstrap_servers: str, topic: str, security: Mapping[str, object] | None) -> None:
        from kafka import KafkaProducer  # noqa: PLC0415

        self.producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=True,
                                      linger_ms=5, max_request_size=32 * 1024 * 1024,
                                      client_id="moderator-produce", **dict(security or {}))
        self.futures: list = []
        try:
            # the topic's partitions now, not inside a paced run's first send (the constructor only connects)
            self.producer.partitions_for(topic)
        except BaseException:
            self.producer.close(timeout=10)
            raise

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: list) -> None:
        self.futures.append(self.producer.send(topic, value=value, key=key, headers=headers))

    def finish(self) -> None:
        self.producer.flush(timeout=120)
        for f in self.futures:
            f.get(timeout=60)

    def close(self) -> None:
        self.producer.close(timeout=10)


class _LibrdkafkaSender:
    """librdkafka through confluent-kafka (the ``dev`` extra): a load generator that costs about a
    quarter of kafka-python's CPU per paced event, for benchmarks on machines with few cores."""

    def __init__(self, bootstrap_servers: str, topic: str, security: Mapping[str, object] | None) -> None:
        if security:
            raise ValueError("the librdkafka client takes no TLS/SASL settings here; use kafka-python")
        ck = require_confluent_kafka()
        self.exception = ck.KafkaException
        # the same guarantees as the kafka-python producer: every record acknowledged by all replicas, once
        self.producer = ck.Producer({"bootstrap.servers": bootstrap_servers, "acks": "all",
                                     "enable.idempotence": True, "linger.ms": 5,
                                     "message.max.bytes": 32 * 1024 * 1024, "client.id": "moderator-produce",
                                     # keys to partitions as the Java client and kafka-python do
                                     "partitioner": "murmur2_random",
                                     "statistics.interval.ms": 100, "stats_cb": self._stats})
        self.errors: list = []
        # librdkafka connects, learns the topic's partitions and gets its idempotent producer id in the
        # background, holding records meanwhile: ~0.5 s when the first id request finds no connection
        # yet (measured), so a paced run would start with a burst. Wait for all three here.
        self.ready = False
        try:
            meta = self.producer.list_topics(topic, timeout=30).topics.get(topic)
            if meta is None or meta.error is not None:
                raise self.exception(f"topic {topic}: {meta.error if meta else 'not in the metadata'}")
            deadline = time.monotonic() + 30
            while not self.ready and time.monotonic() < deadline:
                self.producer.poll(0.05)
            if not self.ready:
                raise self.exception("librdkafka got no idempotent producer id within 30 s")
        except BaseException:
            self.producer = None  # its threads stop with it (it holds a callback to this object)
            raise

    def _stats(self, stats: str) -> None:
        if not self.ready:  # one check per 100 ms until the producer id is assigned, then nothing
            self.ready = (json.loads(stats).get("eos") or {}).get("idemp_state") == "Assigned"

    def _delivered(self, err, _msg) -> None:
        if err is not None:
            self.errors.append(err)

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: list) -> None:
        deadline = time.monotonic() + _SEND_BLOCK_S
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers or None,
                                      on_delivery=self._delivered)
                break
            except BufferError:  # its local queue is full: serve delivery reports until there is room
                if self.errors:
                    raise self.exception(self.errors[0]) from None
                if time.monotonic() > deadline:
                    raise self.exception(f"no room in the producer's queue for {_SEND_BLOCK_S:.0f} s") from None
                self.producer.poll(0.1)
        self.producer.poll(0)  # delivery callbacks run here

    def finish(self) -> None:
        left = self.producer.flush(120)
        if self.errors:
            raise self.exception(self.errors[0])
        if left:
            raise self.exception(f"{left} records not acknowledged within 120 s")

    def close(self) -> None:
        # the producer and its threads go with its last reference; its callbacks point back here, so
        # drop it rather than wait for the cycle collector (its close() can block while records are queued)
        try:
            self.producer.flush(10)
        finally:
            self.producer = None


def produce(bootstrap_servers: str, topic: str, events: Iterable[OutgoingEvent], *,
            rate: float | None = None, partition_by_key: bool = True,
            security: Mapping[str, object] | None = None, client: Client = "kafka-python",
            on_ready: Callable[[], None] | None = None) -> ProduceReport:
    """Send ``events`` (``rate`` per second, or as fast as possible) and wait for every ack.

    ``security``: kafka-python keyword arguments (``KafkaClientSettings.kafka_security()``).
    ``client``: ``kafka-python`` or ``librdkafka`` (confluent-kafka; no ``security``).
    ``on_ready``: called once the client is connected, just before the first send (a benchmark's
    window starts there).
    """
    if client not in CLIENTS:
        raise ValueError(f"client is one of {', '.join(CLIENTS)}, not {client!r}")
    sender = (_KafkaPythonSender if client == "kafka-python" else _LibrdkafkaSender)(bootstrap_servers, topic, security)
    expected: dict[str, str] = {}
    sent_at: dict[str, float] = {}
    sent = 0
    total_bytes = 0
    try:
        if on_ready is not None:
            on_ready()
        started_at = time.time()
        start = time.monotonic()
        for i, ev in enumerate(events):
            if rate:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            now = time.time()
            key, value, headers = ev.record(now)
            total_bytes += len(value or b"")
            sender.send(topic, key if partition_by_key else None, value, headers)
            sent += 1
            name = ev.id or (key.decode() if key else f"#{i}")
            expected[name], sent_at[name] = ev.expect, now
        sender.finish()
    finally:
        sender.close()
    return ProduceReport(sent, time.monotonic() - start, expected, total_bytes, sent_at, started_at, client)


def ensure_topics(bootstrap_servers: str, topics: dict[str, int],
                  security: Mapping[str, object] | None = None) -> None:
    """Create missing topics (name -> partitions, replication 1): demos and benchmarks."""
    from kafka import KafkaAdminClient  # noqa: PLC0415
    from kafka.errors import TopicAlreadyExistsError  # noqa: PLC0415

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="moderator-admin",
                             **dict(security or {}))
    try:
        existing = set(admin.list_topics())
        missing = {n: {"num_partitions": p, "replication_factor": 1} for n, p in topics.items() if n not in existing}
        if missing:
            try:
                admin.create_topics(missing, wait_for_metadata=True)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
