"""At-least-once bookkeeping: which offsets may be committed.

Every consumed record is tracked until all records derived from it are
acknowledged. The committable position of a partition is the first offset not yet
done, so a slow record holds back the commit of everything after it and a crash
replays from there (duplicates, never loss).

Partitions carry an *epoch* that changes whenever they are assigned or revoked.
Work that started under an older epoch can still finish (its outputs are
published) but it is never committed: after a rebalance the new owner starts
from the last commit and redoes it.

That includes this worker when a rebalance hands it back the partitions it just
gave up: kafka-python 3 keeps a partition's fetch position across a rebalance that
leaves it with the same member, so without a seek the records dropped at the revoke
would be skipped. ``revoke`` remembers where each partition must be redone from
(the first offset not done), the next ``assign`` turns that into a pending rewind,
and the consumer thread seeks there (``pending_rewinds`` / ``rewound``) before it
tracks anything of the partition again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from kafka.structs import OffsetAndMetadata, TopicPartition


@dataclass
class _Partition:
    epoch: int
    order: deque = field(default_factory=deque)  # offsets in consumption order
    sizes: dict = field(default_factory=dict)  # offset -> value bytes, while pending
    done: set = field(default_factory=set)
    position: int | None = None  # next offset to commit (all below are done)
    committed: int | None = None  # last position handed to a commit
    consumed: int | None = None  # next offset to consume
    rewind_to: int | None = None  # exactly-once: seek here before tracking anything (an aborted batch)


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}
        self._epoch = 0
        self._cond = threading.Condition()
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._redo: dict[TopicPartition, int] = {}  # revoked -> redo from here if assigned back at once
        self._committing: set[TopicPartition] = set()  # exactly-once: in a transaction's commit

    # -- assignment --------------------------------------------------------------------

    def assign(self, tps: Iterable[TopicPartition]) -> None:
        with self._cond:
            for tp in tps:
                self._epoch += 1
                # given back at once: the consumer kept its position, which may be past dropped work
                self._parts[tp] = _Partition(self._epoch, rewind_to=self._redo.get(tp))
            self._redo.clear()  # a partition that went elsewhere starts from the group's commit

    def revoke(self, tps: Iterable[TopicPartition], *, remember: bool = True) -> int:
        """Forget the partitions; returns how many records were still pending. ``remember``:
        where each must be redone from, should the next assignment give it straight back."""
        dropped = 0
        with self._cond:
            for tp in tps:
                p = self._parts.pop(tp, None)
                if p is None:
                    continue
                redo = p.rewind_to if p.rewind_to is not None else p.position
                if remember and redo is not None:
                    self._redo[tp] = redo
                pending = len(p.sizes)
                dropped += pending
                self._in_flight -= pending
                self._in_flight_bytes -= sum(p.sizes.values())
            self._cond.notify_all()
        return dropped

    def rewind(self, firsts: dict[TopicPartition, int]) -> None:
        """An aborted transaction: each partition starts again at its offset under a new epoch
        (work of the old epoch still in the pipeline is dropped, unpublished), and records are
        ignored until the consumer thread has seeked there (``pending_rewinds``/``rewound``)."""
        with self._cond:
            for tp, offset in firsts.items():
                p = self._parts.get(tp)
                if p is None:
                    continue
                self._in_flight -= len(p.sizes)
                self._in_flight_bytes -= sum(p.sizes.values())
                self._epoch += 1
                self._parts[tp] = _Partition(self._epoch, rewind_to=offset)
            self._cond.notify_all()

    def begin_commit(self, items: Iterable[tuple[TopicPartition, int]]) -> bool:
        """Exactly-once: every (partition, epoch) still live? Then mark the partitions as
        committing, atomically with that check, until ``end_commit``: a revoke waits for them
        (``committing``), so it cannot take a redo point from before a batch that commits."""
        with self._cond:
            items = list(items)
            if not all((p := self._parts.get(tp)) is not None and p.epoch == epoch for tp, epoch in items):
                return False
            self._committing.update(tp for tp, _ in items)
            return True

    def end_commit(self) -> None:
        with self._cond:
            self._committing.clear()
            self._cond.notify_all()

    def committing(self, tps: Iterable[TopicPartition]) -> bool:
        with self._cond:
            return any(tp in self._committing for tp in tps)

    def pending_rewinds(self) -> dict[TopicPartition, int]:
        with self._cond:
            return {tp: p.rewind_to for tp, p in self._parts.items() if p.rewind_to is not None}

    def rewound(self, tp: TopicPartition, offset: int) -> None:
        """The consumer has seeked ``tp`` to ``offset``: track its records again."""
        with self._cond:
            p = self._parts.get(tp)
            if p is not None and p.rewind_to == offset:
                p.rewind_to = None

    def assigned(self) -> set[TopicPartition]:
        with self._cond:
            return set(self._parts)

    # -- records -------------------------------------------------------------------------

    def track(self, tp: TopicPartition, offset: int, nbytes: int = 0) -> int | None:
        """Register a consumed record; returns its epoch, or None if the partition is not ours."""
        with self._cond:
            p = self._parts.get(tp)
            if p is None or p.rewind_to is not None:  # not ours, or fetched before a pending rewind's seek
                return None
            if offset in p.sizes or offset in p.done or (p.position is not None and offset < p.position):
                return None  # delivered again within this assignment (a reset or seek): already handled
            if p.position is None:  # where this assignment started: nothing new to commit yet
                p.position = p.committed = offset
            p.order.append(offset)
            p.sizes[offset] = nbytes
            p.consumed = offset + 1
            self._in_flight += 1
            self._in_flight_bytes += nbytes
            return p.epoch

    def is_live(self, tp: TopicPartition, epoch: int) -> bool:
        with self._cond:
            p = self._parts.get(tp)
            return p is not None and p.epoch == epoch

    def done(self, tp: TopicPartition, offset: int, epoch: int) -> bool:
        """Mark a record fully acknowledged. False when it belongs to a stale epoch."""
        with self._cond:
            p = self._parts.get(tp)
            if p is None or p.epoch != epoch or offset not in p.sizes:
                return False
            self._in_flight -= 1
            self._in_flight_bytes -= p.sizes.pop(offset)
            p.done.add(offset)
            while p.order and p.order[0] in p.done:
                p.done.discard(p.order[0])
                p.position = p.order.popleft() + 1
            self._cond.notify_all()
            return True

    # -- commits ----------------------------------------------------------------------------

    def to_commit(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, OffsetAndMetadata]:
        """Positions that moved since the last call (for the given partitions, or all)."""
        out = {}
        with self._cond:
            for tp in (self._parts if tps is None else tps):
                p = self._parts.get(tp)
                if p is None or p.position is None or p.position == p.committed:
                    continue
                out[tp] = OffsetAndMetadata(p.position, "", -1)
        return out

    def committed(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        with self._cond:
            for tp, om in offsets.items():
                p = self._parts.get(tp)
                if p is not None:
                    p.committed = om.offset

    def uncommit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """A commit failed: offer these positions again next time."""
        with self._cond:
            for tp, om in offsets.items():
                p = self._parts.get(tp)
                if p is not None and p.committed == om.offset:
                    p.committed = None

    # -- waiting and stats ----------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def in_flight_bytes(self) -> int:
        return self._in_flight_bytes

    def pending(self, tps: Iterable[TopicPartition] | None = None) -> int:
        with self._cond:
            if tps is None:
                return self._in_flight
            return sum(len(self._parts[tp].sizes) for tp in tps if tp in self._parts)

    def wait_drained(self, timeout_s: float, tps: Iterable[TopicPartition] | None = None) -> bool:
        tps = None if tps is None else list(tps)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                left = (self._in_flight if tps is None
                        else sum(len(self._parts[tp].sizes) for tp in tps if tp in self._parts))
                if left == 0:
                    return True
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return False
                self._cond.wait(min(wait, 0.1))

    def consumed_positions(self) -> dict[TopicPartition, int]:
        with self._cond:
            return {tp: p.consumed for tp, p in self._parts.items() if p.consumed is not None}
