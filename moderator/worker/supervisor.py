"""``moderator run --processes N``: N worker processes behind one ops port.

One Python process decides at most about a thousand events a second, whatever the
hardware: its Python (parsing, Kafka, batching, publishing) runs under one GIL. A
pod with many cores, or one GPU that encodes tens of thousands of images a second,
needs several. Each child is an ordinary ``moderator run``: its own consumer-group
member, producer, encoder (and CUDA context), commits and guarantees, so nothing
about at-least-once or exactly-once changes; the group spreads partitions over the
children as over pods.

The supervisor:

- starts the children with the parent's own command line plus per-child flags (a
  flag beats an environment variable): ``--processes 1``, a loopback ops port,
  ``--client-id <client_id>-<i>``, under exactly-once ``--transactional-id
  <transactional id>-<i>`` (stable across restarts: a restarted child fences its
  predecessor's transaction), and its share of the CPUs (``--ort-threads``,
  ``--decode-concurrency``);
- serves the pod's ``/metrics`` (every child's series with a ``process`` label, and
  its own ``moderator_worker_processes`` and ``moderator_worker_process_restarts_total``),
  ``/healthz`` (every child alive and answering) and ``/readyz`` (every child ready);
- restarts a child that exits, with a backoff (1 s doubling to 30 s; reset after a
  minute up), except for a usage or configuration error (exit 2), which stops all
  of them with that status: a restart would only fail the same way;
- on SIGTERM/SIGINT passes the signal on, waits for the children to drain (their
  ``shutdown_grace_s`` plus a margin), and exits with the worst child status; a
  second signal kills them at once.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from moderator import metrics
from moderator.config import WorkerSettings, available_cpus
from moderator.errors import EXIT_INTERRUPTED, EXIT_USAGE
from moderator.settings_cli import flag_of
from moderator.worker.http import OpsServer, free_loopback_port, local_get

log = logging.getLogger(__name__)

SUPERVISOR_PID_ENV = "MODERATOR_SUPERVISOR_PID"  # set in each child: not a setting, the supervisor's pid
BACKOFF_S = (1.0, 30.0)  # first restart delay, the most it doubles to
STABLE_S = 60.0  # up this long: the next failure starts the backoff over
PROBE_TIMEOUT_S = 2.0
STARTING_S = 600.0  # a started process may load its model this long before its silence is a failure
SILENT_S = 10.0  # an answering process silent this long hangs (shorter: dying, or a slow moment)


def child_resources(s: WorkerSettings, processes: int, cpus: int | None = None) -> tuple[int, int]:
    """(ORT threads, decode threads) of each of ``processes`` children: ``ort_threads`` is the
    pod's total (the chart sets it from the CPU request), else the CPUs, shared out; an explicit
    ``decode_concurrency`` applies to each child, else cores per child - 1 (at least 1)."""
    total = s.ort_threads or cpus or available_cpus()
    share = max(1, math.ceil(total / processes))
    return share, s.decode_concurrency or s.decode_slots(cpus=share)


@dataclass
class Child:
    index: int
    client_id: str
    port: int = 0
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_S[0]
    restart_at: float | None = None  # exited: started again at this time
    last_status: int | None = None
    answered: bool = False  # its /healthz has answered 200 since it was (re)started
    silent_since: float | None = None  # answered before, not now: since when

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str) -> tuple[int, bytes]:
        return local_get(self.port, path, PROBE_TIMEOUT_S)


class ChildrenCollector:
    """Every child's ``/metrics``, each series with a ``process`` label, one family per name, and
    this supervisor's own ``process_*`` series (RSS, CPU, open files) as ``process="supervisor"``."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self._own = ProcessCollector(registry=None)

    def collect(self):
        families: dict[str, Metric] = {}

        def add(fams, process: str) -> None:  # each series relabelled, merged into one family per name
            for fam in fams:
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for sample in fam.samples:
                    out.add_sample(sample.name, {**sample.labels, "process": process}, sample.value,
                                   sample.timestamp, sample.exemplar)

        alive = [c for c in self.children if c.alive()]
        with ThreadPoolExecutor(max(1, len(alive)), thread_name_prefix="scrape") as pool:  # in parallel
            scraped = list(pool.map(lambda c: c.get("/metrics"), alive))
        for child, (status, body) in zip(alive, scraped):
            if status != 200:
                continue
            try:
                parsed = list(text_string_to_metric_families(body.decode("utf-8", "replace")))
            except Exception as e:  # a half-written scrape of a dying child: skip it this time
                log.debug("process %d metrics unreadable: %s", child.index, e)
                continue
            add(parsed, str(child.index))
        add(self._own.collect(), "supervisor")
        yield from families.values()


