"""``moderator demo`` (``make demo``): the whole service on this machine, start to finish.

Starts a local Kafka and Redis (``moderator.devservices``), runs ``moderator run``
as a subprocess with the demo model and the demo policy, produces a few hundred
synthetic events (three envelopes, some repeated images, some malformed), reads
every output topic until each input is accounted for, prints a summary and
stops everything. ``hold=True`` keeps it all running for a look at ``/metrics``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from moderator.resources import DEMO_POLICY  # noqa: F401 - the demo's default, re-exported
_SUMMARY_METRICS = ("moderator_decisions_total", "moderator_dead_letters_total",
                    "moderator_image_embedding_cache_total", "moderator_end_to_end_latency_seconds_count",
                    "moderator_batch_size_count", "moderator_offset_commits_total")


def intended_action(label: str, event_id: str, doc) -> str:
    """What a policy means to do with a synthetic class, from the policy itself.

    The enabled categories whose prompts name the class act on it (flag when they
    have a flag threshold, else escalate; a threshold above 1 is unreachable for
    both cosine and contrast scores); an image nothing acts on may still be
    escalated by a category's audit sample, drawn per event id as the engine does.
    """
    from moderator.decide.engine import audit_draw  # noqa: PLC0415

    severity = {"allow": 0, "escalate": 1, "flag": 2}
    best = "allow"
    for c in doc.categories:
        if not c.enabled or label not in c.prompts:
            continue
        t = c.thresholds
        act = "flag" if t.flag is not None and t.flag <= 1 else "escalate" if t.escalate <= 1 else "allow"
        best = max(best, act, key=severity.__getitem__)
    if best == "allow":
        for c in doc.categories:
            if c.enabled and c.audit_sample_rate > 0 and audit_draw(event_id, c.id) < c.audit_sample_rate:
                return "escalate"
    return best


@dataclass
class DemoSummary:
    produced: int
    decisions: dict[str, int]
    dead_letters: dict[str, int]
    accounted: int
    duplicates: int
    cache_hits: int
    agree: int
    judged: int
    throughput: float
    latency_p50_ms: float
    latency_p99_ms: float
    metrics_url: str
    worker_exit: int | None
    flagged: int = 0
    review: int = 0
    rate: float | None = None


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(*, model_dir: Path | str, policy: Path | str = DEMO_POLICY, events: int = 300,
             rate: float | None = 50.0, partitions: int = 3, hold: bool = False, seed: int = 0,
             timeout_s: float = 180.0, out=print) -> DemoSummary:
    from kafka import KafkaConsumer  # noqa: PLC0415

    from moderator import produce as prod  # noqa: PLC0415
    from moderator.devservices import services  # noqa: PLC0415

    run = f"demo-{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="moderator-demo-"))
    with contextlib.ExitStack() as stack:
        out("starting Kafka and Redis ...")
        svc = stack.enter_context(services(kafka=True, redis=True))
        out(f"  Kafka {svc.kafka_bootstrap} ({svc.kafka_source}), Redis {svc.redis_url} ({svc.redis_source})")
        names = {"in": f"{run}.images", "decisions": f"{run}.decisions", "flagged": f"{run}.flagged",
                 "review": f"{run}.review", "dlq": f"{run}.dead-letter"}
        prod.ensure_topics(svc.kafka_bootstrap, {names["in"]: partitions, names["decisions"]: partitions,
                                            names["flagged"]: 1, names["review"]: 1, names["dlq"]: 1})
        port = _free_port()
        env = {**os.environ,
               "MODERATOR_KAFKA_BOOTSTRAP_SERVERS": svc.kafka_bootstrap, "MODERATOR_REDIS_URL": svc.redis_url,
               "MODERATOR_INPUT_TOPIC": names["in"], "MODERATOR_CONSUMER_GROUP": run,
               "MODERATOR_DECISIONS_TOPIC": names["decisions"], "MODERATOR_FLAGGED_TOPIC": names["flagged"],
               "MODERATOR_REVIEW_TOPIC": names["review"], "MODERATOR_DEAD_LETTER_TOPIC": names["dlq"],
               "MODERATOR_HTTP_HOST": "127.0.0.1", "MODERATOR_HTTP_PORT": str(port),
               "MODERATOR_CLIENT_ID": f"{run}-worker-1"}
        log_path = workdir / "worker.log"
        log_file = stack.enter_context(open(log_path, "wb"))
        cmd = [sys.executable, "-m", "moderator.cli", "run", "--model-dir", str(model_dir), "--policy", str(policy)]
        out(f"starting the worker: {' '.join(cmd[2:])} (JSON logs: {log_path})")
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        stack.callback(lambda: proc.poll() is None and proc.kill())
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while _get(f"{base}/readyz")[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not become ready; see {log_path}:\n"
                                   + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.3)
        out(f"worker ready; metrics at {base}/metrics (health {base}/healthz, readiness {base}/readyz)")

        good = prod.synthetic_events(events, seed, envelopes=("json", "cloudevents", "raw"), duplicate_rate=0.1,
                                id_prefix=run)
        bad = prod.malformed_events(f"{run}-bad", seed)
        stream = list(prod.interleave(good, bad, max(1, events // max(1, len(bad)))))
        out(f"producing {len(stream)} events ({events} synthetic images, {len(bad)} malformed) "
            f"{'at %.0f/s' % rate if rate else 'as fast as possible'} ...")
        report = prod.produce(svc.kafka_bootstrap, names["in"], stream, rate=rate)

        consumer = KafkaConsumer(names["decisions"], names["dlq"], names["flagged"], names["review"],
                                 bootstrap_servers=svc.kafka_bootstrap, auto_offset_reset="earliest",
                                 enable_auto_commit=False)
        stack.callback(consumer.close)
        outputs: dict[str, list] = {"decisions": [], "dlq": [], "flagged": [], "review": []}
        topic_kind = {names[k]: k for k in outputs}
        seen_inputs: Counter = Counter()
        deadline = time.monotonic() + timeout_s
        while len(seen_inputs) < report.sent and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    kind = topic_kind[r.topic]
                    v = json.loads(r.value)
                    outputs[kind].append((r, v))
                    if kind in ("decisions", "dlq"):
                        seen_inputs[v.get("event_id") or f"{v['source']['partition']}@{v['source']['offset']}"] += 1

        decisions = Counter(v["action"] for _, v in outputs["decisions"])
        dead = Counter(v["reason"] for _, v in outputs["dlq"])
        from moderator.decide.policy import load_policy  # noqa: PLC0415

        doc = load_policy(policy).doc
        judged = agree = 0
        for _, v in outputs["decisions"]:
            label = report.expected.get(v["event_id"])
            if label and " " in label:
                judged += 1
                agree += v["action"] == intended_action(label, v["event_id"], doc)
        lat = sorted(max(0.0, r.timestamp / 1000 - report.sent_at[v["event_id"]])
                     for r, v in outputs["decisions"] if v["event_id"] in report.sent_at)
        last_ts = max((r.timestamp / 1000 for r, _ in outputs["decisions"] + outputs["dlq"]), default=0.0)
        span = max(1e-6, last_ts - report.started_at)
        summary = DemoSummary(
            produced=report.sent, decisions=dict(decisions), dead_letters=dict(dead),
            accounted=len(seen_inputs), duplicates=sum(n - 1 for n in seen_inputs.values()),
            cache_hits=sum(1 for _, v in outputs["decisions"] if v.get("cached")), agree=agree, judged=judged,
            throughput=len(seen_inputs) / span,
            latency_p50_ms=1000 * lat[len(lat) // 2] if lat else float("nan"),
            latency_p99_ms=1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
            metrics_url=f"{base}/metrics", worker_exit=None,
            flagged=len(outputs["flagged"]), review=len(outputs["review"]), rate=rate)
        status, body = _get(f"{base}/metrics")
        scraped = [line for line in body.decode(errors="replace").splitlines()
                   if line.startswith(_SUMMARY_METRICS)] if status == 200 else []
        _print_summary(summary, names, scraped, out)
        if hold:
            out(f"\nholding: Kafka {svc.kafka_bootstrap}, Redis {svc.redis_url}, metrics {base}/metrics; "
                "Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                while proc.poll() is None:
                    time.sleep(1)
        out("stopping the worker (SIGTERM: drain, commit, close) ...")
        proc.send_signal(signal.SIGTERM)
        try:
            summary.worker_exit = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            summary.worker_exit = proc.wait()
        out(f"worker exited with status {summary.worker_exit}; stopping Kafka and Redis ...")
    return summary


def _print_summary(s: DemoSummary, names: dict, scraped: list[str], out) -> None:
    out("")
    out("=== moderator demo summary ===")
    out(f"inputs produced: {s.produced}; accounted for (a decision or a dead letter): {s.accounted}"
        f"{'' if s.accounted == s.produced else '  <-- MISSING ' + str(s.produced - s.accounted)}"
        f"; duplicate outputs: {s.duplicates}")
    out("decisions by action: " + ", ".join(f"{k} {v}" for k, v in sorted(s.decisions.items()))
        + f"   (copies: {s.flagged} on {names['flagged']}, {s.review} on {names['review']})")
    out(f"served from the content-hash cache (repeated images): {s.cache_hits}")
    out(f"decisions matching what the policy intends for each event's known class: {s.agree}/{s.judged}")
    out("dead letters by reason: " + (", ".join(f"{k} {v}" for k, v in sorted(s.dead_letters.items())) or "none"))
    paced = f"the producer was paced at {s.rate:g}/s" if s.rate else "the producer sent as fast as it could"
    out(f"throughput: {s.throughput:.1f} inputs/s, first send to last output acknowledged ({paced})")
    out(f"latency (created_at -> decision written): p50 {s.latency_p50_ms:.0f} ms, p99 {s.latency_p99_ms:.0f} ms")
    out(f"metrics: {s.metrics_url}")
    for line in scraped:
        out(f"  {line}")
