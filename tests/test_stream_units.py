"""The worker's parts without a broker: event parsing, micro-batching, offset
bookkeeping, the SSRF address policy, settings, dead letters, import hygiene."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time

import pytest
from kafka.structs import TopicPartition

from moderator.batching import MicroBatcher
from moderator.config import WorkerSettings
from moderator.errors import InputError
from moderator.fetch import AddressPolicy, UrlFetcher
from moderator.ingest import EventLimits, parse_record
from moderator.publish import SourceRecord, build_dead_letter
from moderator.schemas import DeadLetter, InputEvent
from moderator.worker import OffsetTracker

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


# --- parsing -----------------------------------------------------------------------


def test_plain_json_event_round_trips():
    ev = parse_record(_json({"id": "e1", "image": {"data": base64.b64encode(PNG_1PX).decode()},
                             "metadata": {"user": 7}, "created_at": "2026-01-02T03:04:05Z"}), None, [])
    assert (ev.id, ev.envelope, ev.data, ev.url, ev.metadata) == ("e1", "json", PNG_1PX, None, {"user": 7})
    assert ev.created_at == pytest.approx(1767323045.0)


def test_cloudevents_envelope_supplies_id_and_time():
    ce = {"specversion": "1.0", "id": "ce-9", "source": "urn:x", "type": "image.uploaded",
          "time": "2026-01-02T03:04:05+00:00", "datacontenttype": "application/json", "traceparent": "00-ab",
          "data": {"image": {"url": "https://images.example/a.png"}}}
    ev = parse_record(_json(ce), None, [("content-type", b"application/cloudevents+json")])
    assert (ev.id, ev.envelope, ev.url) == ("ce-9", "cloudevents", "https://images.example/a.png")
    assert ev.created_at == pytest.approx(1767323045.0)
    ce["data"]["id"] = "inner"
    assert parse_record(_json(ce), None, []).id == "inner"


def test_raw_image_record_takes_its_id_from_the_key():
    ev = parse_record(PNG_1PX, b"raw-1", [("Content-Type", b"image/png")])
    assert (ev.id, ev.envelope, ev.data, ev.content_type) == ("raw-1", "raw", PNG_1PX, "image/png")
    # a ce_id header without ce_specversion is not a CloudEvent: a raw image named by the header
    legacy = parse_record(PNG_1PX, None, [("ce_id", b"ce-7"), ("content-type", b"image/png")])
    assert (legacy.id, legacy.envelope) == ("ce-7", "raw")


CE_HEADERS = [("ce_specversion", b"1.0"), ("ce_id", b"ce-7"), ("ce_source", b"urn:uploads"),
              ("ce_type", b"com.example.image.uploaded")]


def test_binary_cloudevent_with_json_data_takes_the_cloudevent_id_and_time():
    """Kafka protocol binding, binary mode: attributes in ce_* headers, the value is an input event
    without its own id (it was dead-lettered as missing_id before the SDK read it)."""
    body = {"image": {"data": base64.b64encode(PNG_1PX).decode()}, "metadata": {"user": 7}}
    hdrs = [*CE_HEADERS, ("ce_time", b"2026-01-02T03:04:05Z"), ("ce_traceparent", b"00-ab"),
            ("content-type", b"application/json")]
    ev = parse_record(_json(body), b"the-key", hdrs)
    assert (ev.id, ev.envelope, ev.data, ev.metadata) == ("ce-7", "cloudevents", PNG_1PX, {"user": 7})
    assert ev.created_at == pytest.approx(1767323045.0)
    url = parse_record(_json({"image": {"url": "https://images.example/a.png"}}), None, hdrs)
    assert (url.id, url.url, url.data) == ("ce-7", "https://images.example/a.png", None)
    # as in structured mode, the data's own id and created_at win; no ce_time: no latency clock
    own = parse_record(_json({**body, "id": "inner", "created_at": "2026-01-02T03:04:06Z"}), None, hdrs)
    assert (own.id, own.created_at) == ("inner", pytest.approx(1767323046.0))
    assert parse_record(_json(body), None, [*CE_HEADERS, ("content-type", b"application/json")]).created_at is None
    # no content-type: CloudEvents reads the data as JSON
    assert parse_record(_json(body), None, CE_HEADERS).id == "ce-7"


def test_binary_cloudevent_with_image_data_is_named_by_ce_id_not_the_key():
    ev = parse_record(PNG_1PX, b"partition-key", [*CE_HEADERS, ("content-type", b"image/png")])
    assert (ev.id, ev.envelope, ev.data, ev.content_type, ev.metadata) == (
        "ce-7", "cloudevents", PNG_1PX, "image/png", None)


def test_structured_cloudevent_with_data_base64():
    ce = {"specversion": "1.0", "id": "ce-b64", "source": "urn:x", "type": "t", "time": "2026-01-02T03:04:05Z",
          "datacontenttype": "image/png", "data_base64": base64.b64encode(PNG_1PX).decode()}
    ev = parse_record(_json(ce), None, [("content-type", b"application/cloudevents+json")])
    assert (ev.id, ev.envelope, ev.data, ev.content_type) == ("ce-b64", "cloudevents", PNG_1PX, "image/png")
    assert ev.created_at == pytest.approx(1767323045.0)
    inner = _json({"image": {"url": "https://images.example/b.png"}, "metadata": {"k": 1}})
    as_json = {**ce, "datacontenttype": "application/json", "data_base64": base64.b64encode(inner).decode()}
    ev = parse_record(_json(as_json), None, [])
    assert (ev.id, ev.url, ev.metadata) == ("ce-b64", "https://images.example/b.png", {"k": 1})


def test_events_written_by_the_sdk_parse_and_agree_with_its_reader():
    """What the official SDK writes (both modes, JSON and image data) parses; structured mode agrees
    with the SDK's own from_structured on every attribute."""
    from datetime import datetime, timezone

    from cloudevents.core.bindings import kafka
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent

    def make(data, ctype):
        return CloudEvent({"id": "sdk-1", "source": "/uploads", "type": "com.example.image.uploaded",
                           "time": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "datacontenttype": ctype,
                           "subject": "photo.png", "uploader": "u9"}, data)

    body = {"image": {"data": base64.b64encode(PNG_1PX).decode()}, "metadata": {"user": 7}}
    for event in (make(body, "application/json"), make(PNG_1PX, "image/png")):
        for write in (kafka.to_binary, kafka.to_structured):
            msg = write(event, JSONFormat())
            ev = parse_record(msg.value, msg.key, list(msg.headers.items()))
            assert (ev.id, ev.envelope, ev.data) == ("sdk-1", "cloudevents", PNG_1PX), (write, event)
            assert ev.created_at == pytest.approx(1767323045.0)
        msg = kafka.to_structured(event, JSONFormat())
        theirs = kafka.from_structured(msg, JSONFormat())
        assert theirs.get_attributes()["uploader"] == "u9" and theirs.get_data() == event.get_data()


