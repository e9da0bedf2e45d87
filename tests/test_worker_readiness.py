"""/readyz and moderator_worker_ready, state by state: not started, encoder that cannot run,
joined with partitions, joined as a standby with none, stopping. The two always agree (the
gauge is computed by the same function)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

import pytest

from moderator import metrics
from moderator.errors import ModelError
from moderator.worker import Worker


def _get(port: int, path: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:  # noqa: S310
            body = r.read().decode()
            return r.status, (json.loads(body) if path != "/metrics" else body)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def _gauge(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_not_ready_before_it_has_started(random_model_dir, stream_topics, worker_settings):
    worker = Worker(worker_settings(random_model_dir, stream_topics(1)))
    ready, detail = worker._ready_probe()
    assert not ready
    assert detail["checks"] == {"encoder_warm": False, "group_joined": False, "not_stopping": True}


def test_an_encoder_that_cannot_run_fails_the_start(random_model_dir, stream_topics, worker_settings, monkeypatch):
    worker = Worker(worker_settings(random_model_dir, stream_topics(1)))

    def broken(pixels):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(worker.encoder, "encode_uint8", broken)
    with pytest.raises(ModelError, match="warm-up batch: RuntimeError: CUDA error: out of memory"):
        worker.run()
    assert worker._consumer is None  # never joined the group
    assert metrics.WORKER_READY.collect()[0].samples[0].value == 0


def test_ready_with_partitions_ready_as_a_standby_without_and_not_ready_once_stopping(
        random_model_dir, stream_topics, worker_settings, start_worker):
    topics = stream_topics(1)  # one partition, two workers: one of them holds none
    group = f"ready-{uuid.uuid4().hex[:8]}"
    first = start_worker(worker_settings(random_model_dir, topics, consumer_group=group))
    status, body = _get(first.http_port, "/readyz")
    assert status == 200 and all(body["checks"].values()) and body["partitions"] == [f"{topics.input}/0"]
    assert "note" not in body

    second = start_worker(worker_settings(random_model_dir, topics, consumer_group=group))
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:  # the rebalance settles: the partition on exactly one of them
        held = [len(w.tracker.assigned()) for w in (first, second)]
        if sorted(held) == [0, 1] and second.ready_event.is_set():
            break
        time.sleep(0.2)
    assert sorted(held) == [0, 1], held
    standby = first if held[0] == 0 else second
    status, body = _get(standby.http_port, "/readyz")
    assert status == 200 and body["partitions"] == [] and "standby" in body["note"]

    # the gauges follow the worker that started last (one worker per process in production)
    status, text = _get(second.http_port, "/metrics")
    assert _gauge(text, "moderator_worker_ready") == 1.0
    assert _gauge(text, "moderator_assigned_partitions") == float(len(second.tracker.assigned()))

    second.request_stop()
    ready, detail = second._ready_probe()
    assert not ready and detail["checks"]["not_stopping"] is False
    assert metrics.WORKER_READY.collect()[0].samples[0].value == 0.0  # the same function
    second.thread.join(60)
    assert metrics.WORKER_READY.collect()[0].samples[0].value == 0.0


def test_a_rebalance_that_never_assigns_is_left_and_rejoined_losing_nothing(
        random_model_dir, stream_topics, worker_settings, start_worker, read_outputs, kafka_bootstrap, monkeypatch):
    """The stall seen with kafka-python 3.0.12 (revoked, then never assigned again) cannot be
    provoked on demand, so the test makes the worker believe it: the watchdog must leave the
    group, join again, get its partitions back and decide every event, before and after."""
    from moderator.produce import produce, synthetic_events

    topics = stream_topics(2)
    worker = start_worker(worker_settings(random_model_dir, topics, max_batch=8))
    first = list(synthetic_events(20, seed=31, size=48, id_prefix="rj1"))
    produce(kafka_bootstrap, topics.input, first)
    assert len({v["event_id"] for _, v in read_outputs(topics, 20)[topics.decisions]}) == 20
    forced = metrics.REJOINS_FORCED._value.get()
    assert not worker.committer.rebalance_stalled(0.0)  # assigned: nothing to do
    monkeypatch.setattr(type(worker), "rebalance_limit_s", lambda self: 0.5)
    worker.committer.unassigned_since = time.monotonic() - 10  # "revoked 10 s ago, never assigned"
    deadline = time.monotonic() + 30
    while metrics.REJOINS_FORCED._value.get() == forced:
        assert time.monotonic() < deadline, "the watchdog did not rejoin"
        time.sleep(0.1)
    while worker.committer.unassigned_since is not None or not worker.tracker.assigned():
        assert time.monotonic() < deadline, "no assignment after the forced rejoin"
        time.sleep(0.1)
    assert len(worker.tracker.assigned()) == 2 and metrics.REJOINS_FORCED._value.get() == forced + 1
    second = list(synthetic_events(20, seed=32, size=48, id_prefix="rj2"))
    produce(kafka_bootstrap, topics.input, second)
    got = {v["event_id"] for _, v in read_outputs(topics, 40)[topics.decisions]}
    assert got == {e.id for e in first + second}
    assert worker._fatal is None
