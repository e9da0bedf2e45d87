"""Batching stage: ``MicroBatcher`` groups events for the encoder.

A batch closes at ``max_batch`` items or ``max_wait_ms`` after its *first* item,
whichever comes first: a busy stream fills batches (throughput), a quiet one
never holds an event longer than ``max_wait_ms`` (latency). Memory is bounded
upstream: the consumer pauses fetching when too much is in flight.
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
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
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
                    if len(self._items) >= self.max_batch or self._closed or self._clock() >= due:
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
