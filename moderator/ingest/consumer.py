"""The Kafka consumer: one group member, manual commits, rebalance hooks.

Kafka specifics stay here. kafka-python 3 runs the group protocol on its own
IO thread and calls rebalance listeners there, so the hooks passed in must not
call blocking consumer APIs (``commit`` would deadlock); ``commit_async`` is safe.
"""

from __future__ import annotations

from typing import Callable, Iterable

from kafka import KafkaConsumer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import TopicPartition

from moderator.config import WorkerSettings

PartitionsHook = Callable[[set[TopicPartition]], None]


class RebalanceHooks(ConsumerRebalanceListener):
    """Adapts plain callables to kafka-python's listener interface."""

    def __init__(self, on_revoked: PartitionsHook, on_assigned: PartitionsHook,
                 on_lost: PartitionsHook | None = None) -> None:
        self._revoked, self._assigned, self._lost = on_revoked, on_assigned, on_lost

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._revoked(set(revoked))

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._assigned(set(assigned))

    def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
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
        metadata_max_age_ms=settings.metadata_max_age_ms,
        fetch_max_bytes=max(52_428_800, settings.max_event_bytes + 1024),
        max_partition_fetch_bytes=max(1_048_576, settings.max_event_bytes + 1024),
        # Fail fast and retry from the poll loop instead of hanging in one call.
        request_timeout_ms=max(15_000, settings.session_timeout_ms + 5_000),
        reconnect_backoff_max_ms=2_000,
        **settings.kafka_security(),
    )


def subscribe(consumer: KafkaConsumer, topic: str, hooks: RebalanceHooks) -> None:
    consumer.subscribe([topic], listener=hooks)
