"""``MODERATOR_PROCESSING_GUARANTEE=exactly_once``: each batch's outputs and its input offsets
commit in one Kafka transaction. What a ``read_committed`` reader sees: every input decided
(or dead-lettered) exactly once, even when a batch's transaction aborts and is redone; the
group's committed offsets reach the end through the transactions alone. (SIGKILLs under
load in this mode: the chaos test in tests/test_worker_resilience.py.)"""

from __future__ import annotations

import time
from collections import Counter

from kafka.errors import KafkaTimeoutError

from moderator import metrics
from moderator.produce import interleave, malformed_events, produce, synthetic_events


def _name(value: dict) -> str:
    return value.get("event_id") or f"key:{value['source']['key']}"


def _counts(out: dict, topics) -> Counter:
    return Counter(_name(v) for t in (topics.decisions, topics.dead_letter) for _, v in out[t])


def _all_committed(kafka_offsets, group: str, topic: str, partitions: int, timeout_s: float = 90) -> None:
    """Wait until the group's offsets (committed by the transactions) reach the input's end:
    every input is decided, and the reads below see finished transactions only."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if kafka_offsets.committed(group, topic, partitions) == kafka_offsets.end(topic, partitions):
            return
        time.sleep(0.5)
    raise AssertionError(f"offsets of {group} did not reach the end of {topic} within {timeout_s:.0f} s")


def _txn(result: str) -> float:
    return metrics.TRANSACTIONS.labels(result=result)._value.get()


def test_outputs_and_offsets_commit_together_each_input_once(
        random_model_dir, stream_topics, worker_settings, start_worker, read_outputs, kafka_bootstrap,
        kafka_offsets):
    topics = stream_topics(3)
    settings = worker_settings(random_model_dir, topics, processing_guarantee="exactly_once", max_batch=8)
    committed_before = _txn("committed")
    worker = start_worker(settings)
    events = list(interleave(synthetic_events(40, seed=5, size=48, id_prefix="eos"),
                             malformed_events("eos-bad", 5)[:4], 10))
    produce(kafka_bootstrap, topics.input, events)
    _all_committed(kafka_offsets, settings.consumer_group, topics.input, 3)
    out = read_outputs(topics, len(events), isolation_level="read_committed")
    counts = _counts(out, topics)
    assert len(counts) == len(events) and set(counts.values()) == {1}, counts.most_common(3)
    assert len(out[topics.dead_letter]) == 4
    # copies on flagged/review are in the same transactions as their decisions
    flagged = {_name(v) for _, v in out[topics.flagged]}
    assert flagged == {_name(v) for _, v in out[topics.decisions] if v["action"] == "flag"}
    assert _txn("committed") - committed_before >= len(events) / 8 / 2  # batches, not records
    # no consumer.commit() ran: the offsets (at the end, above) came with the transactions
    assert worker.committer.commits is False


def test_an_aborted_batch_is_invisible_and_redone(
        random_model_dir, stream_topics, worker_settings, start_worker, read_outputs, kafka_bootstrap,
        kafka_offsets):
    """One send fails (as a broker timeout would): its batch's transaction aborts, the partitions
    rewind, the batch is decided again. read_committed readers see each input once; the aborted
    records are in the log (read_uncommitted sees them), proving the abort happened."""
    topics = stream_topics(2)
    settings = worker_settings(random_model_dir, topics, processing_guarantee="exactly_once", max_batch=8)
    worker = start_worker(settings)
    real_send = worker._publisher.producer.send
    events = list(synthetic_events(30, seed=8, size=48, id_prefix="abort"))
    target = events[13].id.encode()  # a decision's key is its event id
    failed: list[str] = []

    def flaky_send(topic, value=None, key=None, headers=None, **kw):
        if key == target and not failed:
            failed.append(topic)
            raise KafkaTimeoutError("injected: the broker did not take the record")
        return real_send(topic, value=value, key=key, headers=headers, **kw)

    worker._publisher.producer.send = flaky_send
    aborted_before = _txn("aborted")
    produce(kafka_bootstrap, topics.input, events)
    _all_committed(kafka_offsets, settings.consumer_group, topics.input, 2)
    committed = read_outputs(topics, len(events), isolation_level="read_committed")
    counts = _counts(committed, topics)
    assert failed, "the injected failure never happened"
    assert _txn("aborted") - aborted_before >= 1
    assert len(counts) == len(events) and set(counts.values()) == {1}, counts.most_common(3)
    assert worker._fatal is None
    everything = read_outputs(topics, len(events))  # read_uncommitted: aborted records too
    assert len(everything[topics.decisions]) > len(committed[topics.decisions]), \
        "no aborted records in the log: the batch did not go through a transaction"
