"""The streaming worker (``moderator run``): Kafka in, micro-batches, decisions out, nothing lost.

Threads and what each owns:

- **consumer** (the caller of ``run()``): polls, registers each record with the
  ``OffsetTracker``, feeds the ``MicroBatcher``, pauses fetching when too much is
  in flight (back-pressure instead of memory growth), commits acknowledged
  offsets, and on SIGTERM drains and closes within the grace period.
- **dispatch**: takes closed batches and submits every record's *prepare* step
  (parse, fetch, hash, cache lookup, decode, preprocess) to a bounded thread pool;
  at most two batches wait for the encoder, so decoding the next batch overlaps
  encoding this one and a slow encoder stalls the batcher, not memory.
- **encode**: one ``ImageEncoder`` call per batch for the cache misses, then the
  policy, then publishing. Decisions and dead letters leave in consumption order.
- kafka-python's own IO threads: the producer acknowledges records (-> the
  tracker marks an input done once *all* its records are acked) and the consumer
  runs the group protocol (-> ``_on_revoked`` / ``_on_assigned``).

Delivery is at-least-once: an offset is committed only once every record derived
from it and from every earlier offset of its partition is acknowledged. A crash
or a revoked partition replays from the last commit; duplicates are possible,
loss is not. Bad input never stops the worker: every failure is a dead letter
with a reason code. A record the broker will not acknowledge within the delivery
timeout *does* stop it (exit 1) -- committing past it would lose it.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from kafka.structs import TopicPartition

from moderator import metrics
from moderator.batching import MicroBatcher
from moderator.cache import DecisionCache, cache_key
from moderator.config import WorkerSettings
from moderator.decide.embeddings import InProcessCache, RedisEmbeddingCache
from moderator.decide.engine import PolicyCompiler
from moderator.decide.policy import load_policy
from moderator.decide.reload import PolicyWatcher
from moderator.decode import DecodeLimits, decode_image
from moderator.encode import ImageEncoder, ModelDirectory, TextEncoder
from moderator.errors import DeliveryError, ModeratorError
from moderator.fetch import AddressPolicy, FetchLimits, UrlFetcher
from moderator.ingest import EventLimits, ParsedEvent, RebalanceHooks, make_consumer, parse_record, subscribe
from moderator.publish import DecisionPublisher, SourceRecord, Topics, build_dead_letter
from moderator.worker.http import OpsServer
from moderator.worker.offsets import OffsetTracker

log = logging.getLogger(__name__)


@dataclass
class WorkItem:
    tp: TopicPartition
    epoch: int
    source: SourceRecord
    headers: list
    consumed_wall: float
    consumed_mono: float


@dataclass
class Prepared:
    item: WorkItem
    event: ParsedEvent | None = None
    event_id: str | None = None
    error: ModeratorError | None = None
    image_sha256: str | None = None
    pixels: np.ndarray | None = None
    embedding: np.ndarray | None = None
    cached: bool = False
    stale: bool = False
    published: bool = False
    timings: dict = field(default_factory=dict)


@dataclass
class WorkerStats:
    """Counters for tests, the benchmark and the demo (Prometheus has the same, by label)."""

    consumed: int = 0
    decisions: int = 0
    dead_letters: int = 0
    cache_hits: int = 0
    inputs_acked: int = 0
    first_consumed_at: float | None = None
    last_acked_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class Worker:
    """Loads the model and policy at construction (fail fast); ``run()`` serves until stopped."""

    def __init__(self, settings: WorkerSettings, *, fetcher: UrlFetcher | None = None) -> None:
        self.s = settings
        self.stats = WorkerStats()
        self.tracker = OffsetTracker()
        self._stop = threading.Event()
        self.ready_event = threading.Event()
        self._fatal: BaseException | None = None
        self._closing = False
        self._consumer = None
        self._publisher: DecisionPublisher | None = None
        self.ops: OpsServer | None = None

        # model + policy (the decide stage), Redis-cached prompt embeddings when configured
        self.model_dir = ModelDirectory(settings.model_dir)
        self.model_sha256 = self.model_dir.model_sha256
        threads = settings.ort_threads or None
        self.encoder = ImageEncoder(self.model_dir, providers=settings.ort_providers or None, intra_op_threads=threads)
        self.preprocessor = self.encoder.preprocessor
        self.embed_dim = self.model_dir.manifest.embed_dim
        prompt_cache = (RedisEmbeddingCache.from_url(settings.redis_url, timeout=settings.redis_timeout_s)
                        if settings.redis_url else InProcessCache())

        compile_fn = PolicyCompiler(
            self.model_dir, prompt_cache,
            lambda: TextEncoder(self.model_dir, providers=settings.ort_providers or None, intra_op_threads=threads))
        self.engine = compile_fn.engine(load_policy(settings.policy))
        self._watcher = (PolicyWatcher(settings.policy, self.engine, compile_fn, settings.policy_reload_interval_s)
                         if settings.policy_reload_interval_s > 0 else None)
        self.decision_cache = (
            DecisionCache.from_url(settings.redis_url, settings.decision_cache_ttl_s,
                                   timeout_s=settings.redis_timeout_s, retry_s=settings.redis_retry_s)
            if settings.redis_url and settings.decision_cache_ttl_s > 0 else None)

        self.fetcher = fetcher or UrlFetcher(
            FetchLimits(connect_timeout_s=settings.fetch_connect_timeout_s,
                        read_timeout_s=settings.fetch_read_timeout_s,
                        total_timeout_s=settings.fetch_total_timeout_s,
                        max_bytes=settings.max_image_bytes, max_redirects=settings.fetch_max_redirects,
                        user_agent=settings.fetch_user_agent),
            AddressPolicy(settings.fetch_allow_networks, settings.fetch_allow_hosts))
        self.decode_limits = DecodeLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_pixels,
                                          formats=frozenset(settings.image_formats))
        self.event_limits = EventLimits(max_event_bytes=settings.max_event_bytes,
                                        max_image_bytes=settings.max_image_bytes)
        self.topics = Topics(settings.decisions_topic, settings.flagged_topic, settings.review_topic,
                             settings.dead_letter_topic)

        self.batcher: MicroBatcher[WorkItem] = MicroBatcher(settings.max_batch, settings.max_wait_ms)
        self._ready: queue.Queue = queue.Queue(maxsize=2)
        self._pool = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="prepare")
        self._threads: list[threading.Thread] = []

        metrics.MODEL_INFO.info({"architecture": self.model_dir.manifest.architecture,
                                 "sha256": self.model_sha256, "precision": self.model_dir.manifest.precision,
                                 "providers": ",".join(self.encoder.providers)})
        metrics.WORKER_INFO.info({"client_id": settings.client_id, "group": settings.consumer_group,
                                  "input_topic": settings.input_topic})

    # -- lifecycle ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop fetching, drain, commit, close (what SIGTERM does). Safe from any thread."""
        self._stop.set()

    @property
    def http_port(self) -> int | None:
        return self.ops.port if self.ops else None

    def _health(self) -> tuple[bool, dict]:
        dead = [t.name for t in self._threads if not t.is_alive()] if not self._stop.is_set() else []
        ok = self._fatal is None and not dead
        return ok, {"fatal": repr(self._fatal) if self._fatal else None, "dead_threads": dead}

    def _ready_probe(self) -> tuple[bool, dict]:
        checks = {
            "model_loaded": self.encoder is not None,
            "policy_loaded": self.engine is not None,
            "consumer_assigned": self.ready_event.is_set(),
            "not_stopping": not self._stop.is_set(),
        }
        detail = {"checks": checks, "policy_version": self.engine.policy.version,
                  "model_sha256": self.model_sha256,
                  "partitions": sorted(f"{tp.topic}/{tp.partition}" for tp in self.tracker.assigned())}
        return all(checks.values()), detail

    def _fail(self, err: BaseException) -> None:
        if self._fatal is None:
            self._fatal = err
            log.error("stopping: %s", err, extra={"event": "fatal", "error": repr(err)})
        self._stop.set()

    def run(self) -> int:
        """Serve until ``request_stop()`` (or a fatal delivery error). Returns the exit status."""
        s = self.s
        self.ops = OpsServer(s.http_host, s.http_port, health=self._health, ready=self._ready_probe).start()
        if self._watcher:
            self._watcher.start()
        self._publisher = DecisionPublisher(s.kafka_bootstrap_servers, self.topics, client_id=s.client_id,
                                            linger_ms=s.linger_ms, delivery_timeout_ms=s.delivery_timeout_ms,
                                            security=s.kafka_security())
        self._consumer = make_consumer(s)
        subscribe(self._consumer, s.input_topic,
                  RebalanceHooks(self._on_revoked, self._on_assigned, self._on_lost))
        self._threads = [threading.Thread(target=self._dispatch_loop, name="dispatch", daemon=True),
                         threading.Thread(target=self._encode_loop, name="encode", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("worker started", extra={"event": "started", "input_topic": s.input_topic,
                                          "group": s.consumer_group, "http_port": self.ops.port,
                                          "policy_version": self.engine.policy.version,
                                          "model_sha256": self.model_sha256})
        try:
            self._consume_loop()
        except Exception as e:
            log.exception("consumer loop failed")
            self._fail(e)
        finally:
            self._shutdown()
        return 1 if self._fatal is not None else 0

    # -- consumer thread ---------------------------------------------------------------------------

    def _consume_loop(self) -> None:
        s, consumer = self.s, self._consumer
        next_commit = time.monotonic() + s.commit_interval_ms / 1000
        while not self._stop.is_set():
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
            if time.monotonic() >= next_commit:
                self._commit()
                self._update_lag()
                next_commit = time.monotonic() + s.commit_interval_ms / 1000

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
        self.batcher.put(WorkItem(tp, epoch, src, list(rec.headers or ()), now, time.monotonic()))

    def _commit(self) -> None:
        offsets = self.tracker.to_commit()
        if not offsets:
            return
        try:
            self._consumer.commit(offsets, timeout_ms=10_000)
        except Exception as e:  # rebalance in progress, coordinator moving: offered again next time
            metrics.OFFSET_COMMITS.labels(result="error").inc()
            log.warning("offset commit failed (will retry): %s: %s", type(e).__name__, e,
                        extra={"event": "commit_failed"})
            return
        self.tracker.committed(offsets)
        metrics.OFFSET_COMMITS.labels(result="ok").inc()

    def _update_lag(self) -> None:
        for tp, pos in self.tracker.consumed_positions().items():
            hw = self._consumer.highwater(tp)
            if hw is not None:
                metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, hw - pos))

    # -- rebalance hooks (kafka-python's IO thread: no blocking consumer calls) -------------------

    def _on_assigned(self, tps: set[TopicPartition]) -> None:
        self.tracker.assign(tps)
        metrics.REBALANCES.labels(event="assigned").inc(len(tps))
        self.ready_event.set()
        metrics.WORKER_READY.set(1)
        log.info("partitions assigned", extra={"event": "assigned",
                                               "partitions": sorted(f"{t.topic}/{t.partition}" for t in tps)})

    def _on_revoked(self, tps: set[TopicPartition]) -> None:
        if not tps:
            return
        # Finish what is in flight for these partitions if it is quick, commit it, drop the rest.
        wait_s = 0.0 if self._closing else self.s.revoke_wait_ms / 1000
        self.tracker.wait_drained(wait_s, tps)
        offsets = self.tracker.to_commit(tps)
        if offsets and not self._closing:
            try:
                self._consumer.commit_async(offsets)
            except Exception as e:
                log.warning("commit on revoke failed: %s", e, extra={"event": "commit_failed"})
        self._forget(tps, "revoked")

    def _on_lost(self, tps: set[TopicPartition]) -> None:
        self._forget(tps, "lost")  # no longer ours: committing would be refused anyway

    def _forget(self, tps: set[TopicPartition], why: str) -> None:
        dropped = self.tracker.revoke(tps)
        metrics.REBALANCES.labels(event=why).inc(len(tps))
        if dropped:
            metrics.DROPPED_ON_REVOKE.inc(dropped)
        for tp in tps:
            try:
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass
        log.info("partitions %s", why, extra={"event": why, "dropped_in_flight": dropped,
                                             "partitions": sorted(f"{t.topic}/{t.partition}" for t in tps)})

    # -- dispatch thread ------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        try:
            while True:
                batch = self.batcher.get_batch(timeout=0.5)
                if batch is None:
                    break
                if not batch:
                    continue
                metrics.BATCH_SIZE.observe(len(batch))
                futures = [self._pool.submit(self._prepare, item) for item in batch]
                self._ready.put((batch, futures))
        except Exception as e:  # a bug here would stall everything: stop loudly instead
            log.exception("dispatch loop failed")
            self._fail(e)
        finally:
            self._ready.put(None)

    # -- prepare (pool threads): parse, fetch, hash, cache, decode, preprocess ------------------------

    def _prepare(self, item: WorkItem) -> Prepared:
        p = Prepared(item)
        wait = time.monotonic() - item.consumed_mono
        metrics.STAGE_SECONDS.labels(stage="queue_wait").observe(wait)
        p.timings["queue_wait"] = _ms(wait)
        if not self.tracker.is_live(item.tp, item.epoch):
            p.stale = True
            return p
        try:
            ev = parse_record(item.source.value, item.source.key, item.headers, self.event_limits)
            p.event, p.event_id = ev, ev.id
            metrics.EVENTS_PARSED.labels(envelope=ev.envelope).inc()
            data = ev.data if ev.url is None else self._fetch(ev.url, p)
            if data and self.decision_cache is not None:
                sha = hashlib.sha256(data).hexdigest()
                emb = self.decision_cache.get(cache_key(sha, self.model_sha256, self.engine.policy.loaded.sha256))
                if emb is not None and emb.shape == (self.embed_dim,):
                    p.embedding, p.cached, p.image_sha256 = emb, True, sha
                    return p
            t0 = time.perf_counter()
            decoded = decode_image(data or b"", self.decode_limits)
            p.pixels = self.preprocessor.to_array(decoded.image)
            p.image_sha256 = decoded.sha256
            dt = time.perf_counter() - t0
            metrics.STAGE_SECONDS.labels(stage="decode").observe(dt)
            p.timings["decode"] = _ms(dt)
        except ModeratorError as e:
            p.error = e
            p.event_id = p.event_id or getattr(e, "event_id", None)
        except Exception as e:  # never let one input take the worker down
            log.exception("unexpected error preparing %s/%s@%s", item.tp.topic, item.tp.partition,
                          item.source.offset)
            p.error = ModeratorError(f"unexpected {type(e).__name__}: {e}", reason="internal_error")
        return p

    def _fetch(self, url: str, p: Prepared) -> bytes:
        t0 = time.perf_counter()
        try:
            data = self.fetcher.fetch(url)
        except ModeratorError as e:  # FetchError, or payload_too_large
            metrics.URL_FETCHES.labels(result=e.reason).inc()
            raise
        dt = time.perf_counter() - t0
        metrics.URL_FETCHES.labels(result="ok").inc()
        metrics.STAGE_SECONDS.labels(stage="fetch").observe(dt)
        p.timings["fetch"] = _ms(dt)
        return data

    # -- encode thread: encode misses, decide, publish -----------------------------------------------

    def _encode_loop(self) -> None:
        try:
            while True:
                job = self._ready.get()
                if job is None:
                    break
                _, futures = job
                prepared = [f.result() for f in futures]  # _prepare never raises
                try:
                    self._finish(prepared)
                except Exception as e:  # encoder or policy failure: the batch's inputs become dead letters
                    log.exception("batch failed after preparation; dead-lettering it")
                    for p in prepared:
                        if not p.stale and not p.published:
                            p.error = ModeratorError(f"batch failed: {type(e).__name__}: {e}",
                                                     reason="internal_error")
                            self._publish_dead_letter(p)
        except Exception as e:  # a bug here would stall everything: stop loudly instead
            log.exception("encode loop failed")
            self._fail(e)

    def _finish(self, prepared: list[Prepared]) -> None:
        live = []
        for p in prepared:
            if p.stale or not self.tracker.is_live(p.item.tp, p.item.epoch):
                continue  # revoked meanwhile: not committed here, the new owner redoes it
            live.append(p)
        good = [p for p in live if p.error is None]
        misses = [p for p in good if p.embedding is None]
        policy = self.engine.policy
        if misses:
            t0 = time.perf_counter()
            emb = self.encoder.encode_pixels(np.stack([p.pixels for p in misses]))
            dt = time.perf_counter() - t0
            metrics.ENCODE_BATCH_SECONDS.observe(dt)
            share = dt / len(misses)
            for p, e in zip(misses, emb):
                p.embedding, p.pixels = e, None
                p.timings["encode"] = _ms(share)
                metrics.STAGE_SECONDS.labels(stage="encode").observe(share)
            if self.decision_cache is not None:
                self.decision_cache.put_many(
                    [(cache_key(p.image_sha256, self.model_sha256, policy.loaded.sha256), p.embedding)
                     for p in misses if p.image_sha256])
        if good:
            decisions = self.engine.decide(
                [p.event_id for p in good], np.stack([p.embedding for p in good]),
                image_sha256=[p.image_sha256 for p in good], timings_ms=[p.timings for p in good],
                metadata=[p.event.metadata for p in good])
            hits = 0
            for p, d in zip(good, decisions):
                d.cached = p.cached
                hits += p.cached
                metrics.STAGE_SECONDS.labels(stage="score").observe(d.timings_ms.get("score", 0.0) / 1000)
                self._publisher.publish_decision(d, self._acked_cb(p), self._failed_cb)
                p.published = True
            self.stats.add(decisions=len(good), cache_hits=hits)
        for p in live:
            if p.error is not None:
                self._publish_dead_letter(p)

    def _publish_dead_letter(self, p: Prepared) -> None:
        err = p.error
        assert err is not None
        src = p.item.source
        dead = build_dead_letter(src, err.reason, str(err), event_id=p.event_id, worker=self.s.client_id,
                                 max_value_bytes=self.s.dead_letter_max_value_bytes,
                                 policy_version=self.engine.policy.version, model_sha256=self.model_sha256)
        key = p.event_id.encode() if p.event_id else src.key
        metrics.DEAD_LETTERS.labels(reason=err.reason).inc()
        self.stats.add(dead_letters=1)
        log.info("dead letter", extra={"event": "dead_letter", "reason": err.reason, "event_id": p.event_id,
                                       "source": f"{src.topic}/{src.partition}@{src.offset}",
                                       "error": str(err)[:300]})
        self._publisher.publish_dead_letter(dead, key, self._acked_cb(p), self._failed_cb)
        p.published = True

    def _acked_cb(self, p: Prepared):
        def acked() -> None:
            item = p.item
            if not self.tracker.done(item.tp, item.source.offset, item.epoch):
                return  # revoked meanwhile: published, but the new owner decides it again
            now = time.time()
            metrics.END_TO_END_SECONDS.labels(clock="consumed").observe(max(0.0, now - item.consumed_wall))
            if p.event is not None and p.event.created_at is not None:
                metrics.END_TO_END_SECONDS.labels(clock="created_at").observe(max(0.0, now - p.event.created_at))
            self.stats.last_acked_at = now
            self.stats.add(inputs_acked=1)
        return acked

    def _failed_cb(self, err: Exception) -> None:
        self._fail(DeliveryError(f"the broker did not acknowledge an output record: {type(err).__name__}: {err}"))

    # -- shutdown ------------------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        s = self.s
        deadline = time.monotonic() + s.shutdown_grace_s
        left = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
        log.info("draining", extra={"event": "draining", "in_flight": self.tracker.in_flight,
                                    "grace_s": s.shutdown_grace_s})
        self.batcher.close()
        if self._fatal is None:
            for t in self._threads:
                t.join(left())
            drained = self.tracker.wait_drained(left())
            if self._publisher is not None:
                try:
                    self._publisher.flush(left())
                except Exception as e:
                    log.warning("producer flush incomplete: %s", e)
        else:
            drained = False
        left_in_flight = self.tracker.in_flight  # (closing forgets the partitions)
        if self._consumer is not None:
            self._commit()
            self._closing = True
            try:
                self._consumer.close(autocommit=False, timeout_ms=int(1000 * min(5.0, max(1.0, left()))))
            except Exception as e:
                log.warning("consumer close: %s", e)
        if self._publisher is not None:
            try:
                self._publisher.close(timeout_s=max(1.0, left()))
            except Exception as e:
                log.warning("producer close: %s", e)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._watcher:
            self._watcher.stop()
        if self.decision_cache is not None:
            self.decision_cache.close()
        metrics.WORKER_READY.set(0)
        if self.ops:
            self.ops.stop()
        log.info("stopped", extra={"event": "stopped", "drained": drained,
                                   "uncommitted_in_flight": left_in_flight, **{
                                       k: v for k, v in self.stats.snapshot().items() if not k.endswith("_at")}})


def run_worker(settings: WorkerSettings) -> int:
    """``moderator run``: JSON logs, SIGTERM/SIGINT drain (a second signal exits at once), serve."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from moderator.worker.logs import configure_logging  # noqa: PLC0415

    configure_logging(settings.log_level, settings.log_json, {"worker": settings.client_id})
    worker = Worker(settings)
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
    return worker.run()
