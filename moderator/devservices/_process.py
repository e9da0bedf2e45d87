"""Child-process plumbing shared by the local Kafka and Redis launchers."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from moderator.devservices.errors import ToolNotInstalledError

LOOPBACK = "127.0.0.1"


def cache_dir() -> Path:
    """Root of moderator's download cache: ``$MODERATOR_CACHE_DIR`` or ``~/.cache/moderator``."""
    configured = os.environ.get("MODERATOR_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "moderator"


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free on the loopback a moment ago.

    All sockets stay bound until every port is picked, so the ports differ from
    each other; another process can still take one before the caller binds it,
    which on a dev box or a CI runner is rare enough to accept.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Workdir:
    """A temp dir that sweeps up after runs that died without cleaning theirs.

    The owner holds an exclusive ``flock`` on ``.owner.lock`` for the dir's
    life. The kernel drops it when the owner dies, even by SIGKILL (whose
    children die too, see ``_set_parent_death_signal``), so a dir whose lock
    can be taken is an orphan. Unlike a pid check this also holds across PID
    namespaces sharing one /tmp.
    """

    _LOCK = ".owner.lock"

    def __init__(self, prefix: str) -> None:
        self._sweep(prefix)
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        # Lock first, then publish under the swept name: no window in which a
        # sweeper could find the lock file unlocked.
        pending = self.path / (self._LOCK + ".new")
        self._lock: IO[str] | None = open(pending, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        pending.rename(self.path / self._LOCK)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @classmethod
    def _sweep(cls, prefix: str) -> None:
        for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
            try:
                with open(stale / cls._LOCK) as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # alive (lock held), not ours, or already gone
            shutil.rmtree(stale, ignore_errors=True)


def tail(path: Path, lines: int = 60) -> str:
    """Last ``lines`` lines of a (log) file, or a note saying why there are none."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc.strerror}>"
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) if kept else f"<{path} is empty>"


def require_executable(name: str, hint: str) -> str:
    """Absolute path of ``name`` (a command or a path), or a clear error with an install hint."""
    found = name if os.sep in name and os.access(name, os.X_OK) else None
    found = found or shutil.which(name)
    if not found:
        raise ToolNotInstalledError(f"`{name}` was not found on PATH. {hint}")
    return found


def _parent_death_signal_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies.

    A test run killed with SIGKILL (CI timeout, OOM killer) skips every
    ``finally``; without this the JVM would outlive it holding 512 MB and a port.
    Linux only. libc is resolved here, in the parent: between fork and exec
    the child must not import or allocate much.
    """
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook


class ManagedProcess:
    """One long-running child: started detached from the terminal, logged to a file.

    ``start_new_session`` keeps a Ctrl-C in the terminal from reaching the child
    directly, so shutdown always goes through ``stop()`` (graceful first) and
    the order of teardown stays under the launcher's control.
    """

    def __init__(self, argv: Sequence[str], *, log_path: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        if self.running:
            return
        self._log = open(self.log_path, "ab")
        # The kernel ties the death signal to the forking *thread*: from a worker
        # thread it would fire when that thread ends, so only use it from main.
        on_main_thread = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_parent_death_signal_hook() if on_main_thread else None,
        )
        _live.add(self)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def kill(self) -> None:
        """SIGKILL now, as a crash would (no shutdown hooks); ``start()`` runs it again."""
        self.stop(timeout=0)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL (``timeout`` 0: SIGKILL at once)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None and timeout > 0:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        _live.discard(self)


# Every running child, so a plain interpreter exit (no context-manager exit,
# e.g. `python -c` or a crashed fixture) still takes the children down.
_live: set[ManagedProcess] = set()


@atexit.register
def _stop_all() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.stop(timeout=5)


def wait_until(check: Callable[[], object], *, timeout: float, interval: float = 0.2,
               abort: Callable[[], object] | None = None) -> bool:
    """Poll ``check()`` until it is truthy (True) or ``timeout`` passes (False).

    ``abort()`` is polled too; when it returns truthy the wait stops at once (False).
    """
    deadline = time.monotonic() + timeout
    while True:
        if abort is not None and abort():
            return False
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
