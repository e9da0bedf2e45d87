"""CPU time by thread, from Linux's ``/proc/self/task``: what each part of the worker costs.

Python names its threads (``prepare_0``, ``encode``, ``fetch_3``, kafka-python's
``kafka-io-<client>`` and ``<client>-network-thread``); threads it did not start (ONNX
Runtime's pool, CUDA's) are ``native``. ``thread_label`` folds the names into a small,
fixed set of labels: pool indexes and client ids dropped. Unlike a sampling profiler, the
kernel's counters do not count a thread that waits in a system call as busy.

``ThreadCpu.update`` adds each live thread's CPU since the last update to
``moderator_thread_cpu_seconds_total{thread}`` (the ops server calls it before each
scrape): a counter that only grows, though threads come and go. A thread's last slice
before it ends is lost (it is gone from /proc at the next update). Elsewhere than Linux
there is no /proc: nothing is counted.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from moderator import metrics

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_INDEX = re.compile(r"[-_]\d+$")  # a pool's index: prepare_0, fetch-dns-3


def thread_label(name: str | None) -> str:
    """A thread's Python name -> its label (``None``: a thread Python did not start)."""
    if name is None:
        return "native"
    if name.endswith("-shadow-network-thread"):
        return "kafka-producer-shadow"
    if name.endswith("network-thread"):  # kafka-python's producer sender: <client id>-network-thread
        return "kafka-producer"
    if name.startswith("kafka-io"):  # kafka-python's network loop: kafka-io-<client id>
        return "kafka-io"
    if name.startswith("Thread-"):  # threading's default names: unnamed helpers
        return "other"
    return _INDEX.sub("", name)


def read_threads() -> list[tuple[int, int, str | None, float]]:
    """(thread id, start time in clock ticks, Python name or None, CPU seconds user + system)
    of each live thread of this process; ``[]`` without /proc."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return []
    out = []
    for task in tasks:
        try:
            # fields after the parenthesised command: state is [0], utime [11], stime [12], starttime [19]
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        tid = int(task.name)
        out.append((tid, int(fields[19]), names.get(tid), (int(fields[11]) + int(fields[12])) / _TICK))
    return out


def cpu_by_label(threads: list[tuple[int, int, str | None, float]] | None = None) -> dict[str, float]:
    """CPU seconds so far of the live threads, summed by label."""
    out: dict[str, float] = {}
    for _, _, name, seconds in read_threads() if threads is None else threads:
        label = thread_label(name)
        out[label] = out.get(label, 0.0) + seconds
    return out


class ThreadCpu:
    """Feeds ``moderator_thread_cpu_seconds_total``: each update adds what every live thread
    used since the previous one (a thread is its id and start time: ids are reused)."""

    def __init__(self, counter=metrics.THREAD_CPU, read=read_threads) -> None:
        self._counter, self._read = counter, read
        self._last: dict[tuple[int, int], float] = {}
        self._lock = threading.Lock()

    def update(self) -> None:
        with self._lock:
            seen: dict[tuple[int, int], float] = {}
            for tid, start, name, seconds in self._read():
                key = (tid, start)
                delta = seconds - self._last.get(key, 0.0)
                if delta > 0:
                    self._counter.labels(thread=thread_label(name)).inc(delta)
                seen[key] = max(seconds, self._last.get(key, 0.0))
            self._last = seen


__all__ = ["ThreadCpu", "cpu_by_label", "read_threads", "thread_label"]
