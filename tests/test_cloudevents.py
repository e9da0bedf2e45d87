"""CloudEvents both ways (the official SDK, ``cloudevents.core.bindings.kafka``).

- out: ``MODERATOR_DECISION_FORMAT=json`` stays byte for byte what it was; ``cloudevents``
  writes decisions, their copies and dead letters as CloudEvents (binary or structured mode)
  that the SDK reads back from the real broker with the documented attributes, and whose ids
  repeat when an input is decided again (a replay after a crash);
- in: a real worker decides every envelope ``moderator produce`` writes (plain JSON, structured
  CloudEvents with data or data_base64, binary CloudEvents with JSON or image data, raw images)
  under the event's own id, and dead-letters broken CloudEvents with a named reason.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat

from moderator.config import WorkerSettings
from moderator.publish import (
    CE_DEAD_LETTER,
    CE_DECISION,
    DecisionPublisher,
    OutputFormat,
    SourceRecord,
    Topics,
    build_dead_letter,
)
from moderator.schemas import CategoryScore, Decision


def _decision(event_id: str, action: str = "flag") -> Decision:
    return Decision(
        event_id=event_id, action=action, top_category="weapons" if action != "allow" else None,
        reasons=[f"{action}:weapons score 0.9100 >= 0.9"] if action != "allow" else [],
        categories=[CategoryScore(id="weapons", label="Weapons", score=0.91, action=action)],
        policy_version="2026.11-default.1", policy_sha256="ab" * 32, model_sha256="cd" * 32,
        model_architecture="ViT-B-32", image_sha256="ef" * 32, timings_ms={"decode": 1.5},
        metadata={"uploader": "u-1"}, decided_at=datetime.now().astimezone().isoformat(timespec="milliseconds"))


class _Future:
    def add_callback(self, fn):
        fn(None)
        return self

    def add_errback(self, fn):
        return self


class _Producer:
    """Records what the publisher sends (no broker)."""

    def __init__(self):
        self.sent = []

    def send(self, topic, value=None, key=None, headers=None):
        self.sent.append((topic, key, value, headers))
        return _Future()


def test_json_output_is_byte_for_byte_what_it_was():
    producer = _Producer()
    pub = DecisionPublisher("unused:9092", producer=producer)  # the default OutputFormat: json
    d = _decision("e-1").bind_input("images", 0, 7)
    pub.publish_decision(d, lambda: None, lambda e: None)
    dead = build_dead_letter(SourceRecord("images", 1, 9, None, b"k", b"{"), "malformed_json", "not JSON",
                             event_id=None, worker="w", max_value_bytes=100, policy_version="v1", model_sha256="m")
    pub.publish_dead_letter(dead, b"k", lambda: None, lambda e: None)
    want_headers = [("content-type", b"application/json"), ("moderator-model-sha256", b"cd" * 32),
                    ("moderator-policy-version", b"2026.11-default.1"), ("moderator-policy-sha256", b"ab" * 32),
                    ("moderator-action", b"flag"), ("moderator-cached", b"false"),
                    ("moderator-model-architecture", b"ViT-B-32")]
    assert producer.sent[:2] == [(t, b"e-1", d.model_dump_json().encode(), want_headers)
                                 for t in ("decisions", "flagged")]
    assert producer.sent[2] == ("dead-letter", b"k", dead.model_dump_json().encode(),
                                [("content-type", b"application/json"), ("moderator-model-sha256", b"m"),
                                 ("moderator-policy-version", b"v1"), ("moderator-reason", b"malformed_json")])
    assert "input_record" not in d.model_dump_json() and "images/0/7" not in d.model_dump_json()


def test_shadow_decisions_are_cloudevents_of_their_own_type():
    from moderator.publish import CE_SHADOW_DECISION, ShadowPublisher

    class Producer(_Producer):
        def close(self, timeout=None):
            pass

    producer = Producer()
    out = OutputFormat("cloudevents", "binary", "/moderator/g")
    shadow = ShadowPublisher("unused:9092", "shadow", producer=producer, output=out).start()
    live = _decision("e-9").bind_input("images", 0, 3)
    d = _decision("e-9", "allow").model_copy(update={"shadow": True}).bind_input("images", 0, 3)
    shadow.submit(d)
    shadow.close()
    (topic, key, value, headers), = producer.sent
    h = dict(headers)
    assert (topic, key, value) == ("shadow", b"e-9", d.model_dump_json().encode())
    assert (h["ce_type"], h["ce_subject"], h["moderator-shadow"]) == (CE_SHADOW_DECISION.encode(), b"e-9", b"true")
    assert h["ce_id"].decode() == out.event_id(CE_SHADOW_DECISION, "images/0/3", "e-9")
    assert h["ce_id"].decode() != out.event_id(CE_DECISION, live.input_record, "e-9")  # not the live decision's


def test_decision_format_settings():
    s = WorkerSettings(consumer_group="mod-eu")
    assert (s.decision_format, s.decision_cloudevents_mode) == ("json", "binary")
    out = OutputFormat.from_settings(WorkerSettings(consumer_group="mod-eu", decision_format="cloudevents",
                                                    decision_cloudevents_mode="structured"))
    assert out == OutputFormat("cloudevents", "structured", "/moderator/mod-eu")
    with pytest.raises(ValueError):
        WorkerSettings(decision_format="avro")


def _sdk_read(record, mode: str):
    """What a consumer does: the SDK's reader for the mode, on the record as Kafka delivered it."""
    msg = ce_kafka.KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value)
    read = ce_kafka.from_binary if mode == "binary" else ce_kafka.from_structured
    return read(msg, JSONFormat())


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_cloudevents_output_reads_back_with_the_sdk_from_the_broker(mode, kafka_bootstrap, topic_factory,
                                                                    read_records):
    names = Topics(topic_factory(1, suffix="decisions"), topic_factory(1, suffix="flagged"),
                   topic_factory(1, suffix="review"), topic_factory(1, suffix="dead-letter"))
    out = OutputFormat("cloudevents", mode, "/moderator/test-group")
    pub = DecisionPublisher(kafka_bootstrap, names, output=out, client_id="ce-test")
    flag = _decision("img-1").bind_input("images", 2, 41)
    again = _decision("img-1").bind_input("images", 2, 41)  # the same input decided again (a replay)
    allow = _decision("img-2", "allow").bind_input("images", 2, 42)
    dead = build_dead_letter(SourceRecord("images", 0, 5, None, b"bad-1", b'{"id": "bad-1"'), "malformed_json",
                             "value is not JSON", event_id="bad-1", worker="w1", max_value_bytes=1000,
                             policy_version="2026.11-default.1", model_sha256="cd" * 32)
    errors: list = []
    for d in (flag, again, allow):
        pub.publish_decision(d, lambda: None, errors.append)
    pub.publish_dead_letter(dead, b"bad-1", lambda: None, errors.append)
    pub.flush(30)
    pub.close()
    assert not errors
    records = read_records([names.decisions, names.flagged, names.dead_letter], 6, timeout_s=30)
    by_topic: dict = {}
    for r in records:
        by_topic.setdefault(r.topic, []).append((r, _sdk_read(r, mode)))
    assert [len(by_topic.get(t, [])) for t in (names.decisions, names.flagged, names.dead_letter)] == [3, 2, 1]

    sent = (flag, again, allow)
    for (r, ev), d in zip(by_topic[names.decisions], sent):
        assert (ev.get_type(), ev.get_source(), ev.get_subject(), ev.get_specversion()) == (
            CE_DECISION, "/moderator/test-group", d.event_id, "1.0")
        assert ev.get_datacontenttype() == "application/json"
        assert ev.get_time() == datetime.fromisoformat(d.decided_at)
        assert uuid.UUID(ev.get_id()).version == 5
        for name, want in (("policyversion", d.policy_version), ("policysha256", d.policy_sha256),
                           ("modelsha256", d.model_sha256), ("modelarch", d.model_architecture),
                           ("action", d.action)):
            assert ev.get_extension(name) == want, name
        assert ev.get_data() == json.loads(d.model_dump_json())  # the same JSON decision record
        assert r.key == d.event_id.encode() and dict(r.headers)["moderator-action"] == d.action.encode()
        if mode == "binary":  # the value is the json format's, byte for byte
            assert r.value == d.model_dump_json().encode()
            assert dict(r.headers)["content-type"] == b"application/json"
        else:
            assert dict(r.headers)["content-type"] == b"application/cloudevents+json"
    ids = [ev.get_id() for _, ev in by_topic[names.decisions]]
    assert ids[0] == ids[1] != ids[2]  # a replay repeats the id; another input has its own
    assert [ev.get_id() for _, ev in by_topic[names.flagged]] == ids[:2]  # a copy is the same event

    (r, ev), = by_topic[names.dead_letter]
    assert (ev.get_type(), ev.get_subject(), ev.get_extension("reason")) == (CE_DEAD_LETTER, "bad-1",
                                                                             "malformed_json")
    assert ev.get_data() == json.loads(dead.model_dump_json()) and ev.get_id() not in ids
    assert ev.get_extension("modelsha256") == "cd" * 32 and ev.get_time() == datetime.fromisoformat(dead.failed_at)