@pytest.mark.parametrize("value, key, headers, reason, event_id", [
    (b"{", None, [], "malformed_json", None),
    (b"\xff\xfe\x00", b"k", [], "malformed_json", "k"),
    (None, None, [], "empty_event", None),
    (b"[]", None, [], "invalid_event", None),
    (_json({"image": {"data": "AAAA"}}), None, [], "missing_id", None),
    (_json({"id": 5, "image": {"data": "AAAA"}}), None, [], "invalid_event", None),
    (_json({"id": "a", "image": {"data": "AAAA", "url": "http://x"}}), None, [], "invalid_image_source", "a"),
    (_json({"id": "a", "image": {}}), None, [], "invalid_image_source", "a"),
    (_json({"id": "a"}), None, [], "invalid_image_source", "a"),
    (_json({"id": "a", "image": {"data": "AAAA"}, "colour": "red"}), None, [], "invalid_event", "a"),
    (_json({"id": "a", "image": {"data": "%%%"}}), None, [], "invalid_base64", "a"),
    (_json({"id": "a", "image": {"data": "A" * 4000}}), None, [], "payload_too_large", "a"),
    (b"x" * 5000, b"big", [], "payload_too_large", "big"),
    (PNG_1PX, None, [("content-type", b"image/png")], "missing_id", None),
    (_json({"specversion": "0.3", "id": "c", "source": "s", "type": "t", "data": {}}), None, [],
     "unsupported_envelope", "c"),
    (_json({"specversion": "1.0", "id": "c", "source": "s", "type": "t", "datacontenttype": "text/plain",
            "data": {}}), None, [], "unsupported_envelope", "c"),
    (_json({"specversion": "1.0", "source": "s", "type": "t", "data": {"image": {"data": "AAAA"}}}), None, [],
     "missing_id", None),
    # structured CloudEvents
    (_json({"specversion": "1.0", "id": "c", "type": "t", "data": {"image": {"data": "AAAA"}}}), None, [],
     "invalid_cloudevent", "c"),
    (_json({"specversion": "1.0", "id": "c", "source": "s", "type": "t", "trace_id": "x",
            "data": {"image": {"data": "AAAA"}}}), None, [], "invalid_cloudevent", "c"),
    (_json({"specversion": "1.0", "id": "c", "source": "s", "type": "t", "time": 1767323045,
            "data": {"image": {"data": "AAAA"}}}), None, [], "invalid_cloudevent", "c"),
    (_json({"specversion": "1.0", "id": "c", "source": "s", "type": "t", "time": "yesterday",
            "data": {"image": {"data": "AAAA"}}}), None, [], "invalid_cloudevent", "c"),
    (_json({"specversion": "1.0", "id": "c", "source": "s", "type": "t", "data": {}, "data_base64": "AAAA"}),
     None, [], "invalid_cloudevent", "c"),
    (_json({"specversion": "1.0", "id": "c", "source": "s", "type": "t", "datacontenttype": "image/png",
            "data_base64": "not base64!!"}), None, [], "invalid_base64", "c"),
    (_json({"specversion": "1.0", "id": "c", "source": "s", "type": "t", "datacontenttype": "image/png",
            "data_base64": "A" * 3000}), None, [], "payload_too_large", "c"),
    (_json({"specversion": "1.0", "id": "c", "source": "s", "type": "t", "data_base64": "W10="}), None, [],
     "invalid_event", "c"),
    (_json({"specversion": "1.0", "id": "c", "source": "s", "type": "t", "data_base64": 5}), None, [],
     "invalid_cloudevent", "c"),
    (b"\x00avro", None, [("content-type", b"application/cloudevents+avro")], "unsupported_envelope", None),
    (b"[]", b"k", [("content-type", b"application/cloudevents-batch+json")], "unsupported_envelope", "k"),
    # binary CloudEvents
    (_json({"image": {"data": "AAAA"}}), None, [("ce_specversion", b"1.0"), ("ce_source", b"s"), ("ce_type", b"t")],
     "missing_id", None),
    (_json({"image": {"data": "AAAA"}}), None, [("ce_specversion", b"1.0"), ("ce_id", b"\xff"), ("ce_source", b"s"),
                                                ("ce_type", b"t")], "missing_id", None),
    (_json({"image": {"data": "AAAA"}}), None, [("ce_specversion", b"0.3"), ("ce_id", b"b"), ("ce_source", b"s"),
                                                ("ce_type", b"t")], "unsupported_envelope", "b"),
    (_json({"image": {"data": "AAAA"}}), None, [("ce_specversion", b"1.0"), ("ce_id", b"b"), ("ce_type", b"t")],
     "invalid_cloudevent", "b"),
    (_json({"image": {"data": "AAAA"}}), None, [("ce_source", b"\xff\xfe"), *CE_HEADERS], "invalid_cloudevent",
     "ce-7"),
    (_json({"image": {"data": "AAAA"}}), None, [*CE_HEADERS, ("ce_time", b"soon")], "invalid_cloudevent", "ce-7"),
    (_json({"image": {"data": "AAAA"}}), None, [*CE_HEADERS, ("ce_Trace-Id", b"x")], "invalid_cloudevent", "ce-7"),
    (b'{"image": ', None, [*CE_HEADERS, ("content-type", b"application/json")], "malformed_json", "ce-7"),
    (b"[1]", None, [*CE_HEADERS, ("content-type", b"application/json")], "invalid_event", "ce-7"),
    (b"hello", None, [*CE_HEADERS, ("content-type", b"text/plain")], "unsupported_envelope", "ce-7"),
    (_json({"image": {"data": "%%%"}}), None, [*CE_HEADERS], "invalid_base64", "ce-7"),
    (b"\x89PNG" + bytes(3000), None, [*CE_HEADERS, ("content-type", b"image/png")], "payload_too_large", "ce-7"),
    (_json({"image": {"data": "AAAA"}, "colour": "red"}), None, CE_HEADERS, "invalid_event", "ce-7"),
])
def test_bad_events_fail_with_their_reason(value, key, headers, reason, event_id):
    with pytest.raises(InputError) as ei:
        parse_record(value, key, headers, EventLimits(max_event_bytes=4096, max_image_bytes=2048))
    assert ei.value.reason == reason, str(ei.value)
    assert getattr(ei.value, "event_id", None) == event_id


