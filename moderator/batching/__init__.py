"""Batching stage: ``MicroBatcher`` groups events for the encoder.

A batch closes at ``max_batch`` items or ``max_wait_ms`` after its *first* item,
whichever comes first: a busy stream fills batches (throughput), a quiet one
never holds an event longer than ``max_wait_ms`` (latency). Memory is bounded
upstream: the consumer pauses fetching when too much is in flight.

Adaptive mode (``idle``): waiting only pays while the encoder is busy, since
items that arrive meanwhile ride the next batch for free. When ``idle()`` says
the stages downstream have nothing to do, whatever is waiting goes at once
(Triton's dynamic batcher does the same with ``max_queue_delay``); under load
the pipeline is never idle and batches fill to ``max_batch`` or the deadline.
The downstream stage calls ``wake()`` when it becomes idle so a waiting batch
does not sit out the rest of its deadline.

Work on arrival (``start``): each item's preparation (parse, decode, resize)
starts when it arrives, not when its batch closes, and a batch is the longest
*finished* prefix of the items in arrival order. The encoder then starts on the
first prepared images while later ones are still decoding, instead of waiting
for a whole batch to be prepared one image after the other; batches keep the
arrival order. The deadline counts from when a batch's first item is ready, and
"idle" also needs every item here prepared: while some are still being prepared
a batch waits for them (up to ``max_batch`` or the deadline), as small batches
cost throughput on a CPU that decodes and encodes on the same cores. At most
``ahead`` items are started and not yet taken (their decoded pixels are what is
held); later ones wait, unstarted, in arrival order.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Thread-safe: producers ``put``, one consumer calls ``get_batch``.

    Without ``start`` a batch is a list of the items put. With ``start`` (item -> Future),
    each item is started on arrival (or as soon as fewer than ``ahead`` are started and not
    taken), and a batch is the list of its futures' results, taken only once they are done.
    """

    def __init__(self, max_batch: int, max_wait_ms: float,
                 clock: Callable[[], float] = time.monotonic, *,
                 idle: Callable[[], bool] | None = None,
                 start: Callable[[T], Future] | None = None, ahead: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self._idle = idle
        self.max_wait_s = max(0.0, max_wait_ms / 1000.0)
        self._clock = clock
        self._start = start
        self.ahead = max(max_batch, ahead if ahead is not None else 4 * max_batch)
        # [ready time, item, its future or None]: started (or, without `start`, just put), in
        # arrival order; an item is ready once put (without `start`) or once its future is done
        self._items: deque[list] = deque()
        self._unstarted: deque[T] = deque()  # over `ahead`, in arrival order
        # reentrant: a start may finish its future at once, and its callback wakes us
        self._cond = threading.Condition(threading.RLock())
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items) + len(self._unstarted)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("MicroBatcher is closed")
            if self._start is None:
                self._items.append([self._clock(), item, None])
                if len(self._items) >= self.max_batch or len(self._items) == 1:
                    self._cond.notify_all()
            elif len(self._items) < self.ahead and not self._unstarted:
                self._launch(item)
            else:
                self._unstarted.append(item)

    def _launch(self, item: T) -> None:
        """Start ``item`` (under the lock, so the started items stay in arrival order)."""
        entry = [math.inf, item, None]  # its batch's deadline counts from when it is ready
        entry[2] = fut = self._start(item)
        self._items.append(entry)
        fut.add_done_callback(lambda _f: self._done(entry))

    def _done(self, entry: list) -> None:
        with self._cond:
            entry[0] = self._clock()
            # Wake the taker only when its decision can change: the head is ready (its deadline
            # starts), a full batch is ready, or everything here is (adaptive: nothing coming).
            # A wake-up per prepared item would hand the GIL back and forth for nothing.
            if self._items and (self._items[0] is entry or self._ready() in (self.max_batch, len(self._items))):
                self._cond.notify_all()

    def wake(self) -> None:
        """Downstream became idle: re-check whether a waiting batch can go now."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """No more puts; waiting items are released at once as final batches."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _ready(self) -> int:
        """How many items at the head can go (done, in arrival order), at most ``max_batch``."""
        n = 0
        for ready_at, _, _ in self._items:
            if n == self.max_batch or ready_at == math.inf:
                break
            n += 1
        return n

    def get_batch(self, timeout: float | None = None) -> list | None:
        """The next closed batch; ``[]`` on timeout; ``None`` once closed and empty."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                wait: float | None = None
                if self._items:
                    ready = self._ready()
                    if ready:  # (else: woken when the item at the head is ready)
                        due = self._items[0][0] + self.max_wait_s
                        now = self._clock()
                        if (ready >= self.max_batch or self._closed or now >= due
                                or (self._idle is not None and self._nothing_coming(ready) and self._idle())):
                            taken = self._take(ready)
                            break
                        wait = due - now
                elif self._closed:
                    return None
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        return []
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)
        # results outside the lock: a future that failed raises here, to the consumer
        return [item if fut is None else fut.result() for item, fut in taken]

    def _nothing_coming(self, ready: int) -> bool:
        """Every item here is ready: waiting would only wait for the next arrival. (While some
        are still being prepared, a batch waits for them, up to ``max_batch`` or the deadline:
        small batches on a CPU that decodes and encodes on the same cores cost throughput.)"""
        return ready == len(self._items) and not self._unstarted

    def _take(self, n: int) -> list[tuple[T, Future | None]]:
        taken = [self._items.popleft()[1:] for _ in range(n)]
        while self._unstarted and len(self._items) < self.ahead:
            self._launch(self._unstarted.popleft())
        return taken
