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
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Thread-safe: producers ``put``, one consumer calls ``get_batch``."""

    def __init__(self, max_batch: int, max_wait_ms: float,
                 clock: Callable[[], float] = time.monotonic, *,
                 idle: Callable[[], bool] | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self._idle = idle
        self.max_wait_s = max(0.0, max_wait_ms / 1000.0)
        self._clock = clock
        self._items: deque[tuple[float, T]] = deque()  # (arrival time, item)
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("MicroBatcher is closed")
            self._items.append((self._clock(), item))
            if len(self._items) >= self.max_batch or len(self._items) == 1:
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

    def get_batch(self, timeout: float | None = None) -> list[T] | None:
        """The next closed batch; ``[]`` on timeout; ``None`` once closed and empty."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._items:
                    due = self._items[0][0] + self.max_wait_s
                    if (len(self._items) >= self.max_batch or self._closed or self._clock() >= due
                            or (self._idle is not None and self._idle())):
                        return self._take()
                    wait = due - self._clock()
                elif self._closed:
                    return None
                else:
                    wait = None
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        return []
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def _take(self) -> list[T]:
        n = min(self.max_batch, len(self._items))
        return [self._items.popleft()[1] for _ in range(n)]
