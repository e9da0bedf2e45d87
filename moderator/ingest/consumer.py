"""The Kafka consumer: one group member, manual commits, rebalance hooks.

Kafka specifics stay here. kafka-python 3 runs the group protocol on its own
IO thread's event loop and calls rebalance listeners there, so the hooks passed in
must not call blocking consumer APIs (``commit`` would deadlock; ``commit_async``
is safe), and must not block: a plain listener that waits holds up the loop's
heartbeats too, and a wait longer than the session timeout loses the group.
``RebalanceHooks`` does the one wait there is (in-flight work of revoked partitions)
as awaited sleeps on that loop.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.structs import TopicPartition

from moderator.config import WorkerSettings

log = logging.getLogger(__name__)

PartitionsHook = Callable[[set[TopicPartition]], None]


def loop_sleep(seconds: float):
    """An awaitable pause on kafka-python 3's own event loop (its selector kernel, not asyncio):
    the event its coordinator awaits between retries. A private detail of kafka-python, so it is
    pinned by the version range in pyproject.toml and by a test."""
    from kafka.net.selector import KernelEvent  # noqa: PLC0415

    return KernelEvent("_sleep", seconds)


class RebalanceHooks(AsyncConsumerRebalanceListener):
    """Adapts plain callables to kafka-python's async listener interface.

    On revoke it first waits, up to ``revoke_wait_s()``, until ``drained(revoked)`` -- awaiting
    short sleeps on the consumer's event loop, which keeps heartbeating meanwhile -- then,
    past that deadline too (up to ``commit_wait_s``), while ``committing(revoked)``: a
    transaction carrying those partitions' offsets is between its liveness check and its
    end, and revoking under it would redo a batch it is about to commit. Then it calls
    ``on_revoked``. The hooks themselves must not block.
    """

    def __init__(self, on_revoked: PartitionsHook, on_assigned: PartitionsHook,
                 on_lost: PartitionsHook | None = None, *,
                 drained: Callable[[set[TopicPartition]], bool] | None = None,
                 revoke_wait_s: Callable[[], float] = lambda: 0.0, poll_s: float = 0.02,
                 committing: Callable[[set[TopicPartition]], bool] | None = None,
                 commit_wait_s: float = 0.0) -> None:
        self._revoked, self._assigned, self._lost = on_revoked, on_assigned, on_lost
        self._drained, self._revoke_wait_s, self._poll_s = drained, revoke_wait_s, poll_s
        self._committing, self._commit_wait_s = committing, commit_wait_s

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        tps = set(revoked)
        if tps and self._drained is not None:
            deadline = time.monotonic() + self._revoke_wait_s()
            while not self._drained(tps) and time.monotonic() < deadline:
                await loop_sleep(self._poll_s)
        if tps and self._committing is not None:
            deadline = time.monotonic() + self._commit_wait_s
            while self._committing(tps) and time.monotonic() < deadline:
                await loop_sleep(self._poll_s)
        self._revoked(tps)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._assigned(set(assigned))

    async def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
        (self._lost or self._revoked)(set(lost))


def make_consumer(settings: WorkerSettings) -> KafkaConsumer:
    """A group consumer with auto-commit off: offsets commit only after every output is acked."""
    return KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.consumer_group,
        client_id=settings.client_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.auto_offset_reset,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        max_poll_records=settings.poll_max_records,
        fetch_min_bytes=settings.consumer_fetch_min_bytes,
        fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
        fetch_max_bytes=max(52_428_800, settings.max_event_bytes + 1024),
        max_partition_fetch_bytes=max(1_048_576, settings.max_event_bytes + 1024),
        # Fail fast and retry from the poll loop instead of hanging in one call.
        request_timeout_ms=max(15_000, settings.session_timeout_ms + 5_000),
        reconnect_backoff_max_ms=2_000,
        # exactly-once: skip aborted outputs of upstream transactions, and (KIP-447) wait for a
        # partition's previous owner's pending transactional offsets before reading from them
        isolation_level="read_committed" if settings.processing_guarantee == "exactly_once" else "read_uncommitted",
        **settings.kafka_security(),
    )


def subscribe(consumer: KafkaConsumer, topic: str, hooks: RebalanceHooks, *, wait_s: float = 30.0) -> None:
    """Join the group for ``topic`` once this client's metadata lists the topic's partitions,
    each with a leader, the same in two metadata responses in a row.

    When the group's first assignment is computed before the first metadata response for
    the topic has arrived, the member is assigned nothing ("No partition metadata for
    topic") and kafka-python did not reliably rejoin afterwards (a worker idle for minutes,
    seen in the end-to-end tests). One metadata request first closes that window. The
    consumer was just built, so the broker answered a moment ago; a topic that still has
    no partitions after ``wait_s`` is logged and subscribed to anyway.
    """
    deadline = time.monotonic() + wait_s
    partitions: set = set()
    previous: set | None = None
    while True:
        try:
            consumer.topics()  # a fresh metadata request
            partitions = consumer.partitions_for_topic(topic) or set()
            # every partition led, and the same set twice in a row: a just-created topic's partitions
            # appear in metadata as their leaders are elected, and each new one after the first
            # assignment forces a rejoin (after which a member was seen never to be assigned again)
            led = set(consumer._client.cluster.available_partitions_for_topic(topic) or ())
            settled = bool(partitions) and led == partitions and partitions == previous
            previous = partitions
        except KafkaError as e:
            log.debug("metadata for %s not available yet: %s", topic, e)
            settled = False
        if settled or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if not partitions:
        log.warning("input topic %s has no partitions after %.0f s; subscribing anyway", topic, wait_s,
                    extra={"event": "topic_without_partitions", "topic": topic})
    consumer.subscribe([topic], listener=hooks)
