"""Hot reload: watch the policy file and swap in valid new versions atomically.

Polls the file's bytes (a content hash, not mtime alone), and its bank files' stat, because Kubernetes
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
from moderator.decide.banks import fingerprint
from moderator.decide.engine import CompiledPolicy, DecisionEngine, bank_path
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
        *,
        name: str = "policy",
    ) -> None:
        self.name = name  # "policy" or "shadow policy": log lines and the reload counter say which
        self._reloads = metrics.SHADOW_POLICY_RELOADS if name == "shadow policy" else metrics.POLICY_RELOADS
        self.path = Path(path)
        self.engine = engine
        self.compile_fn = compile_fn
        self.interval_s = interval_s
        # the bank files of the last policy file read (in force or rejected): a rejected policy whose
        # bank file was missing or bad is tried again when that file changes
        self._bank_paths = ([cb.bank.path for cb in engine.policy.banks]
                            + [cp.bank.path for cp in engine.policy.pdq_banks])
        self._seen = self._digest(engine.policy.loaded.sha256)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> str:
        """Look at the file now. Returns 'unchanged', 'reloaded', 'rejected' or 'unreadable'."""
        try:
            data = self.path.read_bytes()
        except OSError as e:
            if self._seen != "unreadable":
                log.error("%s file %s unreadable (%s); keeping version %s",
                          self.name, self.path, e, self.engine.policy.version)
                self._reloads.labels(result="unreadable").inc()
            self._seen = "unreadable"
            return "unreadable"
        digest = hashlib.sha256(data).hexdigest()
        seen = self._digest(digest)
        if seen == self._seen:
            return "unchanged"
        self._seen = seen
        try:
            loaded = parse_policy(data, self.path)
            self._bank_paths = [bank_path(loaded, ref) for ref in (*loaded.doc.banks, *loaded.doc.pdq_banks)]
            self._seen = self._digest(digest)
            compiled = self.compile_fn(loaded)
        except ModeratorError as e:
            log.error("rejected new %s file, keeping version %s: %s", self.name, self.engine.policy.version, e)
            self._reloads.labels(result="rejected").inc()
            return "rejected"
        except Exception as e:  # a reader bug must still count as a rejection, not kill the watcher
            log.exception("rejected new %s file, keeping version %s: unexpected %s: %s", self.name,
                          self.engine.policy.version, type(e).__name__, e)
            self._reloads.labels(result="rejected").inc()
            return "rejected"
        old = self.engine.policy.version
        self.engine.swap(compiled)
        self._reloads.labels(result="reloaded").inc()
        log.warning("%s reloaded: version %s -> %s (sha256 %s)", self.name, old, compiled.version, digest[:12])
        return "reloaded"

    def _digest(self, policy_sha256: str) -> str:
        """The policy file's hash plus each of its banks' (inode, size, mtime): a bank file
        replaced under an unchanged policy reloads too, without hashing gigabytes every poll."""
        banks = [(str(p), fingerprint(p)) for p in self._bank_paths]
        return policy_sha256 if not banks else f"{policy_sha256}|{banks}"

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception:  # never let the watcher die silently
                log.exception("policy watcher failed; will retry")

    def start(self) -> "PolicyWatcher":
        self._thread = threading.Thread(target=self._run, name=f"{self.name.replace(' ', '-')}-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
