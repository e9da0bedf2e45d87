"""Policy hot reload in a running worker under load: an edit mid-stream switches decisions to
the new version at a batch boundary, nothing is lost, every decision carries the version that
decided it, and an invalid edit is rejected and counted while decisions continue."""

from __future__ import annotations

import os
import threading
import time

from kafka import KafkaConsumer

from moderator import metrics
from moderator.demo import DEMO_POLICY
from moderator.produce import produce, synthetic_events


def _write_atomically(path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # what a ConfigMap update or `mv` does: never a half-written file


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _input_positions(bootstrap: str, topic: str, n: int) -> dict[str, tuple[int, int]]:
    """event id (the record key) -> (partition, offset) on the input topic."""
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    out: dict = {}
    try:
        deadline = time.monotonic() + 60
        while len(out) < n and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=300).values():
                for r in recs:
                    out[r.key.decode()] = (r.partition, r.offset)
    finally:
        c.close()
    return out


def test_policy_edits_under_load_switch_at_batch_boundaries_and_bad_edits_are_counted(
        random_model_dir, stream_topics, worker_settings, start_worker, read_outputs, kafka_bootstrap, tmp_path):
    topics = stream_topics(2)
    policy = tmp_path / "policy.yaml"
    v1 = DEMO_POLICY.read_text()
    assert 'version: "demo-1"' in v1 and "thresholds: {flag: null, escalate: 0.8}" in v1
    # v2: yellow_shapes (a raw-cosine category) escalates everything, so a decision's actions show
    # which policy made it, whatever its version label says
    v2 = v1.replace('version: "demo-1"', 'version: "demo-2"').replace(
        "thresholds: {flag: null, escalate: 0.8}", "thresholds: {flag: null, escalate: -1.0}")
    policy.write_text(v1)
    worker = start_worker(worker_settings(random_model_dir, topics, policy=policy, policy_reload_interval_s=0.2,
                                          max_batch=8))
    events = list(synthetic_events(360, seed=9, size=48, id_prefix="reload"))
    producer = threading.Thread(target=produce, args=(kafka_bootstrap, topics.input, events),
                                kwargs={"rate": 60.0}, daemon=True)
    rejected = metrics.POLICY_RELOADS.labels(result="rejected")
    rejected_before = rejected._value.get()
    producer.start()

    _wait(lambda: worker.stats.decisions >= 100, 60, "100 decisions under v1")
    _write_atomically(policy, v2)
    _wait(lambda: worker.engine.policy.version == "demo-2", 10, "the reload to v2")
    _wait(lambda: worker.stats.decisions >= 200, 60, "200 decisions")
    _write_atomically(policy, v2.replace('version: "demo-2"', 'version: "demo-3"').replace(
        "escalate: -1.0}", "escalate: high}"))  # not a number: invalid
    _wait(lambda: rejected._value.get() > rejected_before, 10, "the invalid edit to be rejected")
    decided_at_rejection = worker.stats.decisions
    producer.join(60)
    out = read_outputs(topics, len(events), timeout_s=90)
    assert worker.stats.decisions > decided_at_rejection, "decisions stopped after the invalid edit"
    assert worker.engine.policy.version == "demo-2"  # the invalid edit kept v2 in force

    decisions = [v for _, v in out[topics.decisions]]
    assert out[topics.dead_letter] == []
    assert {d["event_id"] for d in decisions} == {e.id for e in events}, "lost events"
    versions = {d["policy_version"] for d in decisions}
    assert versions == {"demo-1", "demo-2"}, versions

    # every decision was made by the policy it names
    for d in decisions:
        yellow = next(c for c in d["categories"] if c["id"] == "yellow_shapes")
        if d["policy_version"] == "demo-2":
            assert yellow["action"] == "escalate" and d["action"] in ("escalate", "flag"), d["event_id"]
        else:
            assert yellow["action"] == ("escalate" if yellow["score"] >= 0.8 else "allow"), d["event_id"]

    # the switch happens once per partition, at a batch boundary: in offset order, v1 then v2
    where = _input_positions(kafka_bootstrap, topics.input, len(events))
    for partition in {p for p, _ in where.values()}:
        seq = [d["policy_version"] for d in sorted((d for d in decisions if where[d["event_id"]][0] == partition),
                                                   key=lambda d: where[d["event_id"]][1])]
        assert seq == sorted(seq), f"partition {partition}: a v1 decision after a v2 one in offset order"
