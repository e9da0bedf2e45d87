"""A throwaway ``redis-server`` on a free loopback port, stoppable and restartable.

Nothing is persisted (``--save '' --appendonly no``): a restart comes back
empty, like a cache node that was replaced. The port survives ``stop()`` /
``start()`` so clients holding ``url`` can reconnect -- that is what tests of
"Redis went away mid-stream" need.
"""

from __future__ import annotations

from pathlib import Path

from moderator.devservices._process import (
    LOOPBACK,
    ManagedProcess,
    Workdir,
    free_ports,
    require_executable,
    tail,
    wait_until,
)
from moderator.devservices.errors import ServiceStartError

_REDIS_HINT = "Install Redis (Debian/Ubuntu: apt-get install redis-server) or set REDIS_URL."


def redis_ready(url: str, timeout_s: float = 1.0) -> bool:
    """True when the server at ``url`` answers PING."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def wait_for_redis(url: str, timeout_s: float = 10.0) -> None:
    """Block until ``redis_ready``; raise ``ServiceStartError`` after ``timeout_s``."""
    if not wait_until(lambda: redis_ready(url), timeout=timeout_s, interval=0.1):
        raise ServiceStartError(f"No Redis answered PING at {url} within {timeout_s:.0f}s.")


class LocalRedis:
    """``redis-server`` child process bound to 127.0.0.1.

    Usage::

        with LocalRedis() as server:
            client = redis.Redis.from_url(server.url)
            server.stop()   # clients now get ConnectionError
            server.start()  # same port, empty dataset

    Args:
        port: fixed port; default a free one picked at the first ``start()``.
        startup_timeout: seconds to wait for PING.
        executable: the ``redis-server`` binary (name on PATH or a path).
    """

    def __init__(self, port: int | None = None, *, startup_timeout: float = 10.0,
                 executable: str = "redis-server") -> None:
        self.port = port
        self.startup_timeout = startup_timeout
        self.executable = executable
        self._workdir: Workdir | None = None
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("LocalRedis has no port until started")
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def workdir(self) -> Path | None:
        return self._workdir.path if self._workdir else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def start(self) -> LocalRedis:
        """Start (or restart, on the same port) the server and wait for PING."""
        if self.running:
            return self
        binary = require_executable(self.executable, _REDIS_HINT)
        if self.port is None:
            (self.port,) = free_ports(1)
        if self._workdir is None:
            self._workdir = Workdir("moderator-redis-")
        workdir = self._workdir.path
        self._process = ManagedProcess(
            [binary, "--port", str(self.port), "--bind", LOOPBACK,
             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            log_path=workdir / "redis.log", cwd=workdir)
        self._process.start()
        process = self._process
        if not wait_until(lambda: redis_ready(self.url, timeout_s=0.5), timeout=self.startup_timeout,
                          interval=0.05, abort=lambda: not process.running):
            code = process.returncode
            log = tail(workdir / "redis.log", 30)
            self.close()
            what = (f"redis-server exited with code {code}" if code is not None
                    else f"redis-server did not answer PING within {self.startup_timeout:.0f}s")
            raise ServiceStartError(f"{what} (port {self.port}).\n--- redis.log (tail) ---\n{log}")
        return self

    def stop(self) -> None:
        """Stop the server; ``start()`` brings it back on the same port."""
        self._stop_process()

    def close(self) -> None:
        """Stop the server and delete its working directory."""
        self._stop_process()
        if self._workdir is not None:
            self._workdir.remove()
            self._workdir = None

    def _stop_process(self) -> None:
        if self._process is not None:
            self._process.stop(timeout=5)
            self._process = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
