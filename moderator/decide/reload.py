"""Hot reload: watch the policy file and swap in valid new versions atomically.

Polls the file's bytes (a content hash, not mtime alone) because Kubernetes
updates ConfigMap mounts by swapping a symlink, which inotify on the file misses.
A new version is validated and its embeddings fetched or computed *before* the
swap; an invalid file is logged and counted, and the old policy stays in force.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Callable

from moderator import metrics
from moderator.decide.engine import CompiledPolicy, DecisionEngine
from moderator.decide.policy import LoadedPolicy, parse_policy
from moderator.errors import ModeratorError

log = logging.getLogger(__name__)


class PolicyWatcher:
    def __init__(
        self,
        path: Path | str,
        engine: DecisionEngine,
        compile_fn: Callable[[LoadedPolicy], CompiledPolicy],
        interval_s: float = 2.0,
    ) -> None:
        self.path = Path(path)
        self.engine = engine
        self.compile_fn = compile_fn
        self.interval_s = interval_s
        self._seen = engine.policy.loaded.sha256
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> str:
        """Look at the file now. Returns 'unchanged', 'reloaded', 'rejected' or 'unreadable'."""
        try:
            data = self.path.read_bytes()
        except OSError as e:
            if self._seen != "unreadable":
                log.error("policy file %s unreadable (%s); keeping version %s",
                          self.path, e, self.engine.policy.version)
                metrics.POLICY_RELOADS.labels(result="unreadable").inc()
            self._seen = "unreadable"
            return "unreadable"
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._seen:
            return "unchanged"
        self._seen = digest
        try:
            loaded = parse_policy(data, self.path)
            compiled = self.compile_fn(loaded)
        except ModeratorError as e:
            log.error("rejected new policy file, keeping version %s: %s", self.engine.policy.version, e)
            metrics.POLICY_RELOADS.labels(result="rejected").inc()
            return "rejected"
        old = self.engine.policy.version
        self.engine.swap(compiled)
        metrics.POLICY_RELOADS.labels(result="reloaded").inc()
        log.warning("policy reloaded: version %s -> %s (sha256 %s)", old, compiled.version, digest[:12])
        return "reloaded"

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception:  # never let the watcher die silently
                log.exception("policy watcher failed; will retry")

    def start(self) -> "PolicyWatcher":
        self._thread = threading.Thread(target=self._run, name="policy-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
