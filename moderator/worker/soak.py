"""``moderator bench-soak``: does the worker's memory level off under steady load?

Runs ``moderator run`` (the container's command) in a subprocess against Kafka and Redis
(started locally unless given), feeds it a steady rate of synthetic events mixing good images,
re-sent images (image-cache hits) and malformed records, and samples the process's RSS from
/proc while the load runs. Growth is judged after warm-up: the mean RSS of the last third of
the run against the middle third.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

import numpy as np


def _status(pid: int) -> tuple[float, int]:
    """(RSS in MiB, threads) of ``pid`` (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    if "VmRSS" not in fields:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def soak_events(n: int, *, seed: int = 0, size: int = 64, duplicate_rate: float = 0.3, malformed_every: int = 10,
                id_prefix: str = "soak") -> list:
    """``n`` records: synthetic PNGs (``duplicate_rate`` of them re-sent images) with a malformed
    record after every ``malformed_every`` good ones (the catalogue's kinds in turn)."""
    from moderator.produce import malformed_events, synthetic_events  # noqa: PLC0415

    good = synthetic_events(n, seed=seed, size=size, duplicate_rate=duplicate_rate, id_prefix=id_prefix)
    bad = malformed_events(id_prefix=f"{id_prefix}-bad", seed=seed)
    out: list = []
    for i, ev in enumerate(good):
        if len(out) >= n:
            break
        out.append(ev)
        if malformed_every and (i + 1) % malformed_every == 0 and len(out) < n:
            b = bad[(i // malformed_every) % len(bad)]
            out.append(type(b)(**{**vars(b), "id": f"{b.id}-{i}" if b.id else None}))
    return out


def _outcomes(port: int) -> tuple[float, float]:
    """(decisions, dead letters) so far, from the worker's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # noqa: S310 (loopback)
        text = r.read().decode()
    totals = {"moderator_decisions_total": 0.0, "moderator_dead_letters_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["moderator_decisions_total"], totals["moderator_dead_letters_total"]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:  # noqa: S310 (loopback)
            return r.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def soak(model_dir: Path | str, policy: Path | str, *, seconds: float = 300.0, rate: float = 50.0,
         bootstrap_servers: str | None = None, redis_url: str | None = None, sample_s: float = 1.0,
         workdir: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Returns the samples ``[[seconds, RSS MiB, threads], ...]`` and the growth figures (see the module doc)."""
    from moderator.devservices import services  # noqa: PLC0415
    from moderator.produce import ensure_topics, produce  # noqa: PLC0415

    run = f"soak-{uuid.uuid4().hex[:8]}"
    n = max(1, int(seconds * rate))
    events = soak_events(n, id_prefix=run)
    with contextlib.ExitStack() as stack:
        if bootstrap_servers is None or redis_url is None:
            svc = stack.enter_context(services(kafka=bootstrap_servers is None, redis=redis_url is None))
            bootstrap_servers = bootstrap_servers or svc.kafka_bootstrap
            redis_url = redis_url or svc.redis_url
        topics = {k: f"{run}.{k}" for k in ("images", "decisions", "flagged", "review", "dead-letter")}
        ensure_topics(bootstrap_servers, {t: (3 if k in ("images", "decisions") else 1) for k, t in topics.items()})
        with socket.socket() as sock:  # a free port for its /metrics, /healthz, /readyz
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATOR_") or k == "MODERATOR_CACHE_DIR"}
        env.update(MODERATOR_DECISIONS_TOPIC=topics["decisions"], MODERATOR_FLAGGED_TOPIC=topics["flagged"],
                   MODERATOR_REVIEW_TOPIC=topics["review"], MODERATOR_DEAD_LETTER_TOPIC=topics["dead-letter"],
                   MODERATOR_HTTP_HOST="127.0.0.1", MODERATOR_LOG_JSON="true", MODERATOR_ORT_THREADS="1")
        log_path = (workdir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"{run}.worker.log"
        log_file = stack.enter_context(open(log_path, "wb"))
        worker = subprocess.Popen(
            [sys.executable, "-m", "moderator.cli", "run", "--model-dir", str(model_dir), "--policy", str(policy),
             "--kafka-bootstrap-servers", bootstrap_servers, "--input-topic", topics["images"], "--consumer-group", f"{run}.group",
             "--redis-url", redis_url, "--http-port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env)
        stack.callback(lambda: worker.poll() is None and worker.kill())
        deadline = time.monotonic() + 180
        while not _ready(port):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not become ready; see {log_path}")
            time.sleep(0.2)
        log(f"worker ready (pid {worker.pid}); {n} events at {rate:g}/s for {seconds:g}s ...")
        failed: list[BaseException] = []

        def feed() -> None:
            try:
                produce(bootstrap_servers, topics["images"], events, rate=rate)
            except BaseException as e:  # noqa: BLE001 -- reported by the caller
                failed.append(e)

        producer = threading.Thread(target=feed, name="soak-producer", daemon=True)
        t0 = time.monotonic()
        def sample() -> list[float]:  # [seconds, RSS MiB, threads]: a step in RSS with more threads
            mb, threads = _status(worker.pid)  # is new threads' malloc arenas, not a leak
            return [round(time.monotonic() - t0, 1), round(mb, 1), threads]

        samples: list[list[float]] = [sample()]
        producer.start()
        while producer.is_alive():
            time.sleep(sample_s)
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}; see {log_path}")
            samples.append(sample())
        if failed:
            raise RuntimeError(f"producing the load failed: {failed[0]!r}")
        deadline = time.monotonic() + 60  # the tail of the load is still being decided
        while sum(_outcomes(port)) < n and time.monotonic() < deadline:
            time.sleep(0.5)
        decisions, dead_letters = _outcomes(port)
        worker.send_signal(signal.SIGTERM)
        status = worker.wait(60)
    rss = np.array([s[1] for s in samples])
    third = max(1, len(rss) // 3)
    middle, last = rss[third:2 * third], rss[2 * third:]
    return {
        "events": n, "decisions": int(decisions), "dead_letters": int(dead_letters),
        "rate_per_s": rate, "seconds": round(samples[-1][0], 1), "worker_exit_status": status,
        "rss_mb_at_start": float(rss[0]), "rss_mb_max": float(rss.max()),
        "rss_mb_middle_third_mean": round(float(middle.mean()), 1) if len(middle) else None,
        "rss_mb_last_third_mean": round(float(last.mean()), 1),
        "growth_mb_last_vs_middle_third": round(float(last.mean() - middle.mean()), 1) if len(middle) else None,
        "samples": samples, "worker_log": str(log_path),
    }
