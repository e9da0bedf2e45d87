"""URL fetch faults, each bounded in time and memory and named: a host that never answers,
one that drips its body or its headers a byte at a time (each read within the read timeout,
the whole far over the fetch deadline), a 10 GB Content-Length, a redirect loop, and DNS that
does not answer. Unit level, against loopback servers (the worker-level dead letters are in
test_worker_bad_input.py)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from moderator.errors import FetchTimeout, PayloadTooLarge, TooManyRedirects, UrlUnresolvable
from moderator.fetch import AddressPolicy, FetchLimits, UrlFetcher

HOST = "127.0.0.3"
LIMITS = FetchLimits(connect_timeout_s=0.5, read_timeout_s=0.5, total_timeout_s=1.5, max_bytes=1 << 20,
                     max_redirects=3, dns_timeout_s=0.3)
SLACK_S = 0.6  # scheduling on a busy 2-core machine


class RawServer:
    """A TCP server on HOST that hands each connection to ``handler(conn)`` on its own thread."""

    def __init__(self, handler) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.closed = threading.Event()
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn) -> None:
        try:
            conn.recv(65536)  # the request
            self.handler(conn, self.closed)
        except OSError:
            pass  # the fetcher hung up: what it should do
        finally:
            conn.close()

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


def _drip(data: bytes, every_s: float):
    def handler(conn, closed):
        for b in data:
            if closed.wait(every_s):
                return
            conn.sendall(bytes([b]))
    return handler


def _fetcher(**kw) -> UrlFetcher:
    return UrlFetcher(kw.pop("limits", LIMITS), AddressPolicy(allow_networks=[f"{HOST}/32"]), **kw)


@pytest.fixture
def server(request):
    servers = []

    def make(handler):
        s = RawServer(handler)
        servers.append(s)
        return f"http://{HOST}:{s.port}"
    yield make
    for s in servers:
        s.close()


def _timed(fn):
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        fn()
    return e.value, time.monotonic() - t0


def test_a_host_that_never_answers_times_out(server):
    url = server(lambda conn, closed: closed.wait(30))
    err, took = _timed(lambda: _fetcher().fetch(url + "/x.png"))
    assert isinstance(err, FetchTimeout) and took < LIMITS.read_timeout_s + SLACK_S


def test_a_body_dripped_a_byte_at_a_time_stops_at_the_deadline(server):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"

    def handler(conn, closed):
        conn.sendall(head)
        _drip(b"\x89PNG" + b"\0" * 99_996, 0.1)(conn, closed)  # each byte well within the read timeout

    url = server(handler)
    err, took = _timed(lambda: _fetcher().fetch(url + "/x.png"))
    assert isinstance(err, FetchTimeout) and took < LIMITS.total_timeout_s + SLACK_S, (err, took)


def test_headers_dripped_a_byte_at_a_time_stop_at_the_deadline(server):
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 1000 + b"\r\n\r\n"
    url = server(_drip(head, 0.1))
    err, took = _timed(lambda: _fetcher().fetch(url + "/x.png"))
    assert isinstance(err, FetchTimeout) and took < LIMITS.total_timeout_s + SLACK_S, (err, took)


def test_a_ten_gigabyte_content_length_is_refused_before_reading(server):
    sent = []

    def handler(conn, closed):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 10737418240\r\n\r\n")
        try:
            for _ in range(10_000):  # would be 640 MB: the fetcher must hang up long before
                conn.sendall(b"\0" * 65536)
                sent.append(1)
        except OSError:
            pass

    url = server(handler)
    err, took = _timed(lambda: _fetcher().fetch(url + "/x.png"))
    assert isinstance(err, PayloadTooLarge) and "10737418240" in str(err) and took < SLACK_S
    time.sleep(0.2)
    assert len(sent) < 200  # < 13 MB written before the hang-up (socket buffers), nothing read into memory


def test_a_redirect_loop_is_cut_after_max_redirects(server):
    hits = []

    def handler(conn, closed):
        hits.append(1)
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /again\r\nContent-Length: 0\r\n\r\n")

    url = server(handler)
    err, took = _timed(lambda: _fetcher().fetch(url + "/x.png"))
    assert isinstance(err, TooManyRedirects) and took < LIMITS.total_timeout_s
    assert len(hits) == LIMITS.max_redirects + 1


def test_dns_that_does_not_answer_times_out():
    release = threading.Event()

    def hanging_resolver(host, port):
        release.wait(30)
        return [HOST]

    try:
        f = _fetcher(resolver=hanging_resolver)
        err, took = _timed(lambda: f.fetch("http://images.example.com/x.png"))
        assert isinstance(err, UrlUnresolvable) and "did not answer" in str(err)
        assert took < LIMITS.dns_timeout_s + SLACK_S
        # many at once: the lookups' threads are a bounded pool, every fetch still ends in time
        threads_before = threading.active_count()
        results = []

        def one():
            results.append(_timed(lambda: f.fetch("http://other.example.com/x.png")))

        workers = [threading.Thread(target=one) for _ in range(20)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(10)
        assert len(results) == 20 and all(isinstance(e, UrlUnresolvable) for e, _ in results)
        assert max(t for _, t in results) < LIMITS.dns_timeout_s + SLACK_S
        assert threading.active_count() - threads_before <= f.dns_threads
        dns = [t for t in threading.enumerate() if t.name.startswith("fetch-dns")]
        assert dns and all(t.daemon for t in dns)  # a hung lookup must not hold up interpreter exit
    finally:
        release.set()


def test_dns_counts_against_the_fetch_deadline():
    def slow_resolver(host, port):
        time.sleep(0.2)
        return [HOST]

    limits = FetchLimits(connect_timeout_s=0.5, read_timeout_s=0.5, total_timeout_s=0.5, dns_timeout_s=5.0)
    f = _fetcher(limits=limits, resolver=slow_resolver)
    # each hop resolves (0.2 s); a redirect chain of names cannot outlive the deadline
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(16)
    port = sock.getsockname()[1]

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: http://n.example.com:{port}/a\r\n"
                         "Content-Length: 0\r\n\r\n".encode())
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        err, took = _timed(lambda: f.fetch(f"http://n.example.com:{port}/a"))
        assert isinstance(err, (FetchTimeout, UrlUnresolvable)) and took < limits.total_timeout_s + SLACK_S, (err, took)
    finally:
        sock.close()