def test_every_envelope_moderator_produce_writes_parses_back_to_its_event():
    from moderator.produce import ENVELOPES, OutgoingEvent, synthetic_events

    events = list(synthetic_events(2 * len(ENVELOPES), seed=3, size=32, envelopes=ENVELOPES, id_prefix="env"))
    assert {e.envelope for e in events} == set(ENVELOPES) >= {"cloudevents-binary", "cloudevents-binary-image"}
    for e in events:
        key, value, headers = e.record(now=1767323045.0)
        ev = parse_record(value, key, headers)
        assert (ev.id, ev.envelope) == (e.id, "raw" if e.envelope == "raw" else e.envelope.split("-")[0]), e.envelope
        assert ev.data == e.image and ev.created_at == (None if e.envelope == "raw" else pytest.approx(1767323045.0))
        names = {k for k, _ in headers}
        assert ("ce_id" in names) == e.envelope.startswith("cloudevents-binary"), e.envelope
    with pytest.raises(ValueError, match="unknown envelope"):
        list(synthetic_events(1, envelopes=("cloudevents-avro",)))
    with pytest.raises(ValueError, match="image bytes"):
        OutgoingEvent(id="u", expect="x", envelope="cloudevents-binary-image", url="https://e/x.png").record()


def test_input_event_schema_is_the_documented_one():
    schema = InputEvent.model_json_schema()
    assert set(schema["required"]) == {"id", "image"}
    assert {"content_type", "metadata", "created_at"} <= set(schema["properties"])


# --- batching ----------------------------------------------------------------------


def test_batch_closes_when_full():
    b = MicroBatcher(3, max_wait_ms=10_000)
    for i in range(7):
        b.put(i)
    assert b.get_batch(timeout=1) == [0, 1, 2]
    assert b.get_batch(timeout=1) == [3, 4, 5]
    t0 = time.monotonic()
    assert b.get_batch(timeout=0.2) == []  # one item, not full, not due: nothing yet
    assert time.monotonic() - t0 >= 0.19


