"""``UrlFetcher``: image bytes from an http(s) URL, with SSRF defences.

For every hop (the first request and each redirect):

1. parse the URL (urllib3's parser); only ``http``/``https``, no credentials;
2. refuse metadata host names, then resolve the host and refuse the URL if
   *any* address it resolves to is not public (``AddressPolicy``);
3. connect to the vetted address itself -- never re-resolve, so DNS rebinding
   between check and connect cannot redirect the request -- sending the
   original ``Host`` header and, for https, SNI + certificate checks against
   the original host name.

Connect and read timeouts per hop; one deadline for the whole fetch -- DNS, every
hop, headers and body -- enforced on the socket itself (a server that drips its
headers or body a byte at a time within the read timeout is cut off at the
deadline); DNS lookups with their own timeout on a bounded pool of threads; a
byte cap checked against ``Content-Length`` and while streaming, ``identity``
encoding only (no decompression bombs), and at most ``max_redirects`` redirects.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import queue
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urljoin

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import LocationParseError, NewConnectionError, ProtocolError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util import parse_url

from moderator.errors import (
    FetchError,
    FetchHttpStatus,
    FetchTimeout,
    InvalidUrl,
    PayloadTooLarge,
    TooManyRedirects,
    UrlAddressBlocked,
    UrlSchemeNotAllowed,
    UrlUnresolvable,
)
from moderator.fetch.guard import AddressPolicy, IPAddress

ALLOWED_SCHEMES = ("http", "https")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_URL_LENGTH = 4096

Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (getaddrinfo, TCP)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass(frozen=True)
class FetchLimits:
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 5.0
    total_timeout_s: float = 10.0
    max_bytes: int = 10 * 1024 * 1024
    max_redirects: int = 3
    user_agent: str = "moderator/0.1"
    dns_timeout_s: float = 2.0


class _Deadlines:
    """One thread that shuts down sockets whose fetch deadline has passed.

    Socket timeouts bound each read, not a response: a server that sends a byte every
    second never trips a 5 s read timeout. Shutting the socket down at the deadline wakes
    the blocked read, whatever http.client / urllib3 is doing at that moment.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._live: set[int] = set()
        self._fired: set[int] = set()
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, deadline: float) -> int:
        token = next(self._seq)
        with self._cv:
            heapq.heappush(self._heap, (deadline, token, sock))
            self._live.add(token)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            self._cv.notify()
        return token

    def disarm(self, token: int) -> bool:
        """Stop watching; True when the deadline had already shut the socket down (whatever
        the read then returned -- a cut-off header block can parse as a complete response)."""
        with self._cv:
            self._live.discard(token)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def _run(self) -> None:
        with self._cv:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._cv.wait()
                    continue
                deadline, token, sock = self._heap[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                heapq.heappop(self._heap)
                self._live.discard(token)
                self._fired.add(token)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed


_DEADLINES = _Deadlines()


class _LookupPool:
    """At most ``threads`` daemon threads running DNS lookups. Not a ThreadPoolExecutor: its
    threads are joined at interpreter exit, so one hung getaddrinfo would hold up shutdown."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._started = 0
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        with self._lock:
            if self._idle == 0 and self._started < self.threads:
                self._started += 1
                threading.Thread(target=self._work, name=f"fetch-dns-{self._started}", daemon=True).start()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            future, fn, args = self._jobs.get()
            with self._lock:
                self._idle -= 1
            if future.set_running_or_notify_cancel():  # False: its caller gave up while it queued
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # handed to the waiting caller
                    future.set_exception(e)


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # as written in the URL (name or literal), no brackets
    port: int
    address: str  # the vetted IP we connect to
    request_uri: str
    host_header: str


class UrlFetcher:
    def __init__(self, limits: FetchLimits = FetchLimits(), policy: AddressPolicy | None = None,
                 resolver: Resolver = system_resolver, dns_threads: int = 8) -> None:
        self.limits = limits
        self.policy = policy or AddressPolicy()
        self.resolver = resolver
        # getaddrinfo has no timeout and cannot be cancelled: lookups run on a bounded pool and
        # the caller stops waiting at dns_timeout_s. A resolver that hangs ties up at most
        # dns_threads threads; later lookups queue behind them and time out the same way.
        # (The system resolver keeps /etc/hosts and nsswitch, which a DNS client library would not.)
        self.dns_threads = dns_threads
        self._dns = _LookupPool(dns_threads)

    # -- checks (no network) ------------------------------------------------------

    def vet(self, url: str, deadline: float | None = None) -> _Target:
        """Everything short of connecting: parse, scheme, host, resolve, address policy.
        ``deadline`` (time.monotonic()): the whole fetch's, which the DNS lookup counts against."""
        if not isinstance(url, str) or not url.strip():
            raise InvalidUrl("empty URL")
        if len(url) > MAX_URL_LENGTH:
            raise InvalidUrl(f"URL is {len(url)} characters, over {MAX_URL_LENGTH}")
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
            raise InvalidUrl("URL contains whitespace or control characters")
        try:
            u = parse_url(url)
        except LocationParseError as e:
            raise InvalidUrl(f"unparseable URL: {e}") from None
        scheme = (u.scheme or "").lower()
        if scheme not in ALLOWED_SCHEMES:
            raise UrlSchemeNotAllowed(f"scheme {scheme or '(none)'!r} is not allowed (http, https only)")
        if u.auth:
            raise InvalidUrl("credentials in URLs are not accepted")
        host = (u.host or "").strip("[]")
        if not host:
            raise InvalidUrl("URL has no host")
        port = u.port or (443 if scheme == "https" else 80)
        if not 0 < port < 65536:
            raise InvalidUrl(f"port {port} is out of range")
        self.policy.check_host(host)
        addresses = self._resolve(host, port, deadline)
        for addr in addresses:  # every address must pass, not just the first
            self.policy.check(host, addr)
        default_port = port == (443 if scheme == "https" else 80)
        host_in_header = f"[{host}]" if ":" in host else host
        return _Target(scheme, host, port, str(addresses[0]), u.request_uri or "/",
                       host_in_header if default_port else f"{host_in_header}:{port}")

    def _lookup(self, host: str, port: int, deadline: float | None) -> list[str]:
        wait = self.limits.dns_timeout_s
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
        if wait <= 0:
            raise FetchTimeout(f"fetch exceeded {self.limits.total_timeout_s}s")
        future = self._dns.submit(self.resolver, host, port)
        try:
            return future.result(timeout=wait)
        except FutureTimeout:
            future.cancel()  # still queued: never runs; running: its thread finishes on its own
            if wait < self.limits.dns_timeout_s:
                raise FetchTimeout(f"fetch exceeded {self.limits.total_timeout_s}s resolving {host!r}") from None
            raise UrlUnresolvable(f"DNS did not answer for {host!r} within {wait:g}s") from None

    def _resolve(self, host: str, port: int, deadline: float | None = None) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host.split("%", 1)[0])]
        except ValueError:
            pass
        try:  # legacy numeric IPv4 forms resolvers accept: 2130706433, 0x7f.1, 0177.0.0.1
            return [ipaddress.IPv4Address(socket.inet_aton(host))]
        except OSError:
            pass
        try:
            raw = self._lookup(host, port, deadline)
        except (socket.gaierror, UnicodeError, OSError) as e:
            raise UrlUnresolvable(f"cannot resolve {host!r}: {e}") from None
        out = []
        for a in raw:
            try:
                out.append(ipaddress.ip_address(a.split("%", 1)[0]))
            except ValueError:
                raise UrlUnresolvable(f"{host!r} resolved to a non-address {a!r}") from None
        if not out:
            raise UrlUnresolvable(f"{host!r} resolved to no address")
        return out

    # -- fetching -------------------------------------------------------------------------

    def fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self.limits.total_timeout_s
        current = url
        for _hop in range(self.limits.max_redirects + 1):
            target = self.vet(current, deadline)
            status, location, body = self._get(target, deadline)
            if status in REDIRECT_STATUSES:
                if not location:
                    raise FetchHttpStatus(f"HTTP {status} redirect without a Location header")
                current = urljoin(current, location)
                continue
            if status != 200:
                raise FetchHttpStatus(f"HTTP {status} from {target.host}")
            return body  # type: ignore[return-value]
        raise TooManyRedirects(f"more than {self.limits.max_redirects} redirects (last: {current[:200]})")

    def _get(self, t: _Target, deadline: float) -> tuple[int, str | None, bytes | None]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchTimeout(f"fetch exceeded {self.limits.total_timeout_s}s")
        connect_s = min(self.limits.connect_timeout_s, left)
        if t.scheme == "https":
            conn: HTTPConnection = HTTPSConnection(t.address, t.port, timeout=connect_s, cert_reqs="CERT_REQUIRED",
                                                   assert_hostname=t.host, server_hostname=t.host)
        else:
            conn = HTTPConnection(t.address, t.port, timeout=connect_s)
        headers = {"Host": t.host_header, "User-Agent": self.limits.user_agent,
                   "Accept": "image/*", "Accept-Encoding": "identity"}
        token = None
        try:
            conn.connect()
            conn.sock.settimeout(min(self.limits.read_timeout_s, max(0.001, deadline - time.monotonic())))
            token = _DEADLINES.arm(conn.sock, deadline)
            conn.request("GET", t.request_uri, headers=headers, preload_content=False, decode_content=False)
            resp = conn.getresponse()
            try:
                if resp.status in REDIRECT_STATUSES:
                    out = resp.status, resp.headers.get("Location"), None
                elif resp.status != 200:
                    out = resp.status, None, None
                else:
                    out = 200, None, self._read_capped(resp, deadline)
            finally:
                resp.close()
            fired, token = _DEADLINES.disarm(token), None
            if fired:
                raise FetchTimeout(f"fetch exceeded {self.limits.total_timeout_s}s")
            return out
        except FetchError:
            raise
        except NewConnectionError as e:  # (a ConnectTimeoutError subclass in urllib3 2, but not a timeout)
            raise FetchError(f"cannot connect to {t.host}:{t.port}: {e}") from None
        except (Urllib3Timeout, TimeoutError) as e:
            raise FetchTimeout(f"timed out fetching from {t.host}: {e}") from None
        except (Urllib3Error, ProtocolError, OSError, ValueError) as e:  # ValueError: http.client on garbage
            if (token is not None and _DEADLINES.disarm(token)) or time.monotonic() >= deadline:
                raise FetchTimeout(f"fetch exceeded {self.limits.total_timeout_s}s") from None  # cut off mid-read
            raise FetchError(f"cannot fetch from {t.host}: {type(e).__name__}: {e}") from None
        finally:
            if token is not None:
                _DEADLINES.disarm(token)
            conn.close()

    def _read_capped(self, resp, deadline: float) -> bytes:
        cap = self.limits.max_bytes
        length = resp.headers.get("Content-Length")
        if length is not None:
            try:
                if int(length) > cap:
                    raise PayloadTooLarge(f"Content-Length {int(length)} is over the {cap} byte cap")
            except ValueError:
                raise FetchError(f"bad Content-Length {length!r}") from None
        if (resp.headers.get("Content-Encoding") or "identity").lower() != "identity":
            raise FetchError(f"Content-Encoding {resp.headers['Content-Encoding']!r} refused (asked identity)")
        buf = bytearray()
        for chunk in resp.stream(64 * 1024, decode_content=False):
            buf += chunk
            if len(buf) > cap:
                raise PayloadTooLarge(f"body is over the {cap} byte cap")
            if time.monotonic() > deadline:
                raise FetchTimeout(f"fetch exceeded {self.limits.total_timeout_s}s")
        return bytes(buf)


__all__ = ["FetchLimits", "UrlFetcher", "UrlAddressBlocked", "system_resolver"]
