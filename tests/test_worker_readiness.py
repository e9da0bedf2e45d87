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

    monkeypatch.setattr(worker.encoder, "encode_pixels", broken)
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