def test_batch_closes_max_wait_after_its_first_item():
    b = MicroBatcher(100, max_wait_ms=150)
    t0 = time.monotonic()
    b.put("a")
    threading.Timer(0.05, b.put, args=("b",)).start()
    assert b.get_batch(timeout=5) == ["a", "b"]
    waited = time.monotonic() - t0
    assert 0.14 <= waited < 1.0, waited  # the clock started at "a", not at "b"


def test_close_releases_what_waits_then_ends():
    b = MicroBatcher(100, max_wait_ms=60_000)
    b.put(1)
    b.put(2)
    b.close()
    assert b.get_batch(timeout=1) == [1, 2]
    assert b.get_batch(timeout=1) is None
    with pytest.raises(RuntimeError):
        b.put(3)


# --- offsets -----------------------------------------------------------------------


def test_commit_position_waits_for_the_slowest_earlier_record():
    tp = TopicPartition("t", 0)
    t = OffsetTracker()
    t.assign({tp})
    epochs = [t.track(tp, off, 10) for off in (5, 6, 7, 8)]
    assert t.in_flight == 4 and t.in_flight_bytes == 40
    t.done(tp, 6, epochs[1])
    t.done(tp, 7, epochs[2])
    assert t.to_commit() == {}  # 5 still pending: nothing may be committed
    t.done(tp, 5, epochs[0])
    offsets = t.to_commit()
    assert offsets[tp].offset == 8
    t.committed(offsets)
    assert t.to_commit() == {}
    t.done(tp, 8, epochs[3])
    assert t.to_commit()[tp].offset == 9
    assert t.in_flight == 0 and t.wait_drained(0.1)


def test_work_from_a_revoked_assignment_is_never_committed():
    tp = TopicPartition("t", 1)
    t = OffsetTracker()
    t.assign({tp})
    old = t.track(tp, 0)
    assert t.revoke({tp}) == 1 and t.in_flight == 0
    assert t.track(tp, 1) is None  # not ours any more
    t.assign({tp})  # back again (eager rebalance): a new epoch
    # kafka-python kept its position (past offset 0, dropped at the revoke): seek back first
    assert t.pending_rewinds() == {tp: 0} and t.track(tp, 1) is None
    t.rewound(tp, 0)
    new = t.track(tp, 0)
    assert new != old and not t.is_live(tp, old)
    assert t.done(tp, 0, old) is False
    assert t.to_commit() == {}
    assert t.done(tp, 0, new) is True and t.to_commit()[tp].offset == 1
    assert t.track(tp, 0) is None and t.in_flight == 0  # redelivered within the assignment: already done


def test_a_rewind_drops_later_work_and_waits_for_the_seek():
    """Exactly-once: a batch's transaction aborted; its partition reads again from the batch."""
    tp, other = TopicPartition("t", 0), TopicPartition("t", 1)
    t = OffsetTracker()
    t.assign({tp, other})
    epochs = {off: t.track(tp, off, 5) for off in range(10, 16)}
    t.track(other, 3, 5)
    t.rewind({tp: 10})
    assert t.in_flight == 1 and t.in_flight_bytes == 5  # the other partition's record is still pending
    assert not t.is_live(tp, epochs[14])  # later batches of it are dropped, unpublished
    assert t.pending_rewinds() == {tp: 10}
    assert t.track(tp, 16) is None  # fetched before the consumer seeked: ignored
    t.rewound(tp, 11)  # not the pending offset: still pending
    assert t.pending_rewinds() == {tp: 10}
    t.rewound(tp, 10)
    again = t.track(tp, 10)
    assert again is not None and again != epochs[10] and t.pending_rewinds() == {}
    assert t.done(tp, 10, again) and t.to_commit()[tp].offset == 11


def test_redo_points_survive_one_rebalance_only_and_never_a_loss():
    tp = TopicPartition("t", 0)
    t = OffsetTracker()
    t.assign({tp})
    e = t.track(tp, 7)
    t.track(tp, 8)
    t.done(tp, 7, e)
    t.revoke({tp})
    t.assign(set())  # it went elsewhere: forget where we were
    t.assign({tp})  # a later rebalance brings it back: kafka-python starts it from the group's commit
    assert t.pending_rewinds() == {}
    t.revoke({tp}, remember=False)  # lost (not revoked): nothing to remember either
    t.assign({tp})
    assert t.pending_rewinds() == {}


