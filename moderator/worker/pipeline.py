"""The per-event path, from a consumed record to its published outputs.

``Pipeline`` is what happens to records, with no threads of its own:

- prepare, one record at a time: ``parse`` the envelope (CPU pool); ``fetch`` a URL
  and ``lookup`` the embedding (fetch pool: both wait on the network), hashing the
  bytes **once** (the cache key and the decision's ``image_sha256``); else ``decode``
  (CPU pool; JPEG ``draft`` when the image is at least twice the model input) and
  preprocess to the model's pixels. With GPU decode on, an eligible JPEG skips the
  CPU decode and keeps its bytes.
- ``finish(prepared)`` (the encode thread, one batch): GPU-decode the kept JPEGs,
  encode the misses in one call, store them in the cache, decide, publish.
  Decisions and dead letters leave in consumption order within a batch.

``BatchStages`` runs it: each consumed record is handed at once to two bounded
pools (CPU work on cores - 1 threads, network waits on more), and a
``MicroBatcher`` hands the *encode* thread the longest prepared run of records
in consumption order (adaptive: whatever is prepared when the encoder is free;
otherwise ``max_batch`` or ``max_wait_ms``). The encoder starts on the first
prepared images while later ones still decode. At most ``PREPARE_AHEAD``
batches' worth are prepared and not yet encoded (the rest wait unstarted), so a
slow encoder stalls preparation (then the consumer pauses), never memory.

Every failure of one input is a ``ModeratorError`` with a reason, and becomes a
dead letter; no prepare step raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
from kafka.structs import TopicPartition

from moderator import metrics
from moderator.batching import MicroBatcher
from moderator.cache import ImageEmbeddingCache, image_embedding_key
from moderator.decide.engine import DecisionEngine
from moderator.decode import DecodeLimits, decode_image
from moderator.decode.pdq import pdq_hash
from moderator.errors import ModeratorError
from moderator.fetch import UrlFetcher
from moderator.ingest import EventLimits, ParsedEvent, parse_record
from moderator.publish import SourceRecord, build_dead_letter
from moderator.schemas import DeadLetter, Decision
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
    data: bytes | None = None  # kept only for GPU decode (an eligible JPEG) ...
    probe: object | None = None  # ... with its header probe (JpegProbe)
    pixels: np.ndarray | None = None
    embedding: np.ndarray | None = None
    pdq: tuple[bytes, int] | None = None  # (hash, quality) when the policy lists PDQ banks
    cached: bool = False
    stale: bool = False
    done: bool = False  # prepared (or failed): ready for finish
    published: bool = False
    acked: bool = False  # every output record acknowledged by the broker
    timings: dict = field(default_factory=dict)
    # monotonic stamps, for the benchmark's latency breakdown (WorkerStats.latency_stages)
    prepared_at: float = 0.0
    finish_at: float = 0.0
    published_at: float = 0.0


class Publisher(Protocol):
    """``DecisionPublisher`` (Kafka) or the benchmark's in-memory sink."""

    def publish_decision(self, decision: Decision, on_acked: Callable[[], None],
                         on_failed: Callable[[Exception], None]) -> None: ...

    def publish_dead_letter(self, dead: DeadLetter, key: bytes | None, on_acked: Callable[[], None],
                            on_failed: Callable[[Exception], None]) -> None: ...


# Records prepared ahead of the encoder, in batches (max_batch each): enough for the next batch to
# be ready while one encodes, few enough that their decoded pixels stay small.
PREPARE_AHEAD = 4

# consume -> acked, in parts: prepared (waiting for a prepare thread, then parse/decode), waiting
# for the encoder, encode+decide+publish calls (its batch), the broker's acknowledgement
LATENCY_STAGES = ("prepare", "wait_for_encoder", "encode_decide_publish", "ack")

# Stages whose time the benchmark reports per event (seconds summed over events).
STAGES = ("queue_wait", "parse", "fetch", "hash_cache", "decode", "pdq", "gpu_decode", "encode", "score",
          "publish_call")


