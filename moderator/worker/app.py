"""The streaming worker (``moderator run``): Kafka in, micro-batches, decisions out, nothing lost.

``Worker.run()`` is four steps: start (ops port, policy watcher, producer,
consumer, pipeline threads), consume, drain, close. The parts:

- **consumer** (the caller of ``run()``): polls, registers each record with the
  ``OffsetTracker``, feeds the pipeline, pauses fetching when too much is in
  flight (back-pressure instead of memory growth) and lets the
  ``OffsetCommitter`` commit acknowledged offsets (``worker/commits.py``).
- **pipeline** (``worker/pipeline.py``): prepare pools (CPU work, network
  waits) on arrival -> batcher (prepared records, in order) -> encode thread: parse, fetch, hash, cache, decode, encode, decide, publish.
- kafka-python's own IO threads: the producer acknowledges records (-> the
  tracker marks an input done once *all* its records are acked) and the consumer
  runs the group protocol (-> the committer's rebalance hooks).

Delivery is at-least-once by default: an offset is committed only once every record
derived from it and from every earlier offset of its partition is acknowledged. A
crash or a revoked partition replays from the last commit; duplicates are possible,
loss is not. Bad input never stops the worker: every failure is a dead letter with a
reason code. A record the broker will not acknowledge within the delivery timeout
*does* stop it (exit 1) -- committing past it would lose it. With
``processing_guarantee=exactly_once`` each batch's outputs and offsets commit in one
Kafka transaction instead (``worker/transactions.py``): a failed send aborts and redoes
the batch.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

import numpy as np
from kafka.structs import TopicPartition

from moderator import metrics
from moderator.cache import ImageEmbeddingCache
from moderator.config import WorkerSettings
from moderator.decide.embeddings import InProcessCache, RedisEmbeddingCache
from moderator.decide.engine import PolicyCompiler
from moderator.decide.policy import load_policy
from moderator.decide.reload import PolicyWatcher
from moderator.decode import DecodeLimits
from moderator.encode import ModelDirectory, TextEncoder
from moderator.encode.factory import TorchOptions, open_image_encoder
from moderator.encode.onnx_backend import OrtOptions
from moderator.errors import EXIT_OK, EXIT_RUNTIME, ModelError, ModeratorError
from moderator.fetch import AddressPolicy, FetchLimits, UrlFetcher
from moderator.ingest import EventLimits, RebalanceHooks, make_consumer, subscribe
from moderator.ingest.access import check_kafka_access
from moderator.ingest.crc import check_native_crc32c
from moderator.publish import DecisionPublisher, OutputFormat, ShadowPublisher, SourceRecord, Topics
from moderator.redis_client import check_redis_access
from moderator.worker.commits import OffsetCommitter
from moderator.worker.http import OpsServer
from moderator.worker.offsets import OffsetTracker
from moderator.worker.pipeline import BatchStages, Pipeline, WorkerStats, WorkItem
from moderator.worker.threadcpu import ThreadCpu
from moderator.worker.transactions import BatchTransactions

log = logging.getLogger(__name__)

__all__ = ["Worker", "WorkerStats", "run_worker", "ort_options", "torch_options", "fetch_limits",
           "decode_limits", "event_limits"]


# -- limit and option objects, each built from WorkerSettings only (one source per setting) ----------

def gil_switch_interval_s(s: WorkerSettings, encoder_info: dict) -> float | None:
    """The GIL switch interval the worker sets, in seconds; None leaves Python's default.

    An encoder on a CUDA device gives the GIL up at every GPU call (nvJPEG, each resize, the
    graph replay, the copy back) and, while the prepare threads parse, waits for it each
    time until they are made to drop it: up to Python's default 5 ms, dozens of times a batch.
    """
    if s.gil_switch_interval_ms:
        return s.gil_switch_interval_ms / 1000
    device = str(encoder_info.get("device", ""))
    providers = encoder_info.get("providers") or []
    on_gpu = device.startswith("cuda") or any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                                             for p in providers)
    return 0.0005 if on_gpu else None


def ort_options(s: WorkerSettings) -> OrtOptions:
    return OrtOptions(providers=tuple(s.ort_providers), intra_op_threads=s.ort_threads, device_id=s.gpu_device_id,
                      trt_fp16=s.ort_trt_fp16, trt_engine_cache_dir=s.ort_trt_engine_cache_dir,
                      io_binding=s.ort_io_binding, allow_spinning=s.ort_spin_wait)


def torch_options(s: WorkerSettings) -> TorchOptions:
    return TorchOptions(device=s.torch_device, fp16=s.torch_fp16, cuda_graphs=s.torch_cuda_graphs,
                        max_batch=s.max_batch, gpu_decode=s.gpu_decode)


def fetch_limits(s: WorkerSettings) -> FetchLimits:
    return FetchLimits(connect_timeout_s=s.fetch_connect_timeout_s, read_timeout_s=s.fetch_read_timeout_s,
                       total_timeout_s=s.fetch_total_timeout_s, max_bytes=s.max_image_bytes,
                       max_redirects=s.fetch_max_redirects, user_agent=s.fetch_user_agent,
                       dns_timeout_s=s.fetch_dns_timeout_s)


def decode_limits(s: WorkerSettings) -> DecodeLimits:
    return DecodeLimits(max_bytes=s.max_image_bytes, max_pixels=s.max_pixels, formats=frozenset(s.image_formats))


def event_limits(s: WorkerSettings) -> EventLimits:
    return EventLimits(max_event_bytes=s.max_event_bytes, max_image_bytes=s.max_image_bytes)


class Worker:
    """Loads the model and policy at construction (fail fast); ``run()`` serves until stopped."""

    def __init__(self, settings: WorkerSettings, *, fetcher: UrlFetcher | None = None) -> None:
        s = self.s = settings
        self.stats = WorkerStats()
        self.tracker = OffsetTracker()
        self.exactly_once = s.processing_guarantee == "exactly_once"
        self.committer = OffsetCommitter(self.tracker, commit_interval_ms=s.commit_interval_ms,
                                         revoke_wait_ms=s.revoke_wait_ms, commits=not self.exactly_once)
        self.transactions: BatchTransactions | None = None
        self.ready_event = self.committer.assigned_once
        self._stop = threading.Event()
        self._deadline: float | None = None  # set when draining starts (shutdown_grace_s)
        self._fatal: BaseException | None = None
        self._encoder_warm = False
        self._consumer = None
        self._hooks: RebalanceHooks | None = None
        self._publisher: DecisionPublisher | None = None
        self.ops: OpsServer | None = None

        # kafka-python without its C CRC-32C runs at half speed: refuse (or say so) before anything else
        if not check_native_crc32c(s.kafka_require_native_crc32c):
            log.warning("kafka-python is checksumming records in pure Python: install `crc32c`",
                        extra={"event": "slow_crc32c"})
        self.model_dir = ModelDirectory(s.model_dir)
        self.model_sha256 = self.model_dir.model_sha256
        self.encoder = open_image_encoder(self.model_dir, s.encoder_backend, ort=ort_options(s),
                                          torch=torch_options(s), device_id=s.gpu_device_id)
        if s.redis_url:  # a refused login or untrusted certificate ends the start; an outage does not
            check_redis_access(s.redis_url, s.redis_options(), timeout_s=max(1.0, s.redis_timeout_s))
        self.engine, self._watcher, self.shadow_engine, self._shadow_watcher = self._load_policy()
        self.embedding_cache = (
            ImageEmbeddingCache.from_url(s.redis_url, s.image_embedding_cache_ttl_s, options=s.redis_options(),
                                         timeout_s=s.redis_timeout_s, retry_s=s.redis_retry_s)
            if s.redis_url and s.image_embedding_cache_ttl_s > 0 else None)
        self.pipeline = Pipeline(
            engine=self.engine, encoder=self.encoder, model_sha256=self.model_sha256,
            embed_dim=self.model_dir.manifest.embed_dim, tracker=self.tracker, stats=self.stats,
            fetcher=fetcher or UrlFetcher(fetch_limits(s), AddressPolicy(s.fetch_allow_networks,
                                                                         s.fetch_allow_hosts)),
            event_limits=event_limits(s), decode_limits=decode_limits(s), embedding_cache=self.embedding_cache,
            jpeg_draft=s.jpeg_draft, client_id=s.client_id,
            dead_letter_max_value_bytes=s.dead_letter_max_value_bytes, on_fatal=self._fail,
            device_jpeg=getattr(self.encoder, "device_jpeg", None),  # set only for torch on CUDA with gpu_decode
            shadow_engine=self.shadow_engine)
        self.stages = BatchStages(self.pipeline, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms,
                                  prepare_workers=s.prepare_workers, decode_slots=s.decode_slots(),
                                  adaptive=s.adaptive_batching,
                                  on_fatal=self._fail)
        info = getattr(self.encoder, "runtime_info", dict)()
        interval = gil_switch_interval_s(s, info)
        if interval is not None:
            sys.setswitchinterval(interval)  # process-wide: one worker per process
        metrics.MODEL_INFO.info({"architecture": self.model_dir.manifest.architecture,
                                 "sha256": self.model_sha256, "precision": self.model_dir.manifest.precision,
                                 "backend": s.encoder_backend,
                                 "providers": ",".join(info.get("providers", [info.get("device", "")])),
                                 "device": str(info.get("device", getattr(self.encoder, "output_device", "cpu"))),
                                 "quantization": self._quantization()})
        metrics.WORKER_INFO.info({"client_id": s.client_id, "group": s.consumer_group,
                                  "input_topic": s.input_topic})
        log.info("image encoder ready", extra={"event": "encoder", **{k: str(v) for k, v in info.items()}})

    def _load_policy(self):
        s = self.s
        prompt_cache = (RedisEmbeddingCache.from_url(s.redis_url, timeout=s.redis_timeout_s,
                                                     options=s.redis_options())
                        if s.redis_url else InProcessCache())
        # The text encoder runs on ONNX Runtime's CPU provider whatever the image backend:
        # prompts are embedded once per policy version and cached.
        compile_fn = PolicyCompiler(
            self.model_dir, prompt_cache,
            lambda: TextEncoder(self.model_dir, options=OrtOptions(providers=("CPUExecutionProvider",),
                                                                   intra_op_threads=s.ort_threads)))
        engine = compile_fn.engine(load_policy(s.policy))
        watcher = (PolicyWatcher(s.policy, engine, compile_fn, s.policy_reload_interval_s)
                   if s.policy_reload_interval_s > 0 else None)
        shadow = shadow_watcher = None
        if s.shadow_policy is not None:  # an invalid shadow policy fails the start like the live one
            shadow = compile_fn.engine(load_policy(s.shadow_policy), shadow=True)
            if s.policy_reload_interval_s > 0:
                shadow_watcher = PolicyWatcher(s.shadow_policy, shadow, compile_fn, s.policy_reload_interval_s,
                                               name="shadow policy")
            log.info("shadow policy loaded", extra={"event": "shadow_policy", "version": shadow.policy.version,
                                                    "topic": s.shadow_decisions_topic})
        return engine, watcher, shadow, shadow_watcher

    def _quantization(self) -> str:
        q = self.model_dir.manifest.quantization
        return q.method if q is not None else "none"

    # -- lifecycle ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop fetching, drain, commit, close (what SIGTERM does). Safe from any thread."""
        self._stop.set()

    @property
    def http_port(self) -> int | None:
        return self.ops.port if self.ops else None

    def _health(self) -> tuple[bool, dict]:
        dead = ([t.name for t in self.stages.threads if t.ident is not None and not t.is_alive()]
                if not self._stop.is_set() else [])
        ok = self._fatal is None and not dead
        return ok, {"fatal": repr(self._fatal) if self._fatal else None, "dead_threads": dead}

    def _ready_probe(self) -> tuple[bool, dict]:
        """/readyz and ``moderator_worker_ready`` (the same function). Ready: the encoder has
        run a warm-up batch, the consumer has joined its group (an empty assignment counts: a
        replica beyond the partition count is a standby that takes partitions at the next
        rebalance, reported by ``moderator_assigned_partitions`` 0), and it is not stopping.
        A model or policy that fails to load never gets here: the process exits at start."""
        checks = {
            "encoder_warm": self._encoder_warm,
            "group_joined": self.ready_event.is_set(),
            "not_stopping": not self._stop.is_set(),
        }
        partitions = sorted(f"{tp.topic}/{tp.partition}" for tp in self.tracker.assigned())
        detail = {"checks": checks, "policy_version": self.engine.policy.version,
                  "model_sha256": self.model_sha256, "partitions": partitions}
        if self.shadow_engine is not None:
            detail["shadow_policy_version"] = self.shadow_engine.policy.version
        if checks["group_joined"] and not partitions:
            detail["note"] = "holds no partitions: a standby until the next rebalance"
        return all(checks.values()), detail

    def _warm_up(self) -> None:
        """One batch through the image encoder before the worker joins its group: a model that
        loads but cannot run (bad provider, out of device memory) fails the start, not the
        first batch."""
        h, w = self.encoder.preprocessor.image_size
        try:
            out = self.encoder.encode_uint8(np.zeros((1, h, w, 3), dtype=np.uint8))  # the batches' own path
        except Exception as e:
            raise ModelError(f"the image encoder failed its warm-up batch: {type(e).__name__}: {e}") from e
        if out.shape != (1, self.model_dir.manifest.embed_dim) or not np.isfinite(out).all():
            raise ModelError(f"the image encoder's warm-up batch gave {out.shape}, not finite "
                             f"(1, {self.model_dir.manifest.embed_dim}) embeddings")
        self._encoder_warm = True

    def _fail(self, err: BaseException) -> None:
        if self._fatal is None:
            self._fatal = err
            log.error("stopping: %s", err, extra={"event": "fatal", "error": repr(err)})
        self._stop.set()

    def run(self) -> int:
        """Serve until ``request_stop()`` (or a fatal delivery error). Returns the exit status."""
        with contextlib.ExitStack() as closing:
            try:
                self._start(closing)
            except ModeratorError as e:  # the CLI prints it and exits 2; the JSON log says it too
                log.error("cannot start: %s", e, extra={"event": "fatal", "reason": e.reason})
                raise
            try:
                self._consume()
            except Exception as e:
                log.exception("consumer loop failed")
                self._fail(e)
            finally:  # KeyboardInterrupt in an embedding process drains too
                self._drain()
        log.info("stopped", extra={"event": "stopped", **{
            k: v for k, v in self.stats.snapshot().items() if not k.endswith("_at") and k != "stage_seconds"}})
        return EXIT_RUNTIME if self._fatal is not None else EXIT_OK

    def _start(self, closing: contextlib.ExitStack) -> None:
        """Everything that serves, each with its teardown registered (undone in reverse order)."""
        s = self.s
        self.ops = OpsServer(s.http_host, s.http_port, health=self._health, ready=self._ready_probe,
                             before_scrape=ThreadCpu().update).start()
        closing.callback(self.ops.stop)
        metrics.WORKER_READY.set_function(lambda: float(self._ready_probe()[0]))
        metrics.ASSIGNED_PARTITIONS.set_function(lambda: float(len(self.tracker.assigned())))
        closing.callback(metrics.WORKER_READY.set_function, lambda: 0.0)
        closing.callback(metrics.ASSIGNED_PARTITIONS.set_function, lambda: 0.0)
        self._warm_up()
        for watcher in (self._watcher, self._shadow_watcher):
            if watcher:
                watcher.start()
                closing.callback(watcher.stop)
        if self.embedding_cache is not None:
            closing.callback(self.embedding_cache.close)
        closing.callback(self.stages.shutdown)
        # A refused login or an untrusted certificate ends the start here, named (exit 2), while
        # /readyz says not ready; kafka-python alone would retry in its IO thread and log.
        seconds = check_kafka_access(s.kafka_bootstrap_servers, s.kafka_security(),
                                     timeout_s=s.kafka_startup_timeout_s, client_id=f"{s.client_id}-check",
                                     stop=self._stop)
        log.info("kafka reachable", extra={"event": "kafka_access", "seconds": round(seconds, 3),
                                           "security_protocol": s.kafka_security_protocol})
        output = OutputFormat.from_settings(s)  # json, or CloudEvents (binary or structured)
        self._publisher = DecisionPublisher(
            s.kafka_bootstrap_servers, Topics(*s.output_topics()), client_id=s.client_id, linger_ms=s.linger_ms,
            delivery_timeout_ms=s.delivery_timeout_ms, security=s.kafka_security(),
            transactional_id=s.resolved_transactional_id() if self.exactly_once else None,
            transaction_timeout_ms=s.transaction_timeout_ms, output=output)
        self.pipeline.publisher = self._publisher
        if self.shadow_engine is not None:  # its own producer and thread: nothing live waits on it
            shadow = ShadowPublisher(s.kafka_bootstrap_servers, s.shadow_decisions_topic, client_id=s.client_id,
                                     linger_ms=s.linger_ms, security=s.kafka_security(), output=output)
            closing.callback(shadow.close)
            shadow.check_topic(s.kafka_startup_timeout_s)
            self.pipeline.shadow_publisher = shadow.start()
        if self.exactly_once:
            self.transactions = BatchTransactions(
                self._publisher.producer, lambda: self._consumer.group_metadata(), self.tracker,
                timeout_s=s.transaction_timeout_ms / 1000, on_done=self.pipeline.complete)
            self.transactions.init()
            self.pipeline.commit_on_ack = False
            self.pipeline.send_failed = self.transactions.send_failed
            self.stages.transactions = self.transactions
        closing.callback(self._close_producer)
        self._consumer = make_consumer(s)
        self.committer.attach(self._consumer)
        self._hooks = RebalanceHooks(self.committer.on_revoked, self.committer.on_assigned, self.committer.on_lost,
                                     drained=self.committer.drained, revoke_wait_s=self.committer.revoke_wait_s,
                                     committing=self.committer.committing,
                                     commit_wait_s=s.transaction_timeout_ms / 1000)
        subscribe(self._consumer, s.input_topic, self._hooks)
        closing.callback(self._close_consumer)
        self.stages.start()
        log.info("worker started", extra={"event": "started", "input_topic": s.input_topic,
                                          "group": s.consumer_group, "http_port": self.ops.port,
                                          "policy_version": self.engine.policy.version,
                                          "model_sha256": self.model_sha256, "encoder_backend": s.encoder_backend})

    # -- consumer thread ---------------------------------------------------------------------------

    def _consume(self) -> None:
        s, consumer = self.s, self._consumer
        while not self._stop.is_set():
            self._seek_rewinds()
            room = s.max_in_flight - self.tracker.in_flight
            if room <= 0 or self.tracker.in_flight_bytes >= s.max_in_flight_bytes:
                assigned = consumer.assignment()
                if assigned and not consumer.paused():
                    consumer.pause(*assigned)
                    metrics.CONSUMER_PAUSED.set(1)
                batch = consumer.poll(timeout_ms=100)
            else:
                paused = consumer.paused()
                if paused:
                    consumer.resume(*paused)
                    metrics.CONSUMER_PAUSED.set(0)
                batch = consumer.poll(timeout_ms=100, max_records=min(room, s.poll_max_records))
            for tp, records in batch.items():
                for rec in records:
                    self._ingest(tp, rec)
            metrics.IN_FLIGHT.set(self.tracker.in_flight)
            metrics.IN_FLIGHT_BYTES.set(self.tracker.in_flight_bytes)
            self.committer.tick()
            self._unstick_rebalance()

    def rebalance_limit_s(self) -> float:
        """How long a rebalance may leave this member without an assignment before it rejoins."""
        s = self.s
        return max(30.0, 3 * s.session_timeout_ms / 1000, s.revoke_wait_ms / 1000 + s.session_timeout_ms / 1000)

    def _unstick_rebalance(self) -> None:
        """A rebalance that never hands this member an assignment (not even an empty one) stalls
        the worker while it looks healthy: kafka-python 3.0.12 was seen not to finish a rejoin after
        a revoke. Past ``rebalance_limit_s`` the consumer leaves the group and subscribes again."""
        limit = self.rebalance_limit_s()
        if not self.committer.rebalance_stalled(limit):
            return
        metrics.REJOINS_FORCED.inc()
        log.warning("no partition assignment %.0f s after a revoke: leaving the group and joining again", limit,
                    extra={"event": "rejoin_forced", "limit_s": limit})
        self.committer.unassigned_since = time.monotonic()  # one try per limit
        try:
            held = self.tracker.assigned()
            if held:  # normally none (they were revoked); else commit what is done, redo the rest
                self.committer.on_revoked(held)
            self._consumer.unsubscribe()
            subscribe(self._consumer, self.s.input_topic, self._hooks, wait_s=5.0)
        except Exception as e:  # the next poll retries; the limit spaces the tries out
            log.warning("forced rejoin failed: %s", e, extra={"event": "rejoin_failed"})

    def _seek_rewinds(self) -> None:
        """Partitions to read again from an offset: a batch whose transaction aborted
        (exactly-once), or work dropped at a revoke when the rebalance gave the partition
        straight back (kafka-python kept its position past that work)."""
        for tp, offset in self.tracker.pending_rewinds().items():
            try:
                self._consumer.seek(tp, offset)
            except Exception as e:  # not assigned at this instant (a rebalance): try again next poll
                log.info("rewind of %s/%s to %d deferred: %s", tp.topic, tp.partition, offset, e)
                continue
            self.tracker.rewound(tp, offset)
            log.info("rewound %s/%s to %d", tp.topic, tp.partition, offset,
                     extra={"event": "rewound", "partition": f"{tp.topic}/{tp.partition}", "offset": offset})

    def _ingest(self, tp: TopicPartition, rec) -> None:
        metrics.EVENTS_CONSUMED.labels(topic=tp.topic).inc()
        value = rec.value
        epoch = self.tracker.track(tp, rec.offset, len(value or b""))
        if epoch is None:  # fetched just before a revoke: the new owner will read it
            return
        now = time.time()
        if self.stats.first_consumed_at is None:
            self.stats.first_consumed_at = now
        self.stats.add(consumed=1)
        src = SourceRecord(tp.topic, tp.partition, rec.offset, rec.timestamp, rec.key, value)
        self.stages.put(WorkItem(tp, epoch, src, list(rec.headers or ()), now, time.monotonic()))

    # -- drain and close -------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Finish what is in flight within the grace period (not after a fatal error), then commit."""
        s = self.s
        self._deadline = deadline = time.monotonic() + s.shutdown_grace_s
        log.info("draining", extra={"event": "draining", "in_flight": self.tracker.in_flight,
                                    "grace_s": s.shutdown_grace_s})
        self.stages.close()
        drained = False
        if self._fatal is None:
            self.stages.join(self._left())
            drained = self.tracker.wait_drained(self._left())
            try:
                self._publisher.flush(self._left())
            except Exception as e:
                log.warning("producer flush incomplete: %s", e)
        log.info("drained" if drained else "not drained", extra={
            "event": "drained", "drained": drained, "uncommitted_in_flight": self.tracker.in_flight,
            "left_s": round(max(0.0, deadline - time.monotonic()), 3)})

    def _left(self) -> float:
        return 0.0 if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def _close_consumer(self) -> None:
        self.committer.commit()
        self.committer.closing = True
        try:
            self._consumer.close(autocommit=False, timeout_ms=int(1000 * min(5.0, max(1.0, self._left()))))
        except Exception as e:
            log.warning("consumer close: %s", e)

    def _close_producer(self) -> None:
        try:
            self._publisher.close(timeout_s=max(1.0, self._left()))
        except Exception as e:
            log.warning("producer close: %s", e)