# --- SSRF address policy (no connections: vet() never connects) ------------------------------


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1/", "url_address_blocked"),
    ("http://10.1.2.3/", "url_address_blocked"),
    ("http://172.16.0.1/", "url_address_blocked"),
    ("http://192.168.0.10/", "url_address_blocked"),
    ("http://169.254.169.254/latest/meta-data/", "url_address_blocked"),
    ("http://100.100.100.200/", "url_address_blocked"),
    ("http://[fd00:ec2::254]/", "url_address_blocked"),
    ("http://[::1]/", "url_address_blocked"),
    ("http://[::ffff:10.0.0.1]/", "url_address_blocked"),
    ("http://[64:ff9b::a9fe:a9fe]/", "url_address_blocked"),  # NAT64 of 169.254.169.254
    ("http://[fe80::1]/", "url_address_blocked"),
    ("http://224.0.0.251/", "url_address_blocked"),
    ("http://0.0.0.0/", "url_address_blocked"),
    ("http://100.64.1.1/", "url_address_blocked"),
    ("http://2130706433/", "url_address_blocked"),
    ("http://localhost/", "url_address_blocked"),
    ("http://metadata.google.internal/computeMetadata/v1/", "url_address_blocked"),
    ("ftp://example.com/a.png", "url_scheme_not_allowed"),
    ("file:///etc/passwd", "url_scheme_not_allowed"),
    ("data:image/png;base64,AAAA", "url_scheme_not_allowed"),
    ("http://user:pw@example.com/a.png", "url_invalid"),
    ("http:///a.png", "url_invalid"),
    ("http://exa mple.com/", "url_invalid"),
])
def test_refused_urls_are_refused_before_any_connection(url, reason):
    def no_dns(host, port):  # only "localhost" may be looked up, and only in /etc/hosts
        assert host == "localhost", f"unexpected DNS lookup of {host}"
        return ["127.0.0.1"]

    with pytest.raises(InputError) as ei:
        UrlFetcher(resolver=no_dns).vet(url)
    assert ei.value.reason == reason, str(ei.value)


def test_every_resolved_address_must_pass_and_allow_lists_open_only_what_they_name():
    mixed = UrlFetcher(resolver=lambda h, p: ["93.184.216.34", "10.0.0.7"])
    with pytest.raises(InputError, match="10.0.0.7"):
        mixed.vet("http://images.example/a.png")
    public = UrlFetcher(resolver=lambda h, p: ["93.184.216.34"])
    assert public.vet("https://images.example:8443/a.png?x=1").address == "93.184.216.34"
    allowed = UrlFetcher(policy=AddressPolicy(["10.20.0.0/16"], ["images.internal"]),
                         resolver=lambda h, p: ["10.20.3.4"] if h == "cdn.internal" else ["192.168.1.1"])
    assert allowed.vet("http://cdn.internal/a.png").address == "10.20.3.4"
    assert allowed.vet("http://images.internal/a.png").address == "192.168.1.1"
    with pytest.raises(InputError):
        allowed.vet("http://10.21.0.1/a.png")


# --- settings, dead letters, imports --------------------------------------------------------


def test_settings_come_from_moderator_env(monkeypatch):
    monkeypatch.setenv("MODERATOR_MAX_BATCH", "7")
    monkeypatch.setenv("MODERATOR_FETCH_ALLOW_NETWORKS", "10.20.0.0/16, 192.168.7.0/24")
    monkeypatch.setenv("MODERATOR_DECISIONS_TOPIC", "out.decisions")
    s = WorkerSettings()
    assert (s.max_batch, s.decisions_topic) == (7, "out.decisions")
    assert s.fetch_allow_networks == ["10.20.0.0/16", "192.168.7.0/24"]
    for name, field in WorkerSettings.model_fields.items():
        assert field.description, f"{name} has no description (the README reference is generated from it)"
    monkeypatch.setenv("MODERATOR_FETCH_ALLOW_NETWORKS", "not-a-network")
    with pytest.raises(ValueError):
        WorkerSettings()


def test_dead_letter_copies_small_originals_and_points_at_large_ones():
    small = build_dead_letter(SourceRecord("in", 2, 41, 1700000000000, b"k1", b'{"id": "x"'), "malformed_json",
                              "value is not JSON", event_id=None, worker="w1", max_value_bytes=100)
    assert small.original.encoding == "utf-8" and small.original.value == '{"id": "x"'
    assert small.source.key == "k1" and small.original.pointer == "kafka://in/2/41"
    binary = build_dead_letter(SourceRecord("in", 0, 1, None, None, b"\xff\xd8\xff"), "truncated_image", "t",
                               event_id="e", worker="w1", max_value_bytes=100)
    assert binary.original.encoding == "base64" and base64.b64decode(binary.original.value) == b"\xff\xd8\xff"
    large = build_dead_letter(SourceRecord("in", 0, 9, None, None, b"x" * 1000), "payload_too_large", "big",
                              event_id="e", worker="w1", max_value_bytes=100)
    assert large.original.value is None and large.original.size_bytes == 1000
    assert DeadLetter.model_validate_json(large.model_dump_json()) == large


def test_worker_path_never_imports_torch():
    code = ("import sys, moderator.worker, moderator.worker.bench, moderator.cli, moderator.produce; "
            "sys.exit(1 if {'torch', 'open_clip'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_kafka_security_settings_reach_the_clients(monkeypatch):
    from pydantic import ValidationError

    from moderator.config import WorkerSettings

    assert WorkerSettings().kafka_security() == {"security_protocol": "PLAINTEXT"}
    s = WorkerSettings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                       kafka_sasl_username="u", kafka_sasl_password="p", kafka_ssl_cafile="/tls/ca.crt")
    assert s.kafka_security() == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                                  "sasl_plain_username": "u", "sasl_plain_password": "p",
                                  "ssl_cafile": "/tls/ca.crt"}
    assert "p" not in repr(s.kafka_sasl_password)  # secrets stay out of logs
    with pytest.raises(ValidationError, match="needs kafka_sasl_username"):
        WorkerSettings(kafka_security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ValidationError, match="go together"):
        WorkerSettings(kafka_security_protocol="SSL", kafka_ssl_certfile="/tls/c.crt")
    with pytest.raises(ValidationError):
        WorkerSettings(kafka_security_protocol="TLS")