class Supervisor:
    def __init__(self, settings: WorkerSettings, argv: list[str]) -> None:
        if settings.processes < 2:
            raise ValueError("a supervisor runs 2 or more processes")
        self.s = settings
        self.argv = list(argv)
        self.n = settings.processes
        self.children = [Child(i, f"{settings.client_id}-{i}") for i in range(self.n)]
        self._stop = threading.Event()
        self._signals = 0
        self._fatal: int | None = None
        self.registry = CollectorRegistry()  # the processes' series, these two and its own process_*
        metrics.WORKER_PROCESSES.set(self.n)
        self._restarts = metrics.WORKER_PROCESS_RESTARTS
        for c in self.children:
            self._restarts.labels(process=str(c.index))
        for collector in (metrics.WORKER_PROCESSES, metrics.WORKER_PROCESS_RESTARTS, ChildrenCollector(self.children)):
            self.registry.register(collector)
        self.ops = OpsServer(settings.http_host, settings.http_port, health=self.health, ready=self.ready,
                             registry=self.registry)

    # -- children ----------------------------------------------------------------------------------

    def child_command(self, child: Child) -> list[str]:
        threads, decode = child_resources(self.s, self.n)
        extra = {"processes": "1", "http_host": "127.0.0.1", "http_port": str(child.port),
                 "client_id": child.client_id, "ort_threads": str(threads), "decode_concurrency": str(decode)}
        if self.s.processing_guarantee == "exactly_once":
            extra["transactional_id"] = f"{self.s.resolved_transactional_id()}-{child.index}"
        flags = [x for name, value in extra.items() for x in (flag_of(name), value)]
        return [sys.executable, "-m", "moderator", *self.argv, *flags]

    def _spawn(self, child: Child) -> None:
        child.port = free_loopback_port()
        cmd = self.child_command(child)
        # logs: this container's stdout/stderr. Own session: a terminal's Ctrl-C reaches the supervisor
        # only, which passes one SIGTERM on (a second signal would make a child skip its drain); a
        # child whose supervisor dies (SIGKILL) notices it (SUPERVISOR_PID_ENV) and drains.
        child.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                                      env={**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())})
        child.started, child.restart_at, child.answered, child.silent_since = time.monotonic(), None, False, None
        log.info("worker process %d started (pid %d)", child.index, child.proc.pid,
                 extra={"event": "process_started", "worker_process": child.index, "pid": child.proc.pid,
                        "client_id": child.client_id})

    def _reap(self, child: Child) -> None:
        """A child exited while the supervisor runs: restart it after the backoff, or stop all."""
        rc = child.proc.returncode
        child.last_status = rc
        if rc == EXIT_USAGE:  # configuration: the next start fails the same way
            log.error("worker process %d exited with %d (usage or configuration error): stopping", child.index,
                      rc, extra={"event": "process_failed", "worker_process": child.index, "status": rc})
            self._fatal = rc
            self._stop.set()
            return
        if time.monotonic() - child.started > STABLE_S:
            child.backoff_s = BACKOFF_S[0]
        delay = child.backoff_s
        child.backoff_s = min(BACKOFF_S[1], child.backoff_s * 2)
        child.restart_at = time.monotonic() + delay
        child.proc = None
        log.warning("worker process %d exited with %s: starting it again in %.0f s", child.index, rc, delay,
                    extra={"event": "process_exited", "worker_process": child.index, "status": rc, "restart_in_s": delay})

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for c in self.children:
                if c.proc is not None and c.proc.poll() is not None:
                    self._reap(c)
                    if self._stop.is_set():
                        return
                if c.proc is None and c.restart_at is not None and now >= c.restart_at:
                    c.restarts += 1
                    self._restarts.labels(process=str(c.index)).inc()
                    self._spawn(c)

    # -- probes ------------------------------------------------------------------------------------

    def _probe(self, path: str) -> tuple[bool, dict]:
        """Every child asked at once: the answer comes within one child's timeout, inside the
        kubelet's probe timeout, however many children there are."""
        with ThreadPoolExecutor(len(self.children), thread_name_prefix="probe") as pool:
            statuses = list(pool.map(lambda c: c.get(path)[0] if c.alive() else 0, self.children))
        procs, ok = [], True
        for c, status in zip(self.children, statuses):
            ok &= status == 200
            procs.append({"process": c.index, "pid": c.pid, "client_id": c.client_id, "status": status,
                          "restarts": c.restarts, "last_exit_status": c.last_status})
        return ok, {"processes": procs}

    def health(self) -> tuple[bool, dict]:
        """Alive unless a process hangs: each one answers ``/healthz``, or is still loading its
        model (silent for up to ``STARTING_S`` after its start), or has exited and waits for its
        restart (the supervisor's job, not the kubelet's: restarting the pod would stop the
        healthy ones too), or stopped answering less than ``SILENT_S`` ago (dying, or a slow
        moment). A process that crash-loops shows as not ready, with its exit status."""
        _, detail = self._probe("/healthz")
        now, ok = time.monotonic(), True
        for c, d in zip(self.children, detail["processes"]):
            if d["status"] == 200:
                c.answered, c.silent_since = True, None
                state = "up"
            elif not c.alive() and not self._stop.is_set():  # exited: the watch loop starts it again
                state = "restarting"
            elif not c.answered:
                state = "starting"
                ok &= now - c.started < STARTING_S
            else:  # answered before: dying (the watch loop restarts it) or hung (past SILENT_S)
                c.silent_since = c.silent_since or now
                state = "not answering"
                ok &= now - c.silent_since < SILENT_S
            d["state"] = state
        return ok, detail

    def ready(self) -> tuple[bool, dict]:
        """Ready: every child answers ``/readyz`` (joined its group, not stopping)."""
        ok, detail = self._probe("/readyz")
        return ok and not self._stop.is_set(), detail

    # -- run ---------------------------------------------------------------------------------------

    def run(self) -> int:
        self.ops.start()
        log.info("supervisor started", extra={"event": "supervisor_started", "processes": self.n,
                                              "http_port": self.ops.port})
        try:
            for c in self.children:
                self._spawn(c)
            self._watch()
            return self._shutdown()
        finally:
            self.ops.stop()

    def _shutdown(self) -> int:
        """SIGTERM every child, wait for their drains, then the worst status."""
        running = [c for c in self.children if c.alive()]
        for c in running:
            c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.s.shutdown_grace_s + 15.0
        statuses = []
        for c in running:
            try:
                rc = c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker process %d did not stop in time: killing it", c.index)
                c.proc.kill()
                rc = c.proc.wait()
            # still starting (no handler yet), it died of the SIGTERM asked of it: stopped, not failed
            statuses.append(0 if rc == -signal.SIGTERM else rc)
        if self._signals > 1:
            return EXIT_INTERRUPTED
        if self._fatal is not None:  # the configuration error that stopped them all
            status = self._fatal
        else:
            status = max((abs(rc) for rc in statuses if rc != 0), default=0)
        log.info("supervisor stopped", extra={"event": "supervisor_stopped", "status": status})
        return status

    def on_signal(self, signum, _frame) -> None:
        self._signals += 1
        if self._signals > 1:
            log.error("second signal: killing the worker processes")
            for c in self.children:
                if c.alive():
                    c.proc.kill()
        log.info("signal %s: stopping the worker processes", signal.Signals(signum).name,
                 extra={"event": "signal"})
        self._stop.set()


def run_supervisor(settings: WorkerSettings, argv: list[str]) -> int:
    """``moderator run --processes N`` (N >= 2); ``argv``: the command line after the program
    name, which every child gets again, followed by its own flags."""
    sup = Supervisor(settings, argv)
    signal.signal(signal.SIGTERM, sup.on_signal)
    signal.signal(signal.SIGINT, sup.on_signal)
    return sup.run()


__all__ = ["ChildrenCollector", "Supervisor", "child_resources", "run_supervisor"]