@dataclass
class WorkerStats:
    """Counters for tests, the benchmark and the demo (Prometheus has the same, by label)."""

    consumed: int = 0
    decisions: int = 0
    dead_letters: int = 0
    cache_hits: int = 0
    inputs_acked: int = 0
    batches: int = 0  # handed to the encode thread
    first_consumed_at: float | None = None
    last_acked_at: float | None = None
    stage_seconds: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    latencies: list | None = None  # consume -> acked seconds per input, when a benchmark asks
    # ... and its parts (LATENCY_STAGES), in seconds
    latency_stages: list | None = None
    # created_at (the event's own clock, when it says) -> acked: what the consume clock leaves out
    # (the producer's batching, the broker, a fetch waiting for more bytes)
    latencies_created: list | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def took(self, stage: str, seconds: float, n: int = 1, *, observe: bool = True) -> None:
        """``seconds`` spent in ``stage`` for ``n`` records (a batch's share counted once per batch);
        ``observe``: also into ``moderator_stage_seconds`` (per record)."""
        if observe:
            hist, share = metrics.STAGE_SECONDS.labels(stage=stage), seconds / max(n, 1)
            for _ in range(max(n, 1)):  # a per-record histogram: one observation per record
                hist.observe(share)
        with self._lock:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def snapshot(self) -> dict:
        with self._lock:
            snap = {k: v for k, v in vars(self).items()
                    if not k.startswith("_") and k not in ("latencies", "latency_stages", "latencies_created")}
            snap["stage_seconds"] = dict(self.stage_seconds)
            return snap


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def record_disagreements(live: Decision, shadow: Decision) -> None:
    """``moderator_shadow_disagreements_total``: per category both policies score, and overall."""
    if live.action != shadow.action:
        metrics.SHADOW_DISAGREEMENTS.labels(category="_overall", live=live.action, shadow=shadow.action).inc()
    theirs = {c.id: c.action for c in shadow.categories}
    for c in live.categories:
        other = theirs.get(c.id)
        if other is not None and other != c.action:
            metrics.SHADOW_DISAGREEMENTS.labels(category=c.id, live=c.action, shadow=other).inc()