def test_the_worker_hands_its_kafka_security_settings_to_both_clients(random_model_dir, monkeypatch):
    """Not only kafka_security()'s dict: what the worker's access check, producer and consumer
    are built with (tests/test_secured_kafka.py does it against a secured broker)."""
    import moderator.ingest.consumer as consumer_module
    import moderator.publish as publish_module
    import moderator.worker.app as app_module
    from moderator.config import WorkerSettings
    from moderator.demo import DEMO_POLICY
    from moderator.worker.app import Worker

    built: dict[str, dict] = {}

    class Producer:  # stands in for KafkaProducer: records its arguments
        def __init__(self, **kw):
            built["producer"] = kw

        def flush(self, *a, **kw):
            pass

        def close(self, *a, **kw):
            pass

    class Built(Exception):
        pass

    def consumer(*topics, **kw):
        built["consumer"] = kw
        raise Built  # enough: the worker stops starting here

    def check(bootstrap, security, **kw):
        built["check"] = dict(security)
        return 0.0

    monkeypatch.setattr(app_module, "check_kafka_access", check)
    monkeypatch.setattr(publish_module, "KafkaProducer", Producer)
    monkeypatch.setattr(consumer_module, "KafkaConsumer", consumer)
    s = WorkerSettings(model_dir=random_model_dir, policy=DEMO_POLICY, http_port=0, http_host="127.0.0.1",
                       redis_url=None, kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                       kafka_sasl_username="svc-moderator", kafka_sasl_password="s3cret",
                       kafka_ssl_cafile="/tls/ca.crt")
    with pytest.raises(Built):
        Worker(s).run()
    want = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "svc-moderator", "sasl_plain_password": "s3cret", "ssl_cafile": "/tls/ca.crt"}
    for client in ("check", "producer", "consumer"):
        assert {k: built[client].get(k) for k in want} == want, client


def test_revoke_waits_for_in_flight_work_without_stopping_the_consumers_event_loop():
    """kafka-python 3 runs rebalance listeners on the event loop that also heartbeats: the
    revoke's wait for in-flight work must be awaited sleeps there, not a blocking wait (one of
    revoke_wait_ms 5 s stopped heartbeats and, with a 6 s session, lost the group)."""
    from kafka.net.selector import NetworkSelector

    from moderator.ingest import RebalanceHooks

    net = NetworkSelector()
    ticks: list[float] = []
    calls: list[tuple[str, set, float]] = []
    t0 = time.monotonic()
    drained_at = t0 + 0.3
    hooks = RebalanceHooks(lambda tps: calls.append(("revoked", tps, time.monotonic())),
                           lambda tps: calls.append(("assigned", tps, time.monotonic())),
                           drained=lambda tps: time.monotonic() >= drained_at, revoke_wait_s=lambda: 5.0)
    tp = TopicPartition("t", 0)

    async def heartbeat():
        while time.monotonic() < t0 + 0.5:
            ticks.append(time.monotonic())
            await net.sleep(0.01)

    async def both():
        beat = net.call_soon(heartbeat)
        await hooks.on_partitions_revoked([tp])
        await hooks.on_partitions_assigned([])
        while not beat.is_done:
            await net.sleep(0.01)

    net.run(both)
    assert [c[0] for c in calls] == ["revoked", "assigned"] and calls[0][1] == {tp}
    assert drained_at <= calls[0][2] < drained_at + 0.2  # waited for the drain, not the 5 s cap
    during = [t for t in ticks if t0 < t < drained_at]
    assert len(during) >= 10, f"the loop stalled while the revoke waited ({len(during)} ticks)"

    # nothing drains: the wait ends at revoke_wait_s, then on_revoked runs all the same
    calls.clear()
    capped = RebalanceHooks(lambda tps: calls.append(("revoked", tps, time.monotonic())), lambda tps: None,
                            drained=lambda tps: False, revoke_wait_s=lambda: 0.2)
    start = time.monotonic()
    net.run(lambda: capped.on_partitions_revoked([tp]))
    assert calls and 0.2 <= calls[0][2] - start < 0.5
    net.close()


def test_a_revoke_waits_past_its_deadline_for_a_committing_transaction():
    """Exactly-once: a batch transaction carrying a partition's offsets is between its liveness
    check and its end; the revoke must not take the partition's redo point meanwhile (it would
    redo a batch that commits), even when the drain wait is over."""
    from kafka.net.selector import NetworkSelector

    from moderator.ingest import RebalanceHooks

    tp, other = TopicPartition("t", 0), TopicPartition("t", 1)
    t = OffsetTracker()
    t.assign({tp, other})
    e = t.track(tp, 4)
    assert t.begin_commit([(tp, e)]) and t.committing({tp}) and not t.committing({other})
    assert not t.begin_commit([(tp, e + 100)])  # a stale epoch: refused, nothing marked
    net = NetworkSelector()
    calls: list[float] = []
    ended_at = time.monotonic() + 0.3
    hooks = RebalanceHooks(lambda tps: calls.append(time.monotonic()), lambda tps: None,
                           drained=lambda tps: True, revoke_wait_s=lambda: 0.0,
                           committing=lambda tps: time.monotonic() < ended_at or t.committing(tps),
                           commit_wait_s=5.0)

    async def end_it():
        await net.sleep(0.3)
        t.done(tp, 4, e)  # what the transaction's on_done does, then end_commit
        t.end_commit()

    async def both():
        net.call_soon(end_it)
        await hooks.on_partitions_revoked([tp])

    net.run(both)
    assert calls and calls[0] >= ended_at
    t.revoke({tp})
    t.assign({tp})
    assert t.pending_rewinds() == {tp: 5}  # the redo point is past the committed batch
    net.close()


