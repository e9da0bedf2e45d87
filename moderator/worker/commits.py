"""Offsets out to Kafka: periodic commits, lag, and what a rebalance does to them.

``OffsetTracker`` decides *what* may be committed (only below the slowest
unacknowledged record); ``OffsetCommitter`` decides *when* and talks to the
consumer: every ``commit_interval_ms`` from the consumer thread, once more on
close, and on revoke (from kafka-python's IO thread, where only
``commit_async`` is safe) after letting in-flight work finish for a moment.
"""

from __future__ import annotations

import logging
import threading
import time

from kafka.structs import TopicPartition

from moderator import metrics
from moderator.worker.offsets import OffsetTracker

log = logging.getLogger(__name__)


def _names(tps: set[TopicPartition]) -> list[str]:
    return sorted(f"{t.topic}/{t.partition}" for t in tps)


class OffsetCommitter:
    def __init__(self, tracker: OffsetTracker, *, commit_interval_ms: int, revoke_wait_ms: int,
                 commits: bool = True) -> None:
        self.tracker = tracker
        # False in exactly-once mode: offsets commit inside each batch's transaction, never here
        self.commits = commits
        self.consumer = None  # set by attach(): the hooks are registered before it exists
        self.assigned_once = threading.Event()
        self.closing = False
        # when partitions were revoked or lost and no assignment (not even an empty one) has
        # followed: the group is rebalancing, and a rebalance that never ends is a stall
        self.unassigned_since: float | None = None
        self._interval_s = commit_interval_ms / 1000
        self._revoke_wait_s = revoke_wait_ms / 1000
        self._next = time.monotonic() + self._interval_s

    def attach(self, consumer) -> None:
        self.consumer = consumer

    # -- consumer thread -----------------------------------------------------------------------

    def tick(self) -> None:
        """Commit and refresh lag when the interval is up (called after every poll)."""
        if time.monotonic() >= self._next:
            self.commit()
            self.update_lag()
            self._next = time.monotonic() + self._interval_s

    def commit(self) -> None:
        if not self.commits:
            return
        offsets = self.tracker.to_commit()
        if not offsets:
            return
        try:
            self.consumer.commit(offsets, timeout_ms=10_000)
        except Exception as e:  # rebalance in progress, coordinator moving: offered again next time
            metrics.OFFSET_COMMITS.labels(result="error").inc()
            log.warning("offset commit failed (will retry): %s: %s", type(e).__name__, e,
                        extra={"event": "commit_failed"})
            return
        self.tracker.committed(offsets)
        metrics.OFFSET_COMMITS.labels(result="ok").inc()

    def update_lag(self) -> None:
        for tp, pos in self.tracker.consumed_positions().items():
            hw = self.consumer.highwater(tp)
            if hw is not None:
                metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, hw - pos))

    # -- rebalance hooks (kafka-python's IO thread: no blocking consumer calls) ---------------------

    def on_assigned(self, tps: set[TopicPartition]) -> None:
        self.unassigned_since = None
        self.tracker.assign(tps)
        metrics.REBALANCES.labels(event="assigned").inc(len(tps))
        self.assigned_once.set()  # joined the group, even with an empty assignment
        log.info("partitions assigned", extra={"event": "assigned", "partitions": _names(tps)})

    def drained(self, tps: set[TopicPartition]) -> bool:
        """Nothing in flight for these partitions (the hooks wait for it before ``on_revoked``)."""
        return self.tracker.wait_drained(0.0, tps)

    def committing(self, tps: set[TopicPartition]) -> bool:
        """A batch transaction with these partitions' offsets is committing (exactly-once)."""
        return self.tracker.committing(tps)

    def revoke_wait_s(self) -> float:
        """How long a revoke may wait for in-flight work of the revoked partitions: none when
        the worker is closing (it drains on its own first)."""
        return 0.0 if self.closing else self._revoke_wait_s

    def on_revoked(self, tps: set[TopicPartition]) -> None:
        """Commit what finished for these partitions and drop the rest (the new owner redoes it).
        ``RebalanceHooks`` first waits up to ``revoke_wait_s()`` for ``drained(tps)`` without
        blocking the consumer's event loop."""
        if not tps:
            return
        offsets = self.tracker.to_commit(tps) if self.commits else {}
        if offsets and not self.closing:
            try:
                self.consumer.commit_async(offsets)
            except Exception as e:
                log.warning("commit on revoke failed: %s", e, extra={"event": "commit_failed"})
        self._forget(tps, "revoked")

    def on_lost(self, tps: set[TopicPartition]) -> None:
        self._forget(tps, "lost")  # no longer ours: committing would be refused anyway

    def rebalance_stalled(self, limit_s: float) -> bool:
        """Revoked (or lost) more than ``limit_s`` ago and not assigned since."""
        since = self.unassigned_since
        return since is not None and not self.closing and time.monotonic() - since > limit_s

    def _forget(self, tps: set[TopicPartition], why: str) -> None:
        if self.unassigned_since is None:
            self.unassigned_since = time.monotonic()
        dropped = self.tracker.revoke(tps, remember=why == "revoked")
        metrics.REBALANCES.labels(event=why).inc(len(tps))
        if dropped:
            metrics.DROPPED_ON_REVOKE.inc(dropped)
        for tp in tps:
            try:
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass
        log.info("partitions %s", why, extra={"event": why, "dropped_in_flight": dropped,
                                             "partitions": _names(tps)})
