"""Hostile input on a real broker: every bad event lands on the dead-letter topic with
its own reason, the good events around it are decided, and no URL reaches an
address it must not -- checked at the socket layer for the whole test.

Loopback only: the "allowed" image server listens on 127.0.0.2 (allow-listed);
a canary on 127.0.0.1 must never be reached; private and metadata addresses
are refused before any connection, so nothing ever leaves this machine.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from moderator import metrics
from moderator.produce import cloudevent_dict, event_dict, png_header_only

ALLOWED_HOST = "127.0.0.2"


def _img(seed: int, fmt: str = "PNG", size: int = 48) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


GOOD_PNG = _img(1)
GOOD_JPEG = _img(2, "JPEG")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


class _Server:
    """A ThreadingHTTPServer on a loopback address, recording the paths it served."""

    def __init__(self, host: str, routes: dict) -> None:
        hits = self.hits = []

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                route = routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                route(self)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer((host, 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _body(data: bytes, ctype: str = "image/png", status: int = 200):
    def route(h):
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        try:
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the fetcher hung up on purpose (byte cap, timeout)
    return route


def _redirect(location: str):
    def route(h):
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def _slow(h):
    time.sleep(3)
    _body(GOOD_PNG)(h)


def _drip(h):  # a byte every 0.3 s: never trips the 1 s read timeout, only the 3 s deadline
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", "60000")  # under the test's 64 kB cap
    h.end_headers()
    try:
        for b in (GOOD_PNG * 100)[:60000]:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(0.3)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _huge_length(h):  # claims 10 GB
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", str(10 * 1024 ** 3))
    h.end_headers()
    try:
        h.wfile.write(GOOD_PNG)
    except (BrokenPipeError, ConnectionResetError):
        pass


@pytest.fixture
def servers():
    canary = _Server("127.0.0.1", {"/": _body(b"canary"), "/x": _body(b"canary")})
    routes = {
        "/ok.png": _body(GOOD_PNG), "/ok.jpg": _body(GOOD_JPEG, "image/jpeg"),
        "/redirect-ok": _redirect("/ok.png"),
        "/redirect-private": _redirect("http://10.0.0.1/x"),
        "/redirect-loopback": _redirect(f"http://127.0.0.1:{canary.port}/x"),
        "/redirect-localhost": _redirect(f"http://localhost:{canary.port}/x"),
        "/redirect-metadata": _redirect("http://169.254.169.254/latest/meta-data/iam/"),
        "/redirect-ftp": _redirect("ftp://127.0.0.2/x"),
        "/loop": _redirect("/loop"),
        "/big": _body(b"\x89PNG" + b"\0" * 200_000),
        "/text": _body(b"just some text, honest", "text/plain"),
        "/slow": _slow,
        "/drip": _drip,
        "/huge-length": _huge_length,
        "/500": _body(b"oops", "text/plain", 500),
    }
    allowed = _Server(ALLOWED_HOST, routes)
    with socket.socket() as s:  # a port on the allowed host with nothing listening
        s.bind((ALLOWED_HOST, 0))
        closed_port = s.getsockname()[1]
    yield canary, allowed, closed_port
    canary.close()
    allowed.close()


@pytest.fixture
def connections(monkeypatch):
    """Every TCP destination this process connects to while the test runs."""
    seen: list[tuple[str, int]] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def record(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            seen.append((str(address[0]), int(address[1])))

    def connect(sock, address):
        record(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        record(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return seen


def _cases(canary_port: int, port: int, closed_port: int) -> list[tuple[str, str, object]]:
    """(name, expected reason, record) -- record is (value, headers) or an event dict."""
    a = f"http://{ALLOWED_HOST}:{port}"
    ev = lambda name, **kw: event_dict(name, **kw)  # noqa: E731
    raw_json = lambda obj: (json.dumps(obj).encode(), [])  # noqa: E731
    return [
        # --- not an event at all
        ("bad-json", "malformed_json", (b'{"id": "bad-json", "image": ', [])),
        ("not-utf8", "malformed_json", (b"\xff\xfe\xfd not text", [])),
        ("json-array", "invalid_event", (b'[{"id": "json-array"}]', [])),
        ("json-string", "invalid_event", (b'"just a string"', [])),
        ("tombstone", "empty_event", (None, [])),
        ("oversized-record", "payload_too_large", (b"{" + b" " * 300_000 + b"}", [])),
        # --- schema
        ("missing-id", "missing_id", raw_json({"image": {"data": _b64(GOOD_PNG)}})),
        ("empty-id", "missing_id", raw_json({"id": "", "image": {"data": _b64(GOOD_PNG)}})),
        ("numeric-id", "invalid_event", raw_json({"id": 42, "image": {"data": _b64(GOOD_PNG)}})),
        ("both-sources", "invalid_image_source", ev("both-sources", image=GOOD_PNG) | {
            "image": {"data": _b64(GOOD_PNG), "url": f"{a}/ok.png"}}),
        ("no-source", "invalid_image_source", {"id": "no-source", "image": {}}),
        ("no-image", "invalid_image_source", {"id": "no-image"}),
        ("image-string", "invalid_image_source", {"id": "image-string", "image": f"{a}/ok.png"}),
        ("unknown-field", "invalid_event", ev("unknown-field", image=GOOD_PNG) | {"priority": "high"}),
        ("bad-created-at", "invalid_event", ev("bad-created-at", image=GOOD_PNG) | {"created_at": "yesterday"}),
        ("metadata-list", "invalid_event", ev("metadata-list", image=GOOD_PNG) | {"metadata": [1, 2]}),
        # --- inline data
        ("bad-base64", "invalid_base64", {"id": "bad-base64", "image": {"data": "@@not base64@@"}}),
        ("bad-padding", "invalid_base64", {"id": "bad-padding", "image": {"data": "iVBORw0KGgo"}}),
        ("zero-bytes", "empty_image", ev("zero-bytes", image=b"")),
        ("truncated-jpeg", "truncated_image", ev("truncated-jpeg", image=GOOD_JPEG[: len(GOOD_JPEG) // 2])),
        ("truncated-png", "truncated_image", ev("truncated-png", image=GOOD_PNG[: len(GOOD_PNG) * 2 // 3])),
        ("text-as-image", "not_an_image", ev("text-as-image", image=b"Dear moderator, this is text.\n" * 10)),
        ("html-as-image", "not_an_image", ev("html-as-image", image=b"<html><body><img src=x></body></html>")),
        ("decompression-bomb", "decompression_bomb", ev("decompression-bomb", image=png_header_only(30_000, 30_000))),
        ("ppm-not-allowed", "unsupported_format", ev("ppm-not-allowed", image=_img(3, "PPM", 16))),
        ("oversized-inline", "payload_too_large", ev("oversized-inline", image=b"\x89PNG" + bytes(100_000))),
        # --- envelopes
        ("ce-0.3", "unsupported_envelope", {**cloudevent_dict("ce-0.3", ev(None, image=GOOD_PNG)),
                                            "specversion": "0.3"}),
        ("ce-text-data", "unsupported_envelope", {**cloudevent_dict("ce-text-data", {}),
                                                  "datacontenttype": "text/plain", "data": "hello"}),
        ("ce-data-not-object", "invalid_event", {**cloudevent_dict("ce-data-not-object", {}), "data": [1]}),
        ("raw-no-key", "missing_id", (GOOD_PNG, [("content-type", b"image/png")])),
        ("raw-garbage", "not_an_image", (b"\x00\x01garbage", [("content-type", b"image/jpeg")])),
        # --- URLs refused before any connection
        ("url-loopback", "url_address_blocked", ev("url-loopback", url=f"http://127.0.0.1:{canary_port}/x")),
        ("url-private", "url_address_blocked", ev("url-private", url="http://10.0.0.1/x.png")),
        ("url-metadata", "url_address_blocked", ev("url-metadata", url="http://169.254.169.254/latest/meta-data/")),
        ("url-localhost", "url_address_blocked", ev("url-localhost", url=f"http://localhost:{canary_port}/x")),
        ("url-ipv6-loopback", "url_address_blocked", ev("url-ipv6-loopback", url=f"http://[::1]:{canary_port}/x")),
        ("url-v4-mapped", "url_address_blocked",
         ev("url-v4-mapped", url=f"http://[::ffff:127.0.0.1]:{canary_port}/x")),
        ("url-decimal-ip", "url_address_blocked", ev("url-decimal-ip", url=f"http://2130706433:{canary_port}/x")),
        ("url-unspecified", "url_address_blocked", ev("url-unspecified", url=f"http://0.0.0.0:{canary_port}/x")),
        ("url-metadata-name", "url_address_blocked",
         ev("url-metadata-name", url="http://metadata.google.internal/computeMetadata/v1/")),
        ("url-ftp", "url_scheme_not_allowed", ev("url-ftp", url=f"ftp://{ALLOWED_HOST}:{port}/ok.png")),
        ("url-file", "url_scheme_not_allowed", ev("url-file", url="file:///etc/passwd")),
        ("url-gopher", "url_scheme_not_allowed", ev("url-gopher", url=f"gopher://{ALLOWED_HOST}:{port}/_x")),
        ("url-credentials", "url_invalid", ev("url-credentials", url=f"http://u:p@{ALLOWED_HOST}:{port}/ok.png")),
        ("url-whitespace", "url_invalid", ev("url-whitespace", url="http://exa mple.com/a.png")),
        # --- URLs refused on a redirect hop (each hop re-checked)
        ("redirect-private", "url_address_blocked", ev("redirect-private", url=f"{a}/redirect-private")),
        ("redirect-loopback", "url_address_blocked", ev("redirect-loopback", url=f"{a}/redirect-loopback")),
        ("redirect-localhost", "url_address_blocked", ev("redirect-localhost", url=f"{a}/redirect-localhost")),
        ("redirect-metadata", "url_address_blocked", ev("redirect-metadata", url=f"{a}/redirect-metadata")),
        ("redirect-ftp", "url_scheme_not_allowed", ev("redirect-ftp", url=f"{a}/redirect-ftp")),
        ("redirect-loop", "too_many_redirects", ev("redirect-loop", url=f"{a}/loop")),
        # --- fetch failures on the allowed host
        ("http-404", "fetch_http_status", ev("http-404", url=f"{a}/missing.png")),
        ("http-500", "fetch_http_status", ev("http-500", url=f"{a}/500")),
        ("body-too-large", "payload_too_large", ev("body-too-large", url=f"{a}/big")),
        ("url-text", "not_an_image", ev("url-text", url=f"{a}/text")),
        ("slow-server", "fetch_timeout", ev("slow-server", url=f"{a}/slow")),
        ("dripping-body", "fetch_timeout", ev("dripping-body", url=f"{a}/drip")),
        ("ten-gigabyte-length", "payload_too_large", ev("ten-gigabyte-length", url=f"{a}/huge-length")),
        ("connection-refused", "fetch_failed", ev("connection-refused", url=f"http://{ALLOWED_HOST}:{closed_port}/x")),
    ]


def _goods(port: int) -> list[tuple[str, object]]:
    a = f"http://{ALLOWED_HOST}:{port}"
    return [
        ("good-inline-png", event_dict("good-inline-png", image=GOOD_PNG, metadata={"k": 1})),
        ("good-inline-jpeg", event_dict("good-inline-jpeg", image=GOOD_JPEG)),
        ("good-url", event_dict("good-url", url=f"{a}/ok.png")),
        ("good-url-jpeg", event_dict("good-url-jpeg", url=f"{a}/ok.jpg")),
        ("good-redirect", event_dict("good-redirect", url=f"{a}/redirect-ok")),
        ("good-cloudevent", cloudevent_dict("good-cloudevent", event_dict(None, image=_img(5)) | {"id": None})),
        ("good-raw", (_img(6), [("content-type", b"image/png")])),
    ]


NO_KEY = {"raw-no-key"}


def _record(name: str, spec) -> tuple[bytes | None, bytes | None, list]:
    if isinstance(spec, tuple):
        value, headers = spec
    else:
        spec = {k: v for k, v in spec.items() if not (k == "id" and v is None)}
        if isinstance(spec.get("data"), dict):
            spec["data"] = {k: v for k, v in spec["data"].items() if not (k == "id" and v is None)}
        value, headers = json.dumps(spec).encode(), []
    return (None if name in NO_KEY else name.encode()), value, headers


def test_every_bad_input_is_a_named_dead_letter_and_nothing_forbidden_is_reached(
        random_model_dir, stream_topics, worker_settings, start_worker, send_records, read_outputs,
        servers, connections, kafka_bootstrap):
    canary, allowed, closed_port = servers
    cases = _cases(canary.port, allowed.port, closed_port)
    goods = _goods(allowed.port)
    assert len(cases) >= 30 and len({c[0] for c in cases}) == len(cases)
    topics = stream_topics(3)
    before = {r: metrics.DEAD_LETTERS.labels(reason=r)._value.get() for _, r, _ in cases}
    start_worker(worker_settings(
        random_model_dir, topics, max_batch=8, max_image_bytes=64 * 1024, max_event_bytes=256 * 1024,
        max_pixels=4_000_000, fetch_connect_timeout_s=1.0, fetch_read_timeout_s=1.0, fetch_total_timeout_s=3.0,
        fetch_max_redirects=3, fetch_allow_networks=[f"{ALLOWED_HOST}/32"], prepare_workers=4))

    # good events before, between and after the bad ones
    names, records = [goods[0][0]], [_record(*goods[0])]
    for i, (name, _, spec) in enumerate(cases):
        names.append(name)
        records.append(_record(name, spec))
        if i % 10 == 9:
            g = goods[1 + (i // 10) % (len(goods) - 1)]
            names.append(g[0])
            records.append(_record(*g))
    names.extend(g[0] for g in goods)
    records.extend(_record(*g) for g in goods)
    at = dict(zip(send_records(topics.input, records), names))  # (partition, offset) -> name
    good_names = {g[0] for g in goods}
    want = len(cases) + len(good_names)
    out = read_outputs(topics, want, timeout_s=90)

    dead, dead_keys = {}, {}
    for rec, v in out[topics.dead_letter]:
        name = at[(v["source"]["partition"], v["source"]["offset"])]
        dead.setdefault(name, []).append(v)
        dead_keys[name] = rec.key
    decided = Counter(v["event_id"] for _, v in out[topics.decisions])
    wrong = {name: (reason, [d["reason"] + ": " + d["error"] for d in dead.get(name, [])])
             for name, reason, _ in cases if [d["reason"] for d in dead.get(name, [])] != [reason]}
    assert not wrong, json.dumps(wrong, indent=1)
    assert not (set(decided) - good_names), "a bad input got a decision"
    assert set(decided) == good_names, f"good inputs without a decision: {good_names - set(decided)}"
    assert not (good_names & set(dead)), {n: dead[n] for n in good_names & set(dead)}

    # dead letters carry their source and the original (or a pointer to it), are keyed like the
    # input (its event id, else its record key), and name the policy and model in force
    from moderator.decide.policy import load_policy
    from moderator.demo import DEMO_POLICY
    from moderator.encode import ModelDirectory

    policy_version = load_policy(DEMO_POLICY).doc.version
    model_sha = ModelDirectory(random_model_dir).model_sha256
    for name, _, _ in cases:
        d = dead[name][0]
        assert d["source"]["topic"] == topics.input and d["original"]["pointer"].startswith("kafka://")
        assert d["original"]["value"] is not None or d["original"]["size_bytes"] > 256 * 1024
        assert dead_keys[name] == (None if name in NO_KEY else name.encode()), (name, dead_keys[name])
        assert (d["policy_version"], d["model_sha256"]) == (policy_version, model_sha), name
    # counted by reason
    expected_counts = Counter(r for _, r, _ in cases)
    for reason, n in expected_counts.items():
        assert metrics.DEAD_LETTERS.labels(reason=reason)._value.get() - before[reason] == n, reason

    # nothing forbidden was ever contacted: the canary saw no request, and every
    # TCP connection went to the broker or the allow-listed image server
    assert canary.hits == [], canary.hits
    broker_hosts = {tuple(h.rsplit(":", 1)) for h in kafka_bootstrap.split(",")}
    allowed_dest = {(h, int(p)) for h, p in broker_hosts}
    forbidden = sorted({c for c in connections if c not in allowed_dest and c[0] != ALLOWED_HOST})
    assert not forbidden, f"connections outside loopback test servers: {forbidden}"
    assert not [c for c in connections if c[1] == canary.port], "a refused URL reached the canary port"
    print(f"\n{len(cases)} bad inputs, {len(good_names)} good; {len(connections)} connections, all to "
          f"{sorted({c[0] for c in connections})}; redirects/fetches served: {len(allowed.hits)}")
