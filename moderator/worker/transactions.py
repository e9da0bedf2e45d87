"""Exactly-once (``MODERATOR_PROCESSING_GUARANTEE=exactly_once``): one Kafka transaction per batch.

The encode thread runs each batch as: begin -> publish its decisions and dead letters ->
flush, and check that every record was acknowledged (kafka-python can commit a
transaction in which a send finally failed) -> send the offsets that follow the batch's
inputs, with the consumer's group metadata (generation and member id: a worker that has
lost its partitions in a rebalance is refused, KIP-447) -> commit. Only then are the
batch's inputs done. Outputs and offsets become visible together, to readers with
``isolation.level=read_committed``, or not at all.

Anything failing aborts the transaction: nothing of the batch is visible to
read_committed readers, and its partitions are rewound to the batch's first offsets
(``OffsetTracker.rewind``: a new epoch, so later batches of those partitions already in
the pipeline are dropped unpublished, and the consumer thread seeks back before it
polls again). The batch is then decided again. An abort that fails, a fenced producer
(another live worker with the same transactional id), a call that does not return within
the transaction timeout, or ``max_aborts`` aborts in a row stop the worker (exit 1): it
restarts from the last committed offsets, which is still exactly-once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kafka.structs import OffsetAndMetadata, TopicPartition

from moderator import metrics
from moderator.errors import DeliveryError

if TYPE_CHECKING:
    from moderator.worker.offsets import OffsetTracker
    from moderator.worker.pipeline import Prepared

log = logging.getLogger(__name__)


class _Abort(Exception):
    """This batch's transaction must abort (then its partitions rewind and it is redone)."""


def bounded(fn: Callable[[], object], timeout_s: float, what: str) -> object:
    """``fn()`` on a helper thread, waited for at most ``timeout_s``: kafka-python's
    ``commit_transaction``, ``abort_transaction`` and ``send_offsets_to_transaction`` wait
    without a timeout, and a broker that never answers must not hang the encode thread."""
    out: dict[str, object] = {}

    def call() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    t = threading.Thread(target=call, name=f"txn-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise DeliveryError(f"{what} did not return within {timeout_s:.0f} s")
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


class BatchTransactions:
    """Runs each batch's publishing inside one transaction of ``producer`` (transactional)."""

    def __init__(self, producer, group_metadata: Callable[[], object], tracker: OffsetTracker, *,
                 timeout_s: float, max_aborts: int = 5,
                 on_done: Callable[[list[Prepared]], None]) -> None:
        self.producer = producer
        self.group_metadata = group_metadata
        self.tracker = tracker
        self.timeout_s = timeout_s
        self.max_aborts = max_aborts
        self.on_done = on_done
        self.send_error: BaseException | None = None  # set by the pipeline's send-failure callback
        self._aborts_in_a_row = 0

    def init(self) -> None:
        """Register the transactional id with its coordinator; this fences an older producer
        with the same id (a worker that was replaced) and ends its open transaction."""
        bounded(self.producer.init_transactions, max(60.0, self.timeout_s), "init_transactions")

    def send_failed(self, err: Exception) -> None:
        if self.send_error is None:
            self.send_error = err

    def run(self, prepared: list[Prepared], publish: Callable[[], None]) -> None:
        """``publish()`` sends the batch's outputs; they commit with the batch's offsets, or the
        batch is rewound. Raises ``DeliveryError`` when the worker must stop."""
        from kafka.errors import ProducerFencedError  # noqa: PLC0415

        self.send_error = None
        self._committed = False
        started = time.perf_counter()
        try:
            self.producer.begin_transaction()
            publish()
            published = [p for p in prepared if p.published]
            if not published:  # nothing was ours any more (revoked): nothing to commit
                bounded(self.producer.abort_transaction, self.timeout_s, "abort_transaction")
                return
            self._commit(published)
        except ProducerFencedError as e:
            metrics.TRANSACTIONS.labels(result="fenced").inc()
            raise DeliveryError(f"the producer was fenced: another worker uses this transactional id ({e})") from e
        except DeliveryError:
            # the worker stops: end the transaction now if the broker lets us, rather than leave
            # read_committed readers waiting for the transaction timeout
            with contextlib.suppress(Exception):
                bounded(self.producer.abort_transaction, 5.0, "abort_transaction")
            raise
        except Exception as e:  # noqa: BLE001 - abort, rewind, redo
            self._abort(prepared, e)
            return
        self._aborts_in_a_row = 0
        metrics.TRANSACTIONS.labels(result="committed").inc()
        metrics.TRANSACTION_SECONDS.observe(time.perf_counter() - started)
        try:
            self.on_done(published)  # the inputs are done (their redo point moves past them) ...
        finally:
            self.tracker.end_commit()  # ... before a waiting revoke may take it

    def _commit(self, published: list[Prepared]) -> None:
        bounded(self.producer.flush, self.timeout_s, "flush")  # kafka-python's own timeout is per batch
        if self.send_error is not None:
            raise _Abort(f"a send failed: {type(self.send_error).__name__}: {self.send_error}")
        if not all(p.acked for p in published):
            raise _Abort("not every output record was acknowledged")
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for p in published:
            tp, offset = p.item.tp, p.item.source.offset
            if tp not in offsets or offsets[tp].offset <= offset:
                offsets[tp] = OffsetAndMetadata(offset + 1, "", -1)
        # The group's generation first, then the liveness check: a revoke always precedes the
        # generation that follows it, so partitions live after this snapshot belong to it, and
        # the broker refuses these offsets if the group has moved on meanwhile.
        group = self.group_metadata()
        if getattr(group, "generation_id", -1) < 0 or not getattr(group, "member_id", ""):
            raise _Abort("the consumer is not a member of its group right now (rebalancing)")
        if not self.tracker.begin_commit((p.item.tp, p.item.epoch) for p in published):
            raise _Abort("a partition of the batch was revoked during it")
        try:
            bounded(lambda: self.producer.send_offsets_to_transaction(offsets, group), self.timeout_s,
                    "send_offsets_to_transaction")
            bounded(self.producer.commit_transaction, self.timeout_s, "commit_transaction")
            self._committed = True
        finally:
            if not self._committed:
                self.tracker.end_commit()  # aborting: a revoke may go ahead (run() ends it after on_done)

    def _abort(self, prepared: list[Prepared], err: Exception) -> None:
        self._aborts_in_a_row += 1
        metrics.TRANSACTIONS.labels(result="aborted").inc()
        try:
            bounded(self.producer.abort_transaction, self.timeout_s, "abort_transaction")
        except Exception as e:
            raise DeliveryError(f"a transaction could not be aborted ({type(e).__name__}: {e}) after "
                                f"{type(err).__name__}: {err}") from e
        firsts: dict[TopicPartition, int] = {}
        for p in prepared:
            tp = p.item.tp
            if self.tracker.is_live(tp, p.item.epoch):
                firsts[tp] = min(firsts.get(tp, p.item.source.offset), p.item.source.offset)
        self.tracker.rewind(firsts)
        log.warning("transaction aborted (%s: %s); %d partitions rewound to redo the batch",
                    type(err).__name__, err, len(firsts),
                    extra={"event": "transaction_aborted", "partitions": sorted(
                        f"{tp.topic}/{tp.partition}@{o}" for tp, o in firsts.items())})
        if self._aborts_in_a_row >= self.max_aborts:
            raise DeliveryError(f"{self._aborts_in_a_row} transactions aborted in a row; last: "
                                f"{type(err).__name__}: {err}")