# --- through a real worker ------------------------------------------------------------------------


def test_a_worker_decides_every_envelope_and_replays_with_the_same_cloudevents_ids(
        random_model_dir, stream_topics, worker_settings, start_worker, kafka_bootstrap, read_records):
    from kafka import KafkaAdminClient, TopicPartition
    from kafka.structs import OffsetAndMetadata

    from moderator.produce import ENVELOPES, OutgoingEvent, produce, synthetic_events

    topics = stream_topics(2)
    settings = worker_settings(random_model_dir, topics, max_batch=8, decision_format="cloudevents")
    good = list(synthetic_events(4 * len(ENVELOPES), seed=7, size=48, envelopes=ENVELOPES, id_prefix="ce"))
    ce = [("ce_specversion", b"1.0"), ("ce_id", b"ce-bad-1"), ("ce_type", b"t")]  # no ce_source
    bad = [OutgoingEvent(id="ce-bad-1", expect="dead_letter:invalid_cloudevent", raw_value=b'{"image": {}}',
                         headers=[*ce, ("content-type", b"application/json")]),
           OutgoingEvent(id="ce-bad-2", expect="dead_letter:unsupported_envelope", raw_value=b"hello",
                         headers=[("ce_specversion", b"1.0"), ("ce_id", b"ce-bad-2"), ("ce_source", b"s"),
                                  ("ce_type", b"t"), ("content-type", b"text/plain")])]
    worker = start_worker(settings)
    produce(kafka_bootstrap, topics.input, good + bad)
    n = len(good) + len(bad)

    def events(records, topic):  # the SDK's event per record
        return [_sdk_read(r, "binary") for r in records if r.topic == topic]

    first = read_records([topics.decisions, topics.dead_letter], n, timeout_s=90)
    decided = {ev.get_subject(): ev for ev in events(first, topics.decisions)}
    assert set(decided) == {e.id for e in good}, "every envelope decided under its own id"
    for e in good:
        ev = decided[e.id]
        assert ev.get_type() == CE_DECISION and ev.get_source() == f"/moderator/{settings.consumer_group}"
        assert ev.get_data()["event_id"] == e.id and ev.get_extension("modelsha256") == worker.model_sha256
        assert ev.get_extension("policyversion") == worker.engine.policy.version
        want_meta = {"source": "synthetic", "label": e.expect} if e.envelope in (
            "json", "cloudevents", "cloudevents-binary") else None
        assert ev.get_data()["metadata"] == want_meta, e.envelope
    dead = {ev.get_subject(): ev for ev in events(first, topics.dead_letter)}
    assert {k: ev.get_extension("reason") for k, ev in dead.items()} == {
        "ce-bad-1": "invalid_cloudevent", "ce-bad-2": "unsupported_envelope"}
    assert all(ev.get_type() == CE_DEAD_LETTER for ev in dead.values())

    # a crash before the commit, simulated: the group's offsets go back to 0 and another replica of
    # the same group decides every input again, with the same CloudEvents ids
    worker.request_stop()
    worker.thread.join(60)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="ce-test-admin")
    try:
        admin.alter_group_offsets(settings.consumer_group, {TopicPartition(topics.input, p): OffsetAndMetadata(0, "", -1)
                                                            for p in range(2)})
    finally:
        admin.close()
    again = settings.model_copy(update={"client_id": settings.client_id + "-b"})
    start_worker(again)
    both = read_records([topics.decisions, topics.dead_letter], 2 * n, timeout_s=90)
    pairs: dict = {}
    for ev in events(both, topics.decisions) + events(both, topics.dead_letter):
        pairs.setdefault(ev.get_subject(), []).append(ev)
    assert len(pairs) == n and all(len(v) == 2 for v in pairs.values()), {k: len(v) for k, v in pairs.items()}
    for subject, (one, two) in pairs.items():  # decided (or dead-lettered) twice, at two times: one id
        assert one.get_id() == two.get_id() and one.get_data() != two.get_data(), subject
    assert len({v[0].get_id() for v in pairs.values()}) == n