class Pipeline:
    """prepare -> finish for one worker. The publisher is attached when the worker starts."""

    def __init__(self, *, engine: DecisionEngine, encoder, model_sha256: str, embed_dim: int,
                 tracker: OffsetTracker,
                 stats: WorkerStats, fetcher: UrlFetcher, event_limits: EventLimits, decode_limits: DecodeLimits,
                 embedding_cache: ImageEmbeddingCache | None, jpeg_draft: bool, client_id: str,
                 dead_letter_max_value_bytes: int, on_fatal: Callable[[BaseException], None],
                 device_jpeg=None, shadow_engine: DecisionEngine | None = None) -> None:
        self.engine = engine
        self.shadow_engine = shadow_engine  # decides too, publishes to the shadow topic only
        self.shadow_publisher = None  # ShadowPublisher, attached when the worker starts (None: count only)
        self.encoder = encoder
        self.preprocessor = encoder.preprocessor
        self.model_sha256 = model_sha256
        self.embed_dim = embed_dim
        self.tracker = tracker
        self.stats = stats
        self.fetcher = fetcher
        self.event_limits = event_limits
        self.decode_limits = decode_limits
        self.embedding_cache = embedding_cache
        h, w = self.preprocessor.image_size
        self.draft = (w, h) if jpeg_draft else None
        self.client_id = client_id
        self.dead_letter_max_value_bytes = dead_letter_max_value_bytes
        self.on_fatal = on_fatal
        self.device_jpeg = device_jpeg  # GPU decode (torch on CUDA), or None
        self.publisher: Publisher | None = None
        # At-least-once: an input is done when its outputs are acknowledged. Exactly-once: when
        # the batch's transaction commits (``BatchTransactions`` calls ``complete``), and a failed
        # send aborts the transaction (``send_failed``) instead of stopping the worker.
        self.commit_on_ack = True
        self.send_failed: Callable[[Exception], None] | None = None

    # -- prepare (pool threads) ------------------------------------------------------------------

    # The steps of prepare (``BatchStages._submit`` runs them on its two pools). Each records a
    # failure on the Prepared (never raises) and sets ``done`` when nothing is left to do for the
    # record before ``finish``.

    def parse(self, item: WorkItem) -> Prepared:
        p = Prepared(item)
        wait = time.monotonic() - item.consumed_mono
        self.stats.took("queue_wait", wait)
        p.timings["queue_wait"] = _ms(wait)
        if not self.tracker.is_live(item.tp, item.epoch):
            p.stale = p.done = True
            return p
        with self._guard(p):
            t0 = time.perf_counter()
            ev = parse_record(item.source.value, item.source.key, item.headers, self.event_limits)
            p.event, p.event_id = ev, ev.id
            metrics.EVENTS_PARSED.labels(envelope=ev.envelope).inc()
            self.stats.took("parse", time.perf_counter() - t0)
        return p

    def fetch(self, p: Prepared) -> bytes | None:
        with self._guard(p):
            return self._fetch(p.event.url, p)
        return None

    def image(self, p: Prepared, data: bytes | None) -> Prepared:
        """lookup, then decode if the cache did not have it."""
        self.lookup(p, data)
        return p if p.done else self.decode(p, data)

    def lookup(self, p: Prepared, data: bytes | None) -> None:
        """Hash once; a cached embedding for this model makes the record done (unless the policy
        needs the image's PDQ hash: then it is decoded for that, not encoded)."""
        with self._guard(p):
            if data and self._cached(data, p) and not self.needs_pdq():
                p.done = True

    def decode(self, p: Prepared, data: bytes | None) -> Prepared:
        with self._guard(p):
            self._decode(data or b"", p)
        p.done = True
        return p

    @contextlib.contextmanager
    def _guard(self, p: Prepared):
        try:
            yield
        except ModeratorError as e:
            p.error, p.done = e, True
            p.event_id = p.event_id or getattr(e, "event_id", None)
        except Exception as e:  # never let one input take the worker down
            item = p.item
            log.exception("unexpected error preparing %s/%s@%s", item.tp.topic, item.tp.partition,
                          item.source.offset, extra={"event": "prepare_failed", "event_id": p.event_id})
            p.error, p.done = ModeratorError(f"unexpected {type(e).__name__}: {e}", reason="internal_error"), True

    def _fetch(self, url: str, p: Prepared) -> bytes:
        t0 = time.perf_counter()
        try:
            data = self.fetcher.fetch(url)
        except ModeratorError as e:  # FetchError, or payload_too_large
            metrics.URL_FETCHES.labels(result=e.reason).inc()
            raise
        dt = time.perf_counter() - t0
        metrics.URL_FETCHES.labels(result="ok").inc()
        self.stats.took("fetch", dt)
        p.timings["fetch"] = _ms(dt)
        return data

    def _cached(self, data: bytes, p: Prepared) -> bool:
        """Hash once; True when the cache had this image's embedding for this model."""
        t0 = time.perf_counter()
        p.image_sha256 = hashlib.sha256(data).hexdigest()
        hit = False
        banked = self.engine.policy.bank_embedding(p.image_sha256)  # a banked file, byte for byte
        if banked is not None and banked.shape == (self.embed_dim,):  # the decision's bank match says by_sha256
            p.embedding, hit = banked, True
        elif self.embedding_cache is not None:
            emb = self.embedding_cache.get(image_embedding_key(self.model_sha256, p.image_sha256))
            if emb is not None and emb.shape == (self.embed_dim,):
                p.embedding, p.cached, hit = emb, True, True
        self.stats.took("hash_cache", time.perf_counter() - t0)
        return hit

    def _decode(self, data: bytes, p: Prepared) -> None:
        t0 = time.perf_counter()
        needs_pdq = self.needs_pdq()
        if self.device_jpeg is not None and not needs_pdq:  # PDQ hashes a CPU-decoded image
            # the same hostile-input checks as decode_image, on the header only; bad input raises here
            probe = self.device_jpeg.eligible(data, self.decode_limits, sha256=p.image_sha256)
            if probe is not None:
                p.data, p.probe = data, probe  # decoded with its batch on the GPU (finish)
                self.stats.took("decode", time.perf_counter() - t0)
                return
        decoded = decode_image(data, self.decode_limits, sha256=p.image_sha256, draft=self.draft)
        if p.embedding is None:  # else decoded for its PDQ hash only (a cached or banked embedding)
            p.pixels = self.preprocessor.to_uint8(decoded.image)  # normalised with its batch (encode)
        p.image_sha256 = decoded.sha256
        dt = time.perf_counter() - t0
        self.stats.took("decode", dt)
        p.timings["decode"] = _ms(dt)
        if needs_pdq:
            t0 = time.perf_counter()
            p.pdq = pdq_hash(decoded.image)
            dt = time.perf_counter() - t0
            self.stats.took("pdq", dt)
            p.timings["pdq"] = _ms(dt)

    # -- finish (encode thread) ----------------------------------------------------------------

    def finish(self, prepared: list[Prepared]) -> None:
        started = time.monotonic()
        live = [p for p in prepared if not p.stale and self.tracker.is_live(p.item.tp, p.item.epoch)]
        for p in live:
            p.finish_at = started
        # (revoked meanwhile: not committed here, the new owner redoes it)
        on_device = [p for p in live if p.error is None and p.data is not None]
        device_pixels = self._device_decode(on_device) if on_device else None
        good = [p for p in live if p.error is None]
        misses = [p for p in good if p.embedding is None]
        if misses:
            t0 = time.perf_counter()
            emb = self._encode(misses, device_pixels)
            dt = time.perf_counter() - t0
            metrics.ENCODE_BATCH_SECONDS.observe(dt)
            self.stats.took("encode", dt, len(misses))
            share = _ms(dt / len(misses))
            for p, e in zip(misses, emb):
                p.embedding, p.pixels, p.data, p.probe = e, None, None, None
                p.timings["encode"] = share
            if self.embedding_cache is not None:
                self.embedding_cache.put_many(
                    [(image_embedding_key(self.model_sha256, p.image_sha256), p.embedding)
                     for p in misses if p.image_sha256])
        if good:
            t0 = time.perf_counter()
            decisions = self.engine.decide(
                [p.event_id for p in good], np.stack([p.embedding for p in good]),
                image_sha256=[p.image_sha256 for p in good], timings_ms=[p.timings for p in good],
                metadata=[p.event.metadata for p in good], pdq=[p.pdq for p in good])
            self.stats.took("score", time.perf_counter() - t0, len(good))
            t0 = time.perf_counter()
            hits = 0
            for p, d in zip(good, decisions):
                d.cached = p.cached
                d.bind_input(p.item.source.topic, p.item.source.partition, p.item.source.offset)  # CloudEvents id
                hits += p.cached
                p.published_at = time.monotonic()
                self.publisher.publish_decision(d, self._acked_cb(p), self._failed_cb)
                p.published = True
            # handing records to the producer; the broker's ack time is the "publish" stage metric
            self.stats.took("publish_call", time.perf_counter() - t0, len(good), observe=False)
            self.stats.add(decisions=len(good), cache_hits=hits)
            if self.shadow_engine is not None:
                self._shadow(good, decisions)
        for p in live:
            if p.error is not None:
                self.publish_dead_letter(p)

    def needs_pdq(self) -> bool:
        """Images need a PDQ hash when the live or the shadow policy lists PDQ banks."""
        return self.engine.policy.needs_pdq or (self.shadow_engine is not None
                                                 and self.shadow_engine.policy.needs_pdq)

    def _shadow(self, good: list[Prepared], live: list[Decision]) -> None:
        """The shadow policy on the same embeddings. Never changes, delays the commit of, or
        fails a live decision: its errors are counted and logged, and its records go through
        ``ShadowPublisher`` (own queue, thread and producer), which nothing waits for."""
        try:
            shadow = self.shadow_engine.decide(
                [p.event_id for p in good], np.stack([p.embedding for p in good]),
                image_sha256=[p.image_sha256 for p in good], timings_ms=[dict(p.timings) for p in good],
                metadata=[p.event.metadata for p in good], pdq=[p.pdq for p in good])
        except Exception:
            metrics.SHADOW_ERRORS.labels(stage="decide").inc()
            log.exception("shadow policy failed to decide a batch (live decisions unaffected)")
            return
        for p, d_live, d in zip(good, live, shadow):
            d.cached = d_live.cached
            d.bind_input(p.item.source.topic, p.item.source.partition, p.item.source.offset)
            record_disagreements(d_live, d)
            if self.shadow_publisher is not None:
                self.shadow_publisher.submit(d)  # never blocks: its own queue, thread and producer

    def _device_decode(self, items: list[Prepared]):
        """nvJPEG the batch's JPEGs; the ones it cannot decode take the CPU path here."""
        t0 = time.perf_counter()
        tensor, failed = self.device_jpeg([p.data for p in items], [p.probe for p in items])
        failed = set(failed)
        ok = []
        for i, p in enumerate(items):
            if i in failed:
                try:
                    data, p.data, p.probe = p.data, None, None
                    decoded = decode_image(data, self.decode_limits, sha256=p.image_sha256, draft=self.draft)
                    p.pixels = self.preprocessor.to_uint8(decoded.image)
                except ModeratorError as e:
                    p.error = e
                except Exception as e:  # one odd image must not fail its whole batch
                    log.exception("unexpected error decoding %s on the CPU fallback", p.event_id,
                                  extra={"event": "decode_failed", "event_id": p.event_id})
                    p.error = ModeratorError(f"unexpected {type(e).__name__}: {e}", reason="internal_error")
            else:
                ok.append(p)
        dt = time.perf_counter() - t0
        self.stats.took("gpu_decode", dt, len(items))
        return {id(p): i for i, p in enumerate(ok)}, tensor

    def _encode(self, misses: list[Prepared], device_pixels) -> np.ndarray:
        if device_pixels is None:
            return self.encoder.encode_uint8(np.stack([p.pixels for p in misses]))
        index, tensor = device_pixels
        return self.encoder.encode_mixed(
            tensor, [index.get(id(p)) for p in misses],
            [p.pixels for p in misses if id(p) not in index])

    # -- outputs ---------------------------------------------------------------------------------

    def publish_dead_letter(self, p: Prepared) -> None:
        err = p.error
        assert err is not None
        src = p.item.source
        dead = build_dead_letter(src, err.reason, str(err), event_id=p.event_id, worker=self.client_id,
                                 max_value_bytes=self.dead_letter_max_value_bytes,
                                 policy_version=self.engine.policy.version, model_sha256=self.model_sha256)
        key = p.event_id.encode("utf-8", "backslashreplace") if p.event_id else src.key
        metrics.DEAD_LETTERS.labels(reason=err.reason).inc()
        self.stats.add(dead_letters=1)
        log.info("dead letter", extra={"event": "dead_letter", "reason": err.reason, "event_id": p.event_id,
                                       "source": f"{src.topic}/{src.partition}@{src.offset}",
                                       "error": str(err)[:300]})
        p.published_at = time.monotonic()
        self.publisher.publish_dead_letter(dead, key, self._acked_cb(p), self._failed_cb)
        p.published = True

    def fail_batch(self, prepared: list[Prepared], err: Exception) -> None:
        """The encoder or the policy failed after preparation: the batch's inputs become dead letters."""
        for p in prepared:
            if p.stale or p.published or not self.tracker.is_live(p.item.tp, p.item.epoch):
                continue  # revoked meanwhile: the new owner decides it
            if p.error is None:  # a record that already failed keeps its own reason
                p.error = ModeratorError(f"batch failed: {type(err).__name__}: {err}", reason="internal_error")
            self.publish_dead_letter(p)

    def _acked_cb(self, p: Prepared):
        def acked() -> None:
            p.acked = True
            if self.commit_on_ack:
                self._complete(p)
        return acked

    def complete(self, prepared: list[Prepared]) -> None:
        """Exactly-once: the batch's transaction committed; its inputs are done."""
        for p in prepared:
            self._complete(p)

    def _complete(self, p: Prepared) -> None:
        item = p.item
        if not self.tracker.done(item.tp, item.source.offset, item.epoch):
            return  # revoked meanwhile: published, but the new owner decides it again
        now = time.time()
        metrics.END_TO_END_SECONDS.labels(clock="consumed").observe(max(0.0, now - item.consumed_wall))
        if self.stats.latencies is not None:
            self.stats.latencies.append(now - item.consumed_wall)
        if self.stats.latency_stages is not None and p.published_at:
            self.stats.latency_stages.append((p.prepared_at - item.consumed_mono, p.finish_at - p.prepared_at,
                                              p.published_at - p.finish_at, time.monotonic() - p.published_at))
        if p.event is not None and p.event.created_at is not None:
            metrics.END_TO_END_SECONDS.labels(clock="created_at").observe(max(0.0, now - p.event.created_at))
            if self.stats.latencies_created is not None:
                self.stats.latencies_created.append(now - p.event.created_at)
        self.stats.last_acked_at = now
        self.stats.add(inputs_acked=1)

    def _failed_cb(self, err: Exception) -> None:
        if self.send_failed is not None:  # exactly-once: the batch's transaction aborts, it is redone
            self.send_failed(err)
            return
        from moderator.errors import DeliveryError  # noqa: PLC0415

        self.on_fatal(DeliveryError(f"the broker did not acknowledge an output record: {type(err).__name__}: {err}"))