def test_adaptive_batch_goes_at_once_when_downstream_is_idle_and_fills_when_busy():
    busy = threading.Event()
    b = MicroBatcher(4, max_wait_ms=60_000, idle=lambda: not busy.is_set())
    b.put(1)
    t0 = time.monotonic()
    assert b.get_batch(timeout=5) == [1]  # idle: no waiting for the 60 s deadline
    assert time.monotonic() - t0 < 1.0
    busy.set()  # the encoder is working: items accumulate into a full batch
    for i in range(6):
        b.put(i)
    assert b.get_batch(timeout=5) == [0, 1, 2, 3]
    assert b.get_batch(timeout=0.2) == []  # 2 wait, downstream busy, deadline far away

    def finish_soon():
        time.sleep(0.3)
        busy.clear()
        b.wake()  # the encoder went idle: the 2 waiting items go now, not in 60 s
    threading.Thread(target=finish_soon, daemon=True).start()
    t0 = time.monotonic()
    assert b.get_batch(timeout=10) == [4, 5]
    assert 0.25 < time.monotonic() - t0 < 5.0


class _Started:
    """``start`` for MicroBatcher: records what was started; the test finishes futures by hand."""

    def __init__(self) -> None:
        self.futures: dict = {}

    def __call__(self, item):
        from concurrent.futures import Future  # noqa: PLC0415

        self.futures[item] = f = Future()
        return f

    def finish(self, *items) -> None:
        for i in items:
            self.futures[i].set_result(f"prepared-{i}")


def test_items_start_on_arrival_and_batches_are_the_prepared_prefix_in_arrival_order():
    started = _Started()
    b = MicroBatcher(4, max_wait_ms=60_000, idle=lambda: True, start=started, ahead=4)
    for i in range(6):
        b.put(i)
    assert list(started.futures) == [0, 1, 2, 3]  # started at once, at most `ahead`; 4 and 5 wait
    assert len(b) == 6
    started.finish(1, 2)  # prepared out of order: 0 is still being prepared
    assert b.get_batch(timeout=0.2) == []  # nothing goes past an unprepared head
    started.finish(0)
    # 0..2 are prepared and 3 is coming: while something is still being prepared the batch
    # waits for it (up to max_batch or the deadline), even though the encoder is idle
    assert b.get_batch(timeout=0.2) == []
    started.finish(3)
    assert b.get_batch(timeout=1) == ["prepared-0", "prepared-1", "prepared-2", "prepared-3"]
    assert list(started.futures) == [0, 1, 2, 3, 4, 5]  # taking a batch started the ones held back
    started.finish(4)
    t0 = time.monotonic()
    threading.Timer(0.2, started.finish, args=(5,)).start()
    assert b.get_batch(timeout=5) == ["prepared-4", "prepared-5"]  # idle, nothing else coming: at once
    assert time.monotonic() - t0 < 2.0
    b.close()
    assert b.get_batch(timeout=1) is None


def test_a_prepared_batch_closes_max_wait_after_its_first_item_is_ready_not_after_it_arrived():
    started = _Started()
    b = MicroBatcher(10, max_wait_ms=150, start=started)  # not adaptive: full or deadline
    b.put("a")
    b.put("b")
    time.sleep(0.3)  # "a" was being prepared all along: the deadline has not started yet
    started.finish("a")
    t0 = time.monotonic()
    assert b.get_batch(timeout=5) == ["prepared-a"]  # "b" is not ready: the deadline takes "a" alone
    waited = time.monotonic() - t0
    assert 0.12 <= waited < 1.0, waited
    started.finish("b")
    b.close()
    assert b.get_batch(timeout=1) == ["prepared-b"]  # closed: what is ready goes at once
    assert b.get_batch(timeout=1) is None


def test_a_preparation_that_raised_raises_to_the_batch_taker():
    started = _Started()
    b = MicroBatcher(2, max_wait_ms=0, start=started)
    b.put("x")
    started.futures["x"].set_exception(RuntimeError("bug in a prepare step"))
    with pytest.raises(RuntimeError, match="bug in a prepare step"):
        b.get_batch(timeout=1)


def test_decode_concurrency_follows_the_cpus_unless_set(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(2)), raising=False)
    assert WorkerSettings().decode_slots() == 1  # 2 cores: one for decode, one for Kafka and the encoder
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert WorkerSettings().decode_slots() == 4  # GIL-bound work gains nothing past a few threads
    assert WorkerSettings(decode_concurrency=6).decode_slots() == 6