def run_worker(settings: WorkerSettings, argv: list[str] | None = None) -> int:
    """``moderator run``: JSON logs, SIGTERM/SIGINT drain (a second signal exits at once), serve.
    With ``processes`` > 1, a supervisor of that many worker processes, each started with
    ``argv`` (the command line after the program name; default ``["run"]``: settings from the
    environment) plus its own flags."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from moderator.logs import configure_logging, service_fields  # noqa: PLC0415

    configure_logging(settings.log_level, settings.log_json, service_fields(settings.client_id))
    if settings.processes > 1:
        from moderator.worker.supervisor import run_supervisor  # noqa: PLC0415

        return run_supervisor(settings, argv if argv is not None else ["run"])
    try:
        worker = Worker(settings)
    except ModeratorError as e:  # model, policy, Redis credentials: the CLI prints it and exits 2
        log.error("cannot start: %s", e, extra={"event": "fatal", "reason": e.reason})
        raise
    signals = {"n": 0}

    def on_signal(signum, _frame) -> None:
        signals["n"] += 1
        if signals["n"] > 1:
            log.error("second signal: exiting without draining")
            os._exit(130)
        log.info("signal %s: draining", signal.Signals(signum).name, extra={"event": "signal"})
        worker.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _watch_supervisor(worker)
    return worker.run()


def _watch_supervisor(worker: Worker) -> None:
    """A worker process started by ``--processes`` drains and exits when its supervisor dies
    (SIGKILL, OOM kill) instead of running on unsupervised; it is then re-parented."""
    import os  # noqa: PLC0415

    from moderator.worker.supervisor import SUPERVISOR_PID_ENV  # noqa: PLC0415

    try:
        supervisor = int(os.environ.get(SUPERVISOR_PID_ENV, ""))
    except ValueError:  # not started by a supervisor
        return

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(1.0)
        log.error("the supervisor (pid %s) is gone: draining", supervisor, extra={"event": "supervisor_gone"})
        worker.request_stop()

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()