class BatchStages:
    """The threads around a ``Pipeline``: every record is prepared on arrival (the pools), and
    the batcher hands the encode thread the prepared ones, in arrival order."""

    def __init__(self, pipeline: Pipeline, *, max_batch: int, max_wait_ms: int, prepare_workers: int,
                 decode_slots: int, adaptive: bool, on_fatal: Callable[[BaseException], None]) -> None:
        self.pipeline = pipeline
        self._pending: set[Future] = set()  # records handed to the pools, not prepared yet
        self._count_lock = threading.Lock()
        # CPU work (parse, hash, decode, preprocess) runs on `decode_slots` threads: more than the
        # cores only contend for them and the GIL. URL fetches wait on the network on their own pool.
        self._pool = ThreadPoolExecutor(max(1, decode_slots), thread_name_prefix="prepare")
        self._fetch_pool = ThreadPoolExecutor(max(1, prepare_workers), thread_name_prefix="fetch")
        # The encode thread asks for a batch only when it has nothing to do: adaptive batching
        # takes what is prepared at once. At most PREPARE_AHEAD batches' worth are prepared and
        # not yet taken (their pixels are what is held); the rest wait unstarted.
        self.batcher: MicroBatcher[WorkItem] = MicroBatcher(
            max_batch, max_wait_ms, idle=(lambda: True) if adaptive else None, start=self._submit,
            ahead=PREPARE_AHEAD * max_batch)
        self._on_fatal = on_fatal
        self.transactions = None  # exactly-once: BatchTransactions, one per batch
        self.threads = [threading.Thread(target=self._encode_loop, name="encode", daemon=True)]

    def start(self) -> "BatchStages":
        for t in self.threads:
            t.start()
        return self

    def put(self, item: WorkItem) -> None:
        self.batcher.put(item)

    def close(self) -> None:
        """No more items; what waits is released as final batches."""
        self.batcher.close()

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        with self._count_lock:  # steps cancelled with their pools: nobody waits forever on these
            pending, self._pending = self._pending, set()
        for f in pending:
            if not f.done():
                f.set_exception(CancelledError())

    def _submit(self, item: WorkItem) -> Future:
        """parse (CPU pool) -> fetch a URL (fetch pool) -> hash, cache, decode (CPU pool)."""
        pipe, done = self.pipeline, Future()
        with self._count_lock:
            self._pending.add(done)
        done.add_done_callback(self._forget)

        def first() -> None:
            p = pipe.parse(item)
            if p.done:
                done.set_result(p)
            elif p.event.url is None and pipe.embedding_cache is None:
                done.set_result(pipe.image(p, p.event.data))  # nothing to wait on: all here
            else:  # a URL, or a cache lookup: network round trips wait on the fetch pool
                self._fetch_pool.submit(_safe, fetched, p)

        def fetched(p: Prepared) -> None:
            data = p.event.data if p.event.url is None else pipe.fetch(p)
            if not p.done:
                pipe.lookup(p, data)
            if p.done:
                done.set_result(p)
            else:
                self._pool.submit(_safe, lambda: done.set_result(pipe.decode(p, data)))

        def _safe(fn, *args) -> None:
            try:
                fn(*args)
            except BaseException as e:  # the steps never raise; if one did, the batch must not hang
                if not done.done():
                    done.set_exception(e)

        self._pool.submit(_safe, first)
        return done

    def _forget(self, f: Future) -> None:
        with self._count_lock:
            self._pending.discard(f)
        if not f.cancelled() and f.exception() is None:
            f.result().prepared_at = time.monotonic()

    def _finish(self, prepared: list[Prepared]) -> None:
        try:
            self.pipeline.finish(prepared)
        except Exception as e:
            log.exception("batch failed after preparation; dead-lettering it")
            self.pipeline.fail_batch(prepared, e)

    def _encode_loop(self) -> None:
        try:
            while True:
                # a step that raised (a bug: the steps never raise) raises here: stop loudly
                prepared: list[Prepared] | None = self.batcher.get_batch(timeout=0.5)
                if prepared is None:
                    break
                if not prepared:
                    continue
                metrics.BATCH_SIZE.observe(len(prepared))
                self.pipeline.stats.add(batches=1)
                if self.transactions is None:
                    self._finish(prepared)
                else:
                    self.transactions.run(prepared, lambda: self._finish(prepared))
        except Exception as e:  # a bug here would stall everything: stop loudly instead
            log.exception("encode loop failed")
            self._on_fatal(e)