@pytest.mark.parametrize("value", [
    b'{"id": "a\\ud800", "image": {"url": "https://images.example/a.png"}}',
    b'{"id": "ok", "image": {"url": "https://images.example/a.png"}, "metadata": {"x": "\\udfff"}}',
    b'{"specversion": "1.0", "id": "c\\ud800", "source": "s", "type": "t", '
    b'"data": {"image": {"url": "https://images.example/a.png"}}}',
])
def test_an_unpaired_surrogate_is_malformed_json_not_a_poisoned_record(value):
    """json.loads accepts a lone \\ud800; no UTF-8 writer does, so a decision or dead letter carrying
    it could never be published (the worker would stop on it and crash-loop on the same offset)."""
    with pytest.raises(InputError) as info:
        parse_record(value, None, [])
    assert info.value.reason == "malformed_json" and "surrogate" in str(info.value)
    # a paired surrogate (one emoji) is a normal character
    ok = parse_record(b'{"id": "e\\ud83d\\ude00", "image": {"url": "https://images.example/a.png"}}', None, [])
    assert ok.id == "e\U0001f600"


def test_a_dead_letter_with_an_unencodable_id_still_serialises():
    from moderator.publish import SourceRecord, build_dead_letter

    src = SourceRecord(topic="t", partition=0, offset=1, key=None, value=b"x", timestamp_ms=0)
    dead = build_dead_letter(src, "invalid_event", "bad id a\ud800", event_id="a\ud800", worker="w",
                             max_value_bytes=100)
    data = dead.model_dump_json().encode("utf-8")
    assert b"a\\\\ud800" in data


def test_a_cloudevent_with_an_unusable_data_id_is_dead_lettered_under_its_own_id():
    ce = {"specversion": "1.0", "id": "ce-77", "source": "urn:uploads", "type": "t",
          "data": {"id": 42, "image": {"url": "https://images.example/a.png"}}}
    with pytest.raises(InputError) as info:
        parse_record(_json(ce), None, [("content-type", b"application/cloudevents+json")])
    assert info.value.reason == "invalid_event" and info.value.event_id == "ce-77"
    headers = [("ce_specversion", b"1.0"), ("ce_id", b"ce-78"), ("ce_source", b"s"), ("ce_type", b"t"),
               ("content-type", b"application/json")]
    with pytest.raises(InputError) as info:
        parse_record(b'{"id": ["x"], "image": {"url": "https://images.example/a.png"}}', None, headers)
    assert info.value.reason == "invalid_event" and info.value.event_id == "ce-78"


def test_thread_labels_fold_pool_indexes_and_client_ids():
    from moderator.worker.threadcpu import thread_label

    cases = {"prepare_0": "prepare", "prepare_3": "prepare", "fetch_7": "fetch", "fetch-dns-2": "fetch-dns",
             "encode": "encode", "MainThread": "MainThread", "ops-http": "ops-http",
             "kafka-io-pod-7d9f-1234": "kafka-io", "pod-7d9f-1234-producer-network-thread": "kafka-producer",
             "pod-7d9f-1234-shadow-network-thread": "kafka-producer-shadow", "Thread-12 (serve)": "other",
             None: "native"}
    assert {name: thread_label(name) for name in cases} == cases


def test_thread_cpu_counter_only_grows_while_threads_come_and_go():
    from prometheus_client import CollectorRegistry, Counter

    from moderator.worker.threadcpu import ThreadCpu

    registry = CollectorRegistry()
    counter = Counter("t_cpu_seconds", "test", ["thread"], registry=registry)
    snapshots = iter([
        [(10, 100, "prepare_0", 1.0), (11, 100, "prepare_1", 2.0), (12, 50, None, 0.5)],
        [(10, 100, "prepare_0", 1.5), (12, 50, None, 0.75)],  # prepare_1 ended: its total stays
        [(10, 100, "prepare_0", 1.5), (12, 50, None, 0.75), (11, 900, "encode", 0.25)],
        [(10, 100, "prepare_0", 1.5), (12, 60, "fetch_0", 0.125)],  # id 12 reused at once, less CPU so far
    ])
    account = ThreadCpu(counter, read=lambda: next(snapshots))

    def value(thread: str) -> float:
        return registry.get_sample_value("t_cpu_seconds_total", {"thread": thread}) or 0.0

    account.update()
    assert (value("prepare"), value("native")) == (3.0, 0.5)
    account.update()
    assert (value("prepare"), value("native")) == (3.5, 0.75)
    account.update()  # a new thread with an old id counts from its own start
    assert (value("prepare"), value("native"), value("encode")) == (3.5, 0.75, 0.25)
    account.update()  # the id of a thread seen last time, on a new thread: its own CPU, not a negative delta
    assert (value("prepare"), value("native"), value("encode"), value("fetch")) == (3.5, 0.75, 0.25, 0.125)


def test_thread_cpu_reads_this_process_threads():
    from moderator.worker.threadcpu import cpu_by_label, read_threads

    threads = read_threads()
    me = threading.get_native_id()
    assert any(tid == me and name == threading.current_thread().name for tid, _, name, _ in threads)
    assert cpu_by_label(threads)[threading.current_thread().name] > 0
