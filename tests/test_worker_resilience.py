"""Nothing lost when things break: a worker SIGKILLed mid-stream and restarted while a
second worker joins and leaves the group, Redis stopped during a run, and the
broker frozen for a few seconds. Every event must end with a decision; at-least-once
allows duplicates, which are counted and printed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from moderator import metrics
from moderator.devservices import LocalKafka
from moderator.produce import ensure_topics, produce, synthetic_events
from moderator.resources import DEMO_POLICY
from moderator.worker.http import free_loopback_port, local_get

REPO = Path(__file__).resolve().parents[1]



def _status(port: int, path: str) -> int:
    return local_get(port, path)[0]


def _wait(cond, timeout: float, what: str, interval: float = 0.1, workers=()) -> None:
    """``workers``: the WorkerProcesses whose log tails a timeout should show (a stall's cause)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {w.name} (exit {w.proc.poll()}):\n{w.log()}" for w in workers)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{logs}")
        time.sleep(interval)


def _duplicates(decisions) -> Counter:
    counts = Counter(v["event_id"] for _, v in decisions)
    return Counter({i: n - 1 for i, n in counts.items() if n > 1})


def _assert_duplicates_repeat_the_decision(decisions) -> None:
    """A replayed event is decided again from the same image, model and policy: same outcome."""
    first: dict = {}
    for _, v in decisions:
        seen = first.setdefault(v["event_id"], v)
        if seen is not v:
            assert (v["action"], v["image_sha256"], v["policy_version"], v["model_sha256"]) == (
                seen["action"], seen["image_sha256"], seen["policy_version"], seen["model_sha256"]), v["event_id"]
            assert [c["id"] for c in v["categories"]] == [c["id"] for c in seen["categories"]]
            assert [c["score"] for c in v["categories"]] == pytest.approx(
                [c["score"] for c in seen["categories"]], abs=1e-5), v["event_id"]


# --- worker processes ---------------------------------------------------------------------


class WorkerProcess:
    """``moderator run`` in a subprocess, configured by MODERATOR_* variables, logging JSON to a file."""

    def __init__(self, name: str, env: dict, log_dir: Path, model_dir: Path, policy: Path = DEMO_POLICY) -> None:
        self.name = name
        self.port = free_loopback_port()
        self.log_path = log_dir / f"{name}.log"
        env = {**os.environ, **env, "MODERATOR_HTTP_PORT": str(self.port), "MODERATOR_CLIENT_ID": name}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moderator.cli", "run", "--model-dir", str(model_dir), "--policy", str(policy)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)

    def wait_ready(self, timeout: float = 90) -> None:
        _wait(lambda: self.proc.poll() is not None or _status(self.port, "/readyz") == 200, timeout,
              f"{self.name} /readyz")
        assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()


@pytest.fixture
def worker_processes(tmp_path, kafka_bootstrap):
    """``spawn(name, topics, group, model_dir) -> WorkerProcess``; all killed at teardown."""
    spawned: list[WorkerProcess] = []

    def spawn(name: str, topics, group: str, model_dir: Path, policy: Path = DEMO_POLICY,
              **settings: str) -> WorkerProcess:
        env = {
            "MODERATOR_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "MODERATOR_INPUT_TOPIC": topics.input,
            "MODERATOR_CONSUMER_GROUP": group, "MODERATOR_DECISIONS_TOPIC": topics.decisions,
            "MODERATOR_FLAGGED_TOPIC": topics.flagged, "MODERATOR_REVIEW_TOPIC": topics.review,
            "MODERATOR_DEAD_LETTER_TOPIC": topics.dead_letter, "MODERATOR_HTTP_HOST": "127.0.0.1",
            "MODERATOR_SESSION_TIMEOUT_MS": "6000", "MODERATOR_HEARTBEAT_INTERVAL_MS": "1000",
            "MODERATOR_COMMIT_INTERVAL_MS": "200", "MODERATOR_MAX_WAIT_MS": "20", "MODERATOR_MAX_BATCH": "16",
            "MODERATOR_POLICY_RELOAD_INTERVAL_S": "0", "MODERATOR_ORT_THREADS": "1", "MODERATOR_REDIS_URL": "",
            **{f"MODERATOR_{k.upper()}": v for k, v in settings.items()},
        }
        w = WorkerProcess(name, env, tmp_path, model_dir, policy)
        spawned.append(w)
        return w

    yield spawn
    for w in spawned:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(10)


def test_sigkill_restart_and_a_second_worker_joining_and_leaving_lose_nothing(
        random_model_dir, stream_topics, worker_processes, read_outputs, kafka_bootstrap, kafka_offsets):
    topics = stream_topics(4)
    group = f"crash-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    events = list(synthetic_events(600, seed=5, size=48, id_prefix="crash"))
    # Two waves: the second is produced only once worker-b has joined, so "progress with two
    # workers" always has input. (With one wave a slow start-up on a loaded machine let the
    # first worker decide every event before b joined, and the wait below timed out on an
    # idle group: no stall, no input.)
    producers = [threading.Thread(target=produce, args=(kafka_bootstrap, topics.input, wave),
                                  kwargs={"rate": 30.0}, daemon=True) for wave in (events[:400], events[400:])]

    def decided() -> int:
        return sum(kafka_offsets.end(topics.decisions, 4).values())

    a = worker_processes("worker-a", topics, group, random_model_dir)
    a.wait_ready()
    producers[0].start()
    _wait(lambda: decided() >= 60, 60, "worker-a to decide 60 events")
    a.proc.kill()  # SIGKILL: no drain, no commit, no goodbye to the group
    assert a.proc.wait(10) == -signal.SIGKILL
    at_kill = decided()

    a2 = worker_processes("worker-a-restarted", topics, group, random_model_dir)
    a2.wait_ready()
    _wait(lambda: decided() >= at_kill + 30, 60, "the restarted worker to make progress", workers=[a2])
    b = worker_processes("worker-b", topics, group, random_model_dir)
    b.wait_ready()  # ready = has joined the group (a rebalance moved partitions to it)
    at_join = decided()
    producers[1].start()
    _wait(lambda: decided() >= at_join + 60, 60, "progress with two workers", workers=[a2, b])
    assert b.stop(signal.SIGTERM) == 0, f"worker-b did not drain cleanly:\n{b.log()}"  # leaves the group
    for producer in producers:
        producer.join(60)
    out = read_outputs(topics, len(events), timeout_s=120)
    assert a2.stop(signal.SIGTERM) == 0, a2.log()

    decisions = out[topics.decisions]
    got = {v["event_id"] for _, v in decisions}
    missing = sorted({e.id for e in events} - got)
    assert not missing, f"{len(missing)} events never decided, e.g. {missing[:5]}"
    assert out[topics.dead_letter] == []
    dups = _duplicates(decisions)
    print(f"\ncrash test: {len(events)} events, {len(decisions)} decisions, "
          f"{sum(dups.values())} duplicates over {len(dups)} events "
          f"(SIGKILL at {at_kill} decided, second worker joined at {at_join})")
    # at-least-once redoes only what the killed worker had not committed: at most one batch per
    # partition it held (1 kill x max_batch 16 x 4 partitions); clean rebalances commit on revoke
    assert sum(dups.values()) <= 1 * 16 * 4, dups
    assert max(dups.values(), default=0) <= 1, "an event was decided more than twice"
    _assert_duplicates_repeat_the_decision(decisions)
    committed = kafka_offsets.committed(group, topics.input, 4)
    assert committed == kafka_offsets.end(topics.input, 4), "offsets not committed to the end after drain"


def _get_json(port: int, path: str) -> dict:
    import json

    return json.loads(local_get(port, path, timeout=5)[1])


def test_processes_share_the_group_a_killed_one_is_restarted_and_nothing_is_lost(
        random_model_dir, stream_topics, worker_processes, read_outputs, kafka_bootstrap, kafka_offsets):
    """``--processes 2``: two worker processes behind one ops port, each a group member. One
    is SIGKILLed mid-load: the supervisor starts it again and every event is decided; SIGTERM
    drains both and commits to the end."""
    topics = stream_topics(4)
    group = f"procs-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    events = list(synthetic_events(300, seed=9, size=48, id_prefix="procs"))
    sup = worker_processes("supervisor", topics, group, random_model_dir, processes="2")
    sup.wait_ready()
    health = _get_json(sup.port, "/healthz")
    assert [p["status"] for p in health["processes"]] == [200, 200], health
    metrics_text = local_get(sup.port, "/metrics", timeout=5)[1].decode()
    assert "moderator_worker_processes 2.0" in metrics_text
    assert 'moderator_worker_ready{process="0"} 1.0' in metrics_text
    assert 'moderator_worker_ready{process="1"} 1.0' in metrics_text
    # the supervisor's own memory and CPU, beside its processes' (a pod's RSS is all of them)
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total"):
        assert f'{name}{{process="supervisor"}}' in metrics_text and f'{name}{{process="0"}}' in metrics_text

    producer = threading.Thread(target=produce, args=(kafka_bootstrap, topics.input, events),
                                kwargs={"rate": 40.0}, daemon=True)
    producer.start()

    def decided() -> int:
        return sum(kafka_offsets.end(topics.decisions, 4).values())

    _wait(lambda: decided() >= 60, 60, "decisions from two processes", workers=[sup])
    victim = health["processes"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    seen = []  # the pod stays alive while the supervisor restarts its process: never a failing /healthz

    def restarted() -> bool:
        h = _get_json(sup.port, "/healthz")
        seen.append((h["status"], h["processes"][0]["state"]))
        return h["processes"][0]["restarts"] == 1 and h["processes"][0]["state"] == "up"

    _wait(restarted, 90, "the killed process to be started again", workers=[sup])
    assert {status for status, _ in seen} == {"ok"}, seen
    assert _get_json(sup.port, "/healthz")["processes"][0]["pid"] != victim
    assert _get_json(sup.port, "/healthz")["processes"][0]["last_exit_status"] == -signal.SIGKILL
    producer.join(60)
    out = read_outputs(topics, len(events), timeout_s=120)
    metrics_text = local_get(sup.port, "/metrics", timeout=5)[1].decode()
    assert 'moderator_worker_process_restarts_total{process="0"} 1.0' in metrics_text
    assert sup.stop(signal.SIGTERM) == 0, sup.log()

    decisions = out[topics.decisions]
    missing = sorted({e.id for e in events} - {v["event_id"] for _, v in decisions})
    assert not missing, f"{len(missing)} events never decided, e.g. {missing[:5]}"
    assert out[topics.dead_letter] == []
    dups = _duplicates(decisions)
    assert sum(dups.values()) <= 16 * 4, dups  # one kill: at most a batch per partition redone
    _assert_duplicates_repeat_the_decision(decisions)
    assert {v["model_sha256"] for _, v in decisions} == {decisions[0][1]["model_sha256"]}
    assert kafka_offsets.committed(group, topics.input, 4) == kafka_offsets.end(topics.input, 4)
    log_text = sup.log_path.read_text(errors="replace")
    assert "worker process 0 exited with -9: starting it again" in log_text


def test_a_configuration_error_in_a_process_stops_them_all_with_its_status(
        random_model_dir, stream_topics, worker_processes, tmp_path):
    """A child that exits with 2 (usage or configuration) would fail the same way again: the
    supervisor stops the others and exits 2 instead of restarting it forever."""
    bad = tmp_path / "bad-policy.yaml"
    bad.write_text("version: [unclosed\n")
    sup = worker_processes("supervisor-bad", stream_topics(1), f"bad-{os.getpid()}", random_model_dir,
                           policy=bad, processes="2")
    assert sup.proc.wait(120) == 2, sup.log()
    assert "exited with 2 (usage or configuration error): stopping" in sup.log(20_000)


def test_child_resources_share_the_pods_cpus():
    from moderator.config import WorkerSettings
    from moderator.worker.supervisor import child_resources

    assert child_resources(WorkerSettings(processes=4), 4, cpus=16) == (4, 3)
    assert child_resources(WorkerSettings(processes=2), 2, cpus=2) == (1, 1)
    assert child_resources(WorkerSettings(processes=3, ort_threads=8), 3) == (3, 2)  # the chart's CPU request
    assert child_resources(WorkerSettings(processes=2, decode_concurrency=6), 2, cpus=16) == (8, 6)


CHAOS_WORKERS, CHAOS_PARTITIONS, CHAOS_KILLS, CHAOS_MAX_BATCH, CHAOS_RATE = 3, 6, 3, 16, 60.0
# A killed worker's work is redone from its partitions' last commits: what it had consumed and
# not acknowledged (at most max_in_flight), plus what it acknowledged after its last commit (at
# most its share of the rate over one commit interval, 200 ms). With max_in_flight set to
# max_batch x the partitions a worker holds, the bound is the kills x max_batch x
# partitions per worker, plus that commit-interval slack.
CHAOS_MAX_IN_FLIGHT = CHAOS_MAX_BATCH * (CHAOS_PARTITIONS // CHAOS_WORKERS)
CHAOS_DUPLICATE_BOUND = CHAOS_KILLS * (CHAOS_MAX_IN_FLIGHT + int(CHAOS_RATE / CHAOS_WORKERS * 0.2 + 1))


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_three_workers_sigkilled_in_turn_during_load_lose_nothing(
        guarantee, random_model_dir, stream_topics, worker_processes, read_outputs, kafka_bootstrap, kafka_offsets):
    """Chaos: three worker processes share six partitions while events keep arriving; one after
    another is SIGKILLed mid-load and replaced. Nothing is lost; duplicates stay within what
    at-least-once allows (CHAOS_DUPLICATE_BOUND), and a read_committed reader of exactly-once
    outputs sees none. Each replacement takes over its killed predecessor's transactional id
    (a StatefulSet pod's stable name), which fences it and aborts its open transaction at once."""
    topics = stream_topics(CHAOS_PARTITIONS)
    group = f"chaos-{guarantee[:3]}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    # 30 s of load at CHAOS_RATE: three kills and their recoveries fit in it on a busy 2-core machine
    events = list(synthetic_events(1800, seed=21, size=48, id_prefix="chaos"))
    exactly_once = guarantee == "exactly_once"

    def spawn(name: str, slot: int) -> WorkerProcess:
        extra = ({"processing_guarantee": guarantee, "transactional_id": f"{group}-slot-{slot}",
                  "transaction_timeout_ms": "10000"} if exactly_once else {})
        return worker_processes(name, topics, group, random_model_dir, max_in_flight=str(CHAOS_MAX_IN_FLIGHT),
                                **extra)

    workers = [spawn(f"chaos-{i}", i) for i in range(CHAOS_WORKERS)]
    for w in workers:
        w.wait_ready()
    producer = threading.Thread(target=produce, args=(kafka_bootstrap, topics.input, events),
                                kwargs={"rate": CHAOS_RATE}, daemon=True)
    producer.start()

    def decided() -> int:  # inputs whose offsets the group has committed (either mode)
        return sum(o or 0 for o in kafka_offsets.committed(group, topics.input, CHAOS_PARTITIONS).values())

    def backlog() -> int:  # events on the input topic not decided yet
        return sum(kafka_offsets.end(topics.input, CHAOS_PARTITIONS).values()) - decided()

    kills = []
    for k in range(CHAOS_KILLS):
        _wait(lambda k=k: decided() >= 150 * (k + 1), 90, f"progress before kill {k + 1}")
        # kill in steady state, not while the group still catches up on the last kill's backlog
        # (the bound below is for a worker at its rate, not one draining a burst)
        _wait(lambda: backlog() <= 30, 90, f"the backlog to clear before kill {k + 1}")
        assert producer.is_alive(), "the load ended before the kills: raise the event count"
        i = k % CHAOS_WORKERS
        workers[i].proc.kill()  # SIGKILL mid-load: no drain, no commit, no goodbye to the group
        assert workers[i].proc.wait(10) == -signal.SIGKILL
        kills.append(decided())
        workers[i] = spawn(f"chaos-{i}-after-kill-{k}", i)
        workers[i].wait_ready()
    producer.join(120)
    _wait(lambda: backlog() == 0, 180, "every input committed", interval=0.5)
    out = read_outputs(topics, len(events), timeout_s=180,
                       isolation_level="read_committed" if exactly_once else "read_uncommitted")
    for w in workers:
        assert w.stop(signal.SIGTERM) == 0, f"{w.name} did not drain cleanly:\n{w.log()}"

    decisions = out[topics.decisions]
    missing = sorted({e.id for e in events} - {v["event_id"] for _, v in decisions})
    assert not missing, f"{len(missing)} events lost, e.g. {missing[:5]}"
    assert out[topics.dead_letter] == []
    dups = _duplicates(decisions)
    bound = 0 if exactly_once else CHAOS_DUPLICATE_BOUND
    print(f"\nchaos ({guarantee}): {CHAOS_WORKERS} workers, {len(events)} events, {CHAOS_KILLS} SIGKILLs under "
          f"load (at {kills} committed): {len(decisions)} decisions, {sum(dups.values())} duplicates (bound {bound})")
    assert sum(dups.values()) <= bound, dups
    _assert_duplicates_repeat_the_decision(decisions)
    committed = kafka_offsets.committed(group, topics.input, CHAOS_PARTITIONS)
    assert committed == kafka_offsets.end(topics.input, CHAOS_PARTITIONS), "offsets not committed to the end"


def test_redis_stopped_mid_run_decisions_continue_and_the_cache_comes_back(
        random_model_dir, local_redis, stream_topics, worker_settings, start_worker, read_outputs,
        kafka_bootstrap):
    topics = stream_topics(2)
    worker = start_worker(worker_settings(random_model_dir, topics, redis_url=local_redis.url, redis_timeout_s=0.3,
                                          redis_retry_s=0.5, max_batch=8))
    base = list(synthetic_events(16, seed=31, size=48, id_prefix="r"))

    def renamed(prefix: str):
        return [type(e)(**{**vars(e), "id": e.id.replace("r-", f"{prefix}-")}) for e in base]

    sent: list = []

    def round_(evs):
        sent.extend(evs)
        produce(kafka_bootstrap, topics.input, evs)
        out = read_outputs(topics, len({e.id for e in sent}))
        return {v["event_id"]: v for _, v in out[topics.decisions]}, out

    got, _ = round_(base)
    got, _ = round_(renamed("hit"))
    assert all(got[e.id]["cached"] for e in renamed("hit")), "the cache should serve repeated images"

    errors_before = sum(s.value for s in metrics.REDIS_ERRORS.collect()[0].samples if s.name.endswith("_total"))
    local_redis.stop()
    got, out = round_(renamed("down"))
    assert all(e.id in got and not got[e.id]["cached"] for e in renamed("down")), "decided without Redis"
    errors_after = sum(s.value for s in metrics.REDIS_ERRORS.collect()[0].samples if s.name.endswith("_total"))
    assert errors_after > errors_before
    assert _status(worker.http_port, "/healthz") == 200 and _status(worker.http_port, "/readyz") == 200

    local_redis.start()  # same port, empty: the worker reconnects after its retry window
    time.sleep(0.6)
    got, _ = round_(renamed("back1"))
    got, out = round_(renamed("back2"))
    assert all(got[e.id]["cached"] for e in renamed("back2")), "cache in use again after Redis returned"
    assert out[topics.dead_letter] == []
    assert {v["event_id"] for _, v in out[topics.decisions]} == {e.id for e in sent}


def _pid_of(kafka: LocalKafka) -> int:
    """The broker JVM's pid, found by its working directory on the command line."""
    marker = str(kafka.workdir).encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes()
                if marker in cmd and b"kafka.Kafka" in cmd:
                    return int(proc.name)
    raise AssertionError(f"no broker process found for {kafka.workdir}")


@pytest.fixture
def pausable_broker(services):
    """(bootstrap, pid) of a local broker this test may freeze: the session's own when it
    was started locally, else a private one."""
    if services.local_kafka is not None:
        yield services.kafka_bootstrap, _pid_of(services.local_kafka)
        return
    with LocalKafka() as kafka:
        yield kafka.bootstrap_servers, _pid_of(kafka)


def _topics_on(bootstrap: str, prefix: str) -> tuple[str, SimpleNamespace]:
    """A run name and its five topics (2-partition input and decisions), created on ``bootstrap``."""
    run = f"{prefix}-{time.monotonic_ns() % 10**8}"
    topics = SimpleNamespace(input=f"{run}.images", decisions=f"{run}.decisions", flagged=f"{run}.flagged",
                             review=f"{run}.review", dead_letter=f"{run}.dead-letter")
    ensure_topics(bootstrap, {topics.input: 2, topics.decisions: 2, topics.flagged: 1, topics.review: 1,
                              topics.dead_letter: 1})
    return run, topics


def test_broker_frozen_for_seconds_loses_nothing(random_model_dir, pausable_broker, worker_settings, start_worker,
                                                 read_outputs):
    bootstrap, pid = pausable_broker
    run, topics = _topics_on(bootstrap, "freeze")
    worker = start_worker(worker_settings(random_model_dir, topics, kafka_bootstrap_servers=bootstrap))
    events = list(synthetic_events(240, seed=77, size=48, id_prefix=run))
    producer = threading.Thread(target=produce, args=(bootstrap, topics.input, events), kwargs={"rate": 40.0},
                                daemon=True)
    producer.start()
    _wait(lambda: worker.stats.inputs_acked >= 40, 60, "the worker to get going")
    os.kill(pid, signal.SIGSTOP)  # the broker stops answering: requests hang, nothing is refused
    in_flight_at_freeze = worker.tracker.in_flight  # nothing more can be fetched until it resumes
    try:
        time.sleep(0.5)  # acknowledgements already on their way land
        acked_at_freeze = worker.stats.inputs_acked
        time.sleep(3.5)
        acked_while_frozen = worker.stats.inputs_acked
    finally:
        os.kill(pid, signal.SIGCONT)
    # an input is acknowledged only once the broker has its outputs: nothing while it is frozen
    assert acked_while_frozen == acked_at_freeze, (acked_at_freeze, acked_while_frozen)
    producer.join(120)
    out = read_outputs(topics, len(events), timeout_s=120, bootstrap=bootstrap)
    decisions = out[topics.decisions]
    missing = sorted({e.id for e in events} - {v["event_id"] for _, v in decisions})
    assert not missing, f"{len(missing)} events lost, e.g. {missing[:5]}"
    assert out[topics.dead_letter] == []
    assert _status(worker.http_port, "/healthz") == 200
    dups = _duplicates(decisions)
    print(f"\nbroker frozen 4s: {len(events)} events, {len(decisions)} decisions, {sum(dups.values())} duplicates; "
          f"{acked_while_frozen} acked when it resumed")
    # no crash: only a lost group membership (session timeout during the freeze) can replay, and
    # then only what was in flight when the broker froze, or acknowledged in the last commit interval
    # before it (at 40 events/s and 200 ms: 8)
    assert sum(dups.values()) <= in_flight_at_freeze + 8, (dups, in_flight_at_freeze)
    _assert_duplicates_repeat_the_decision(decisions)


BROKER_RECOVERY_BOUND_S = 45.0  # broker serving again -> the worker acknowledging again


def test_broker_killed_and_restarted_loses_nothing_and_the_worker_recovers_by_itself(
        random_model_dir, worker_settings, start_worker, read_outputs):
    """SIGKILL the broker mid-stream (no controlled shutdown), restart it on the same data: the
    same worker (no restart of its own) resumes within BROKER_RECOVERY_BOUND_S and nothing is lost."""
    with LocalKafka() as kafka:
        bootstrap = kafka.bootstrap_servers
        run, topics = _topics_on(bootstrap, "kill")
        worker = start_worker(worker_settings(random_model_dir, topics, kafka_bootstrap_servers=bootstrap))
        events = list(synthetic_events(240, seed=78, size=48, id_prefix=run))
        produced: list = []

        def producer_run():
            try:
                produced.append(produce(bootstrap, topics.input, events, rate=40.0))
            except Exception as e:  # noqa: BLE001 -- reported below
                produced.append(e)

        producer = threading.Thread(target=producer_run, daemon=True)
        producer.start()
        _wait(lambda: worker.stats.inputs_acked >= 40, 60, "the worker to get going")
        kafka.kill()
        time.sleep(2)  # down: requests fail, connections are refused
        kafka.restart()
        up_at, acked_at_up = time.monotonic(), worker.stats.inputs_acked
        _wait(lambda: worker.stats.inputs_acked > acked_at_up, BROKER_RECOVERY_BOUND_S,
              f"the worker to acknowledge again within {BROKER_RECOVERY_BOUND_S}s of the broker's return")
        recovery_s = time.monotonic() - up_at
        producer.join(180)
        assert produced and not isinstance(produced[0], Exception), produced
        out = read_outputs(topics, len(events), timeout_s=120, bootstrap=bootstrap)
        assert worker.thread.is_alive() and _status(worker.http_port, "/healthz") == 200
        worker.request_stop()  # while the broker is still there to commit to
        worker.thread.join(60)
    decisions = out[topics.decisions]
    missing = sorted({e.id for e in events} - {v["event_id"] for _, v in decisions})
    assert not missing, f"{len(missing)} events lost, e.g. {missing[:5]}"
    assert out[topics.dead_letter] == []
    dups = _duplicates(decisions)
    _assert_duplicates_repeat_the_decision(decisions)
    print(f"\nbroker SIGKILLed and restarted ({kafka.restart_seconds:.1f}s to serve again): worker acknowledging "
          f"again {recovery_s:.1f}s later; {len(decisions)} decisions for {len(events)} events, "
          f"{sum(dups.values())} duplicates")
