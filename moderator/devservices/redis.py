"""A throwaway ``redis-server`` on a free loopback port, stoppable and restartable.

Nothing is persisted (``--save '' --appendonly no``): a restart comes back
empty, like a cache node that was replaced. The port survives ``stop()`` /
``start()`` so clients holding ``url`` can reconnect -- that is what tests of
"Redis went away mid-stream" need.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
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
from moderator.devservices.tls import TestPki

_REDIS_HINT = "Install Redis (Debian/Ubuntu: apt-get install redis-server) or set REDIS_URL."


def redis_ready(url: str, timeout_s: float = 1.0, options: Mapping[str, object] | None = None) -> bool:
    """True when the server at ``url`` answers PING (``options``: user, password, TLS files)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                  **dict(options or {}))
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
        tls: serve TLS only (``rediss://``), with a throwaway CA (``TestPki``, in the workdir);
            clients need ``client_options()``.
        users: ACL users (name -> password; any characters but spaces and quotes), allowed
            ``acl`` on keys ``moderator:*``. Set: the ``default`` user is switched off, and a
            user ``admin`` (``admin_password``) may do anything, for tests to look inside.
        acl: the ACL rules of ``users``.
    """

    def __init__(self, port: int | None = None, *, startup_timeout: float = 10.0,
                 executable: str = "redis-server", tls: bool = False, users: Mapping[str, str] | None = None,
                 acl: str = "~moderator:* +@read +@write +@transaction +@connection") -> None:
        self.port = port
        self.startup_timeout = startup_timeout
        self.executable = executable
        self.tls = tls
        self.users = dict(users or {})
        self.acl = acl
        self.admin_password = secrets.token_urlsafe(16)
        self.pki: TestPki | None = None
        self._workdir: Workdir | None = None
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("LocalRedis has no port until started")
        return f"{'rediss' if self.tls else 'redis'}://{LOOPBACK}:{self.port}/0"

    def client_options(self, user: str | None = None, *, password: str | None = None,
                       cafile: Path | None = None) -> dict:
        """redis-py keyword arguments: ``user`` (default the first of ``users``; ``"admin"``:
        the all-powerful one) with its password unless ``password``, and with TLS the CA
        unless ``cafile``. A server without users or TLS: ``{}``."""
        kw: dict = {}
        if self.users:
            user = user or next(iter(self.users))
            known = self.admin_password if user == "admin" else self.users.get(user, "")
            kw.update(username=user, password=known if password is None else password)
        if self.tls:
            if self.pki is None:
                raise RuntimeError("LocalRedis is not started")
            kw["ssl_ca_certs"] = str(cafile or self.pki.ca_cert)
        return kw

    def settings_env(self, user: str | None = None, **overrides: object) -> dict[str, str]:
        """``MODERATOR_REDIS_*`` variables pointing a worker at this server as ``user``."""
        kw = self.client_options(user, **overrides)  # type: ignore[arg-type]
        names = {"username": "REDIS_USERNAME", "password": "REDIS_PASSWORD", "ssl_ca_certs": "REDIS_SSL_CA_FILE"}
        return {"MODERATOR_REDIS_URL": self.url, **{f"MODERATOR_{names[k]}": str(v) for k, v in kw.items()}}

    def _config_file(self, workdir: Path) -> Path:
        """TLS and ACL settings in a config file: passwords need no escaping for a shell."""
        lines = []
        if self.tls:
            if self.pki is None:
                self.pki = TestPki.create(workdir / "tls")
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {self.pki.server_cert}",
                      f"tls-key-file {self.pki.server_key}", f"tls-ca-cert-file {self.pki.ca_cert}",
                      "tls-auth-clients no"]
        else:
            lines.append(f"port {self.port}")
        if self.users:
            lines += ["user default off", f"user admin on >{self.admin_password} ~* &* +@all"]
            for name, password in self.users.items():
                if any(c.isspace() or c in "\"'" for c in name + password) or name in ("default", "admin"):
                    raise ValueError(f"Redis user {name!r}: no spaces or quotes, and not default or admin")
                lines.append(f"user {name} on >{password} {self.acl}")
        path = workdir / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

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
            [binary, str(self._config_file(workdir)), "--bind", LOOPBACK,
             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            log_path=workdir / "redis.log", cwd=workdir)
        self._process.start()
        process = self._process
        probe = self.client_options("admin") if self.users else self.client_options()
        if not wait_until(lambda: redis_ready(self.url, timeout_s=0.5, options=probe), timeout=self.startup_timeout,
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
            self.pki = None  # its files went with the workdir

    def _stop_process(self) -> None:
        if self._process is not None:
            self._process.stop(timeout=5)
            self._process = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
