"""``moderator bench-worker``: the worker's decisions/s against its own encoder, in one run.

A benchmark, not a test: it prints numbers and asserts nothing about speed. One
run, one machine, the same images for every figure, so the figures compare as
ratios (the machines are noisy; absolute numbers from different runs do not).

- ``--source kafka``: pre-load N events onto a fresh topic of a real broker (a
  local one is started unless given), start a worker in this process, time first
  record consumed -> last input acknowledged by the broker, check the decisions
  topic holds N records.
- ``--source memory``: the same ``Pipeline`` and threads, fed from memory with an
  in-process sink that serialises each output as Kafka would and acknowledges at
  once: the pipeline's ceiling without the broker.
- then the image encoder alone on the same images (``encoder_images_per_s``) and
  with preprocessing from decoded images (``encoder_with_preprocess_images_per_s``);
- ``--latency``: a second phase at half the measured rate, reporting p50/p99 of
  consume -> every output acknowledged; with Kafka, a paced producer in its own
  process feeds it (``--load-generator``: kafka-python, or librdkafka at a
  quarter of the CPU, which a small machine otherwise takes from the worker);
- ``--seed-loop-model``: the naive loop a first prototype runs (per image: embed 6
  prompts and the image at batch 1, compare) on that model, for the ``x seed loop``
  figure;
- ``--profile FILE``: py-spy samples every thread of this process during the
  measured phase (``.svg`` flame graph, anything else collapsed stacks) and the
  result line gets the top frames; ``--profile-gil`` samples only the thread holding the GIL
  (what serialises the worker's Python).

- ``--processes N`` (memory source): N worker processes side by side, each with its
  own encoder (and CUDA context), fed ``events / N`` each and started together; the
  aggregate decisions/s is all events over first consume -> last acknowledgement
  across them. Whether several processes per GPU get past one process's GIL.
- ``--processes N --source kafka``: ``moderator run`` itself as a subprocess, once as
  one process and once as N (the supervisor), each on its own topic, the events
  produced once it is ready; decisions/s from the decision records' timestamps after
  the producer finished.

Per-stage seconds per event and process CPU seconds per event come with every run.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from moderator.worker.threadcpu import cpu_by_label

# --- inputs -------------------------------------------------------------------------------------


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 85) -> tuple[bytes, str]:
    """A synthetic-domain scene at camera size with sensor-like noise, as a JPEG (what a
    photo costs to decode: ~100-250 kB at 1024x768, q85). Returns (bytes, class label)."""
    from PIL import Image  # noqa: PLC0415

    from moderator.model import synth  # noqa: PLC0415

    sample = synth.draw_sample(rng, max(width, height))
    img = sample.image.resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue(), f"{sample.colour} {sample.shape}"


def gradient_photo(w: int, h: int, seed: int = 0):
    """Smooth gradients, flat discs and a little noise: compresses like a photo (a PIL image).
    The parity checks of the device JPEG path use it (tests, deploy/bench/gpu_selfcheck.py)."""
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([127 + 100 * np.sin(x / 37 + seed), 127 + 100 * np.cos(y / 23),
                    127 + 80 * np.sin((x + y) / 51)], -1)
    for _ in range(12):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(5, max(6, min(w, h) // 4))
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def bench_events(n: int, image: str, size: tuple[int, int], seed: int, id_prefix: str, unique: int = 256,
                 envelope: str = "json"):
    """``n`` OutgoingEvents: synthetic PNGs (``png``) or photo-like JPEGs (``jpeg``), cycling
    through at most ``unique`` distinct images (the bench runs without the image cache), in one
    envelope: ``json`` (base64 inside), ``cloudevents`` or ``raw`` (the image bytes as the value)."""
    from moderator.produce import OutgoingEvent, synthetic_events  # noqa: PLC0415

    if image == "png":
        if size[0] != size[1]:
            raise ValueError("synthetic PNGs are square: --size N or NxN")
        return list(synthetic_events(n, seed=seed, size=size[0], id_prefix=id_prefix, envelopes=(envelope,)))
    if unique < 1:
        raise ValueError("unique images: at least 1")
    rng = np.random.default_rng([seed, 11])
    pool = [photo_like_jpeg(rng, *size) for _ in range(min(n, unique))]
    return [OutgoingEvent(id=f"{id_prefix}-{i:06d}", expect=pool[i % len(pool)][1], image=pool[i % len(pool)][0],
                          content_type="image/jpeg", envelope=envelope) for i in range(n)]


# --- the in-memory source and sink -----------------------------------------------------------------


class MemorySink:
    """Publisher stand-in: serialises like ``DecisionPublisher`` and acknowledges at once."""

    def __init__(self, keep: bool = False) -> None:
        self.decisions = 0
        self.dead_letters = 0
        self.bytes = 0
        self.kept: list | None = [] if keep else None  # the outputs themselves, for tests

    def publish_decision(self, decision, on_acked, on_failed) -> None:
        self.bytes += len(decision.model_dump_json())
        self.decisions += 1
        if self.kept is not None:
            self.kept.append(decision)
        on_acked()

    def publish_dead_letter(self, dead, key, on_acked, on_failed) -> None:
        self.bytes += len(dead.model_dump_json())
        self.dead_letters += 1
        if self.kept is not None:
            self.kept.append(dead)
        on_acked()


def _feed_memory(worker, records: list, partitions: int, rate: float | None, max_in_flight: int,
                 offset0: int = 0) -> None:
    """Put records into the worker's pipeline as the consumer would, with its back-pressure."""
    from kafka.structs import TopicPartition  # noqa: PLC0415

    from moderator.publish import SourceRecord  # noqa: PLC0415
    from moderator.worker.pipeline import WorkItem  # noqa: PLC0415

    tps = [TopicPartition("bench.images", p) for p in range(partitions)]
    start = time.perf_counter()
    for i, (key, value, headers) in enumerate(records):
        if rate:
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        while worker.tracker.in_flight >= max_in_flight:
            time.sleep(0.0005)
        tp = tps[i % partitions]
        offset = offset0 + i // partitions
        epoch = worker.tracker.track(tp, offset, len(value))
        now = time.time()
        if worker.stats.first_consumed_at is None:
            worker.stats.first_consumed_at = now
        worker.stats.add(consumed=1)
        worker.stages.put(WorkItem(tp, epoch, SourceRecord(tp.topic, tp.partition, offset, None, key, value),
                                   headers, now, time.monotonic()))


# --- the profiler -----------------------------------------------------------------------------------


class Profiler:
    """py-spy on this process (every thread, native frames off) while the context is open."""

    def __init__(self, path: Path | None, rate: int = 100, gil: bool = False) -> None:
        self.path, self.rate, self.gil, self.proc = path, rate, gil, None

    def __enter__(self) -> "Profiler":
        if self.path is None:
            return self
        beside = Path(sys.executable).parent / "py-spy"  # a venv's scripts need not be on PATH
        exe = str(beside) if beside.is_file() else shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("--profile needs py-spy (pip install moderator[dev])")
        fmt = "flamegraph" if self.path.suffix == ".svg" else "raw"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.raw = self.path if fmt == "raw" else self.path.with_suffix(".collapsed.txt")
        self.proc = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--rate", str(self.rate),
                                      "--format", fmt, "--output", str(self.path), "--threads",
                                      "--nonblocking", *(["--gil"] if self.gil else [])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # attach before the measured phase starts
        if self.proc.poll() is not None:
            raise RuntimeError(f"py-spy failed: {self.proc.stderr.read().decode(errors='replace')[-500:]}")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def summary(self, top: int = 12) -> dict | None:
        """Share of samples per thread and the hottest leaf frames, from a collapsed-stack file."""
        if self.path is None or self.path.suffix == ".svg" or not self.path.is_file():
            return None
        return summarize_collapsed(self.path.read_text(errors="replace"), top)


def summarize_collapsed(text: str, top: int = 12) -> dict:
    threads, leaves, total = Counter(), Counter(), 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # py-spy --threads: the first frame is "thread (TID): NAME"; pool threads are NAME_i
        thread = frames[0].split(": ", 1)[-1].rstrip("_0123456789") if frames else "?"
        threads[thread] += n
        leaves[frames[-1].split(" (")[0]] += n
        total += n
    return {"samples": total,
            "threads": {k: round(v / total, 3) for k, v in threads.most_common(8)} if total else {},
            "top_leaf_frames": {k: round(v / total, 3) for k, v in leaves.most_common(top)} if total else {}}


# --- CPU per thread ------------------------------------------------------------------------------------


def thread_cpu_share(before: dict[str, float], after: dict[str, float], events: int, top: int = 8) -> dict:
    """Milliseconds of CPU per event per thread label between two ``cpu_by_label()``
    (threads that ended meanwhile are missing from ``after``: their time is lost)."""
    diff = {k: after[k] - before.get(k, 0.0) for k in after}
    ranked = sorted(((k, v) for k, v in diff.items() if v > 0), key=lambda kv: -kv[1])[:top]
    return {k: round(1000 * v / max(events, 1), 3) for k, v in ranked}


# --- reference rates --------------------------------------------------------------------------------


def _encoder_rates(encoder, images: list[bytes], batch: int, min_seconds: float) -> dict:
    from PIL import Image  # noqa: PLC0415

    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    pixels = np.stack([encoder.preprocessor.to_array(im) for im in pil])
    chunks = [pixels[i:i + batch] for i in range(0, len(pixels), batch)]

    def rate(fn, items) -> float:
        fn(items[0])  # warm-up
        n, t0 = 0, time.perf_counter()
        while True:
            for c in items:
                fn(c)
                n += len(c)
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                return n / dt

    enc_only = rate(encoder.encode_pixels, chunks)
    pil_chunks = [pil[i:i + batch] for i in range(0, len(pil), batch)]
    with_pre = rate(lambda c: encoder.encode_pixels(encoder.preprocessor.batch(c)), pil_chunks)
    return {"encoder_images_per_s": round(enc_only, 1),
            "encoder_with_preprocess_images_per_s": round(with_pre, 1)}


def _encoder_reference(before: dict, after: dict) -> dict:
    """``_encoder_rates`` before and after the worker ran: their means, and the spread (on a
    shared machine one measurement alone can be off by 2x)."""
    return {**{k: round((before[k] + after[k]) / 2, 1) for k in before},
            "encoder_spread_before_after": {k: [before[k], after[k]] for k in before}}


def _image_label(image: str, size: tuple[int, int], envelope: str) -> str:
    return f"{size[0]}x{size[1]} {image.upper()}, " + (
        "the record value (raw envelope)" if envelope == "raw" else f"base64 in {envelope}")


SEED_LOOP_PROMPTS = ("a photo of graphic violence", "a photo of a weapon", "a photo of nudity",
                     "a photo of drugs", "a photo of hate symbols", "a safe photo")


def seed_loop_rate(model_dir: Path, images: list[bytes], seconds: float) -> float:
    """The prototype loop: per image, embed 6 prompts and the image (batch 1) with ONNX Runtime,
    decode with Pillow, compare. Images/s."""
    from PIL import Image  # noqa: PLC0415

    from moderator.encode import ImageEncoder, TextEncoder  # noqa: PLC0415

    img_enc, txt_enc = ImageEncoder(model_dir), TextEncoder(model_dir)

    def one(data: bytes) -> None:
        text = txt_enc.encode(list(SEED_LOOP_PROMPTS))
        emb = img_enc.encode([Image.open(io.BytesIO(data)).convert("RGB")])
        (emb @ text.T).argmax()

    one(images[0])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        one(images[n % len(images)])
        n += 1
    return n / (time.perf_counter() - t0)


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {}
    a = np.asarray(latencies) * 1000
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "max_ms": round(float(a.max()), 1)}


def _stage_percentiles(rows: list[tuple]) -> dict:
    """p50/p99 of each part of consume -> acked (``LATENCY_STAGES``), in ms."""
    from moderator.worker.pipeline import LATENCY_STAGES  # noqa: PLC0415

    if not rows:
        return {}
    a = np.asarray(rows) * 1000
    return {name: {"p50_ms": round(float(np.percentile(a[:, i], 50)), 1),
                   "p99_ms": round(float(np.percentile(a[:, i], 99)), 1)} for i, name in enumerate(LATENCY_STAGES)}


# --- the benchmark ------------------------------------------------------------------------------------


_PACED_PRODUCER = """
import sys
import time
from moderator.produce import produce
from moderator.worker.bench import bench_events
servers, topic, image, size, n, rate, prefix, unique, envelope, client = sys.argv[1:11]
w, _, h = size.partition("x")
events = bench_events(int(n), image, (int(w), int(h)), seed=8, id_prefix=prefix, unique=int(unique), envelope=envelope)
t0 = 0.0


def ready():  # images drawn, the client connected: the measured window starts now
    global t0
    print("ready", flush=True)
    t0 = time.process_time()


report = produce(servers, topic, events, rate=float(rate), client=client, on_ready=ready)
stamps = sorted(report.sent_at.values())
# its CPU seconds producing (drawing the images and connecting left out), the rate it kept, its client
print(time.process_time() - t0, (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9), report.client)
"""


def _wait(worker, target: int, deadline: float, alive: Callable[[], bool]) -> None:
    while worker.stats.inputs_acked < target and time.monotonic() < deadline and alive():
        time.sleep(0.01)
    if worker.stats.inputs_acked < target:
        raise RuntimeError(f"worker acknowledged {worker.stats.inputs_acked} of {target} inputs")


def bench_worker(model_dir: Path | str, policy: Path | str, *, source: str = "kafka", events: int = 2000,
                 image: str = "png", size: tuple[int, int] = (96, 96), max_batch: int = 32, max_wait_ms: int = 50,
                 partitions: int = 3, encoder_seconds: float = 5.0, bootstrap_servers: str | None = None,
                 backend: str = "onnx", envelope: str = "json", unique_images: int = 256,
                 latency: bool = False, latency_events: int | None = None, latency_rate: float | None = None,
                 load_generator: str = "kafka-python", seed_loop_model: Path | str | None = None,
                 profile: Path | None = None, profile_gil: bool = False,
                 overrides: dict | None = None, timeout_s: float = 900.0, start_gate: Path | None = None,
                 log=print) -> dict:
    from moderator.config import WorkerSettings  # noqa: PLC0415
    from moderator.encode import ImageEncoder  # noqa: PLC0415
    from moderator.worker.app import Worker  # noqa: PLC0415

    if source not in ("kafka", "memory"):
        raise ValueError("source is kafka or memory")
    from moderator.produce import CLIENTS, require_confluent_kafka  # noqa: PLC0415

    if load_generator not in CLIENTS:
        raise ValueError(f"load_generator is one of {', '.join(CLIENTS)}, not {load_generator!r}")
    if load_generator == "librdkafka" and latency and source == "kafka":
        require_confluent_kafka()  # now, not after minutes of measuring
    model_dir = Path(model_dir)
    run = f"bench-{uuid.uuid4().hex[:8]}"
    log(f"drawing {events} {image} events at {size[0]}x{size[1]} ...")
    evs = bench_events(events, image, size, seed=7, id_prefix=run, unique=unique_images, envelope=envelope)
    images = [e.image for e in evs[:256]]
    n_lat = latency_events or min(events, 2000)
    lat_evs = (bench_events(n_lat, image, size, seed=8, id_prefix=f"{run}-lat", unique=unique_images,
                            envelope=envelope) if latency and source == "memory" else [])
    base = dict(model_dir=model_dir, policy=Path(policy), max_batch=max_batch, max_wait_ms=max_wait_ms,
                http_port=0, http_host="127.0.0.1", policy_reload_interval_s=0, redis_url=None, log_json=False,
                encoder_backend=backend, input_topic=f"{run}.images", consumer_group=run,
                decisions_topic=f"{run}.decisions", flagged_topic=f"{run}.flagged", review_topic=f"{run}.review",
                dead_letter_topic=f"{run}.dead-letter", **(overrides or {}))
    result: dict = {}
    with contextlib.ExitStack() as stack:
        if source == "kafka":
            from moderator.produce import ensure_topics, produce  # noqa: PLC0415

            if bootstrap_servers is None:
                from moderator.devservices import services  # noqa: PLC0415

                bootstrap_servers = stack.enter_context(services(kafka=True, redis=False)).kafka_bootstrap
            ensure_topics(bootstrap_servers, {f"{run}.images": partitions, f"{run}.decisions": partitions,
                                              f"{run}.flagged": 1, f"{run}.review": 1, f"{run}.dead-letter": 1})
            report = produce(bootstrap_servers, f"{run}.images", evs)
            log(f"pre-loaded {report.sent} events ({report.bytes / 1e6:.1f} MB) in {report.seconds:.1f}s")
            settings = WorkerSettings(kafka_bootstrap_servers=bootstrap_servers, **base)
        else:
            settings = WorkerSettings(**base)
        worker = Worker(settings)
        encoder_info = worker.encoder.runtime_info()
        # The encoder is timed before and after the worker and the two averaged: on a shared
        # machine a single reference measurement can be off by 2x; the spread is reported.
        log("measuring the image encoder alone on the same images (before the worker) ...")
        # The reference is the encoder at its own best (ONNX: a fresh session with ONNX Runtime's
        # defaults: every core, spinning threads), not the worker's session with its tuning.
        reference = worker.encoder if backend != "onnx" else ImageEncoder(worker.model_dir)
        enc_before = _encoder_rates(reference, images, max_batch, encoder_seconds)
        deadline = time.monotonic() + timeout_s
        if source == "kafka":
            thread = threading.Thread(target=worker.run, name="bench-worker", daemon=True)
            t_start = time.time()
            cpu0 = time.process_time()
            with Profiler(profile, gil=profile_gil) as prof:
                threads0 = cpu_by_label()
                thread.start()
                _wait(worker, events, deadline, thread.is_alive)
                cpu = time.process_time() - cpu0
                threads1 = cpu_by_label()
            stats = worker.stats.snapshot()
        else:
            from kafka.structs import TopicPartition  # noqa: PLC0415

            sink = MemorySink()
            worker.pipeline.publisher = sink
            worker.tracker.assign([TopicPartition("bench.images", p) for p in range(partitions)])
            worker.stages.start()
            records = [e.record() for e in evs]  # (key, value, headers), as the consumer hands them over
            if start_gate is not None:  # --processes: every process ready, then all start at once
                _pass_gate(Path(start_gate), deadline)
            t_start = time.time()
            with Profiler(profile, gil=profile_gil) as prof:
                cpu0, threads0 = time.process_time(), cpu_by_label()
                _feed_memory(worker, records, partitions, None, settings.max_in_flight)
                _wait(worker, events, deadline, lambda: True)
                cpu, threads1 = time.process_time() - cpu0, cpu_by_label()
            stats = worker.stats.snapshot()
        busy = stats["last_acked_at"] - stats["first_consumed_at"]
        rate = events / busy
        result.update({
            "source": source, "events": events, "dead_letters": stats["dead_letters"],
            "worker_decisions_per_s": round(rate, 1),
            "worker_seconds_first_consume_to_last_ack": round(busy, 2),
            "worker_seconds_including_startup": round(stats["last_acked_at"] - t_start, 2),
            "measured_epoch_s": [stats["first_consumed_at"], stats["last_acked_at"]],
            "cpu_seconds_per_event_ms": round(1000 * cpu / events, 3),
            "thread_cpu_ms_per_event": thread_cpu_share(threads0, threads1, events),
            "mean_batch_size": round(events / max(1, stats["batches"]), 1),
            "stage_ms_per_event": {k: round(1000 * v / events, 3) for k, v in stats["stage_seconds"].items() if v},
        })
        if prof.summary():
            result["profile"] = {"file": str(profile), **prof.summary()}
        if latency:
            target = latency_rate or 0.5 * rate
            log(f"latency phase: {n_lat} events at {target:.0f}/s" + ("" if latency_rate else " (half the measured rate)"))
            worker.stats.latencies, worker.stats.latency_stages, worker.stats.latencies_created = [], [], []
            acked0, batches0 = worker.stats.inputs_acked, worker.stats.batches
            recs = [e.record() for e in lat_evs]
            extra: dict = {}
            if source == "kafka":
                # the load generator in its own process: it must not share the worker's GIL
                proc = subprocess.Popen([sys.executable, "-c", _PACED_PRODUCER, bootstrap_servers, f"{run}.images",
                                         image, f"{size[0]}x{size[1]}", str(n_lat), str(target), f"{run}-lat",
                                         str(unique_images), envelope, load_generator],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                try:
                    # the window starts once the generator has drawn its images, connected, and starts sending
                    if proc.stdout.readline().strip() != b"ready":
                        raise RuntimeError(f"paced producer failed: {proc.communicate(timeout=60)[1].decode()[-800:]}")
                    cpu0, threads0 = time.process_time(), cpu_by_label()
                    _wait(worker, acked0 + n_lat, deadline, thread.is_alive)
                    cpu, threads1 = time.process_time() - cpu0, cpu_by_label()
                    out, err = proc.communicate(timeout=60)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(f"paced producer failed: {err.decode()[-800:]}")
                # the event's created_at is stamped as it is sent: this clock adds the producer's
                # batching and the broker holding a fetch to consume -> acked
                extra["created_to_acked"] = _percentiles(worker.stats.latencies_created)
                # on a small machine the load generator takes CPU from the worker: say how much
                gen_cpu, gen_rate, gen_client = out.split()[-3:]
                extra["load_generator_cpu_ms_per_event"] = round(1000 * float(gen_cpu) / n_lat, 3)
                extra["load_generator_rate_per_s"] = round(float(gen_rate), 1)  # below rate_per_s: it fell behind
                extra["load_generator"] = gen_client.decode()  # as the generator reports it
            else:
                cpu0, threads0 = time.process_time(), cpu_by_label()
                _feed_memory(worker, recs, partitions, target,
                             settings.max_in_flight, offset0=events)
                _wait(worker, acked0 + n_lat, deadline, lambda: True)
                cpu, threads1 = time.process_time() - cpu0, cpu_by_label()
            result["latency_at_half_rate"] = {"rate_per_s": round(target, 1), "max_wait_ms": max_wait_ms,
                                              **_percentiles(worker.stats.latencies),
                                              "stages": _stage_percentiles(worker.stats.latency_stages),
                                              "cpu_seconds_per_event_ms": round(1000 * cpu / n_lat, 3),
                                              "thread_cpu_ms_per_event": thread_cpu_share(threads0, threads1, n_lat),
                                              "mean_batch_size": round(n_lat / max(1, worker.stats.batches - batches0), 1),
                                              **extra}
        if source == "kafka":
            worker.request_stop()
            thread.join(60)
            from kafka import KafkaConsumer, TopicPartition  # noqa: PLC0415

            c = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
            try:
                ends = c.end_offsets([TopicPartition(f"{run}.decisions", p) for p in range(partitions)])
            finally:
                c.close()
            result["decisions_on_topic"] = sum(ends.values())
        else:
            worker.stages.close()
            worker.stages.join(30)
            worker.stages.shutdown()
            result["decisions_in_sink"] = sink.decisions
        log("measuring the image encoder alone on the same images (after the worker) ...")
        enc_after = _encoder_rates(reference, images, max_batch, encoder_seconds)
    enc = _encoder_reference(enc_before, enc_after)
    result.update(enc)
    result["ratio_worker_to_encoder"] = round(rate / enc["encoder_images_per_s"], 3)
    result["ratio_worker_to_encoder_with_preprocess"] = round(rate / enc["encoder_with_preprocess_images_per_s"], 3)
    if seed_loop_model is not None:
        log("measuring the seed loop (6 prompts + the image per image, batch 1) ...")
        seed = seed_loop_rate(Path(seed_loop_model), images, encoder_seconds)
        result["seed_loop_images_per_s"] = round(seed, 2)
        result["ratio_worker_to_seed_loop"] = round(rate / seed, 2)
    result.update({
        "backend": backend, "encoder": encoder_info, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
        "partitions": partitions, "image": _image_label(image, size, envelope),
        "unique_images": min(events, unique_images),
        "cpus": os.cpu_count(), "machine": platform.machine(),
    })
    return result


# --- several worker processes side by side ----------------------------------------------------------


def _pass_gate(gate: Path, deadline: float) -> None:
    """Say this process is ready (``ready-PID``), then wait for the parent's ``go``."""
    (gate / f"ready-{os.getpid()}").touch()
    while not (gate / "go").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no go from the parent in {gate}")
        time.sleep(0.005)


def bench_worker_processes(processes: int, child_argv: list[str], *, events: int, timeout_s: float = 900.0,
                           log=print) -> dict:
    """``processes`` ``moderator bench-worker --source memory`` children, ``events / processes``
    each, started together once all have loaded their model and drawn their events. The
    aggregate rate is every event over the first consume to the last acknowledgement of any
    child (so a slow child counts). ``child_argv``: the bench-worker arguments each child gets
    (the parent's own, minus ``--processes``); the children skip the encoder reference (the
    one-process run beside this one has it)."""
    import json  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    if processes < 2:
        raise ValueError("processes must be at least 2")
    share = events // processes
    if share < 1:
        raise ValueError(f"{events} events cannot be shared among {processes} processes")
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="moderator-bench-gate-") as tmp:
        gate = Path(tmp)
        cmd = [sys.executable, "-m", "moderator.cli", "bench-worker", *child_argv, "--processes", "1",
               "--events", str(share), "--encoder-seconds", "0", "--start-gate", str(gate)]
        outs = [gate / f"child-{i}.json" for i in range(processes)]
        errs = [gate / f"child-{i}.err" for i in range(processes)]
        procs = []
        try:
            for i in range(processes):
                with open(outs[i], "wb") as out, open(errs[i], "wb") as err:
                    procs.append(subprocess.Popen(cmd, stdout=out, stderr=err))
            log(f"{processes} worker processes loading ...")
            while len(list(gate.glob("ready-*"))) < processes:
                failed = [i for i, p in enumerate(procs) if p.poll() is not None]
                if failed or time.monotonic() > deadline:
                    why = (f"child {failed[0]} exited with {procs[failed[0]].returncode}" if failed
                           else f"not all ready in {timeout_s:.0f} s")
                    tail = errs[failed[0] if failed else 0].read_text(errors="replace")[-1500:]
                    raise RuntimeError(f"bench-worker --processes: {why}:\n{tail}")
                time.sleep(0.05)
            (gate / "go").touch()
            log(f"{processes} worker processes started together ...")
            for i, p in enumerate(procs):
                rc = p.wait(max(1.0, deadline - time.monotonic()))
                if rc != 0:
                    raise RuntimeError(f"bench-worker --processes: child {i} exited with {rc}:\n"
                                       + errs[i].read_text(errors="replace")[-1500:])
            results = [json.loads(o.read_text().splitlines()[0]) for o in outs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
    first = min(r["measured_epoch_s"][0] for r in results)
    last = max(r["measured_epoch_s"][1] for r in results)
    total = sum(r["events"] for r in results)
    stages = Counter()
    for r in results:
        stages.update({k: v * r["events"] / total for k, v in r["stage_ms_per_event"].items()})
    return {
        "source": "memory", "processes": processes, "events": total,
        "dead_letters": sum(r["dead_letters"] for r in results),
        "worker_decisions_per_s": round(total / (last - first), 1),
        "worker_seconds_first_consume_to_last_ack": round(last - first, 2),
        "per_process_decisions_per_s": [r["worker_decisions_per_s"] for r in results],
        "start_spread_s": round(max(r["measured_epoch_s"][0] for r in results) - first, 3),
        "cpu_seconds_per_event_ms": round(sum(r["cpu_seconds_per_event_ms"] * r["events"] for r in results) / total,
                                          3),
        "stage_ms_per_event": {k: round(v, 3) for k, v in stages.items()},
        "decisions_in_sink": sum(r["decisions_in_sink"] for r in results),
        **{k: results[0][k] for k in ("backend", "encoder", "max_batch", "max_wait_ms", "partitions", "image",
                                      "unique_images", "cpus", "machine")},
    }


def bench_run_processes(model_dir: Path | str, policy: Path | str, *, processes: int, events: int = 4000,
                        image: str = "png", size: tuple[int, int] = (96, 96), envelope: str = "json",
                        unique_images: int = 256, max_batch: int = 32, max_wait_ms: int = 50, partitions: int = 4,
                        encoder_seconds: float = 5.0, bootstrap_servers: str | None = None,
                        overrides: dict | None = None, timeout_s: float = 900.0, log=print) -> dict:
    """``moderator run`` itself, as one process and then as ``processes`` (the supervisor), each
    on its own topic of a real broker: once ready, the events are produced as fast as they go;
    decisions/s counts the decision records timestamped after the producer finished (start-up
    and the producer's CPU left out); process CPU per event (start-up included); the encoder on
    the same images before and after, as in ``bench_worker``."""
    import tempfile  # noqa: PLC0415

    from kafka import KafkaConsumer, TopicPartition  # noqa: PLC0415

    from moderator.encode import ImageEncoder  # noqa: PLC0415
    from moderator.produce import ensure_topics, produce  # noqa: PLC0415
    from moderator.worker.http import free_loopback_port, local_get  # noqa: PLC0415

    if processes < 2:
        raise ValueError("processes must be at least 2 (one process is always run for comparison)")
    log(f"drawing {events} {image} events at {size[0]}x{size[1]} ...")
    evs = bench_events(events, image, size, seed=7, id_prefix="run", unique=unique_images, envelope=envelope)
    images = [e.image for e in evs[:256]]
    reference = ImageEncoder(Path(model_dir))
    enc_before = _encoder_rates(reference, images, max_batch, encoder_seconds)
    result: dict = {"source": "kafka", "method": "moderator run as a subprocess, ready before the events are "
                    "produced; decisions/s over the decision records timestamped after the last event was "
                    "acknowledged (the producer done), to the last decision", "runs": {}}
    with contextlib.ExitStack() as stack:
        if bootstrap_servers is None:
            from moderator.devservices import services  # noqa: PLC0415

            bootstrap_servers = stack.enter_context(services(kafka=True, redis=False)).kafka_bootstrap
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moderator-bench-run-")))
        for n in (1, processes):
            run = f"bench-run-{uuid.uuid4().hex[:8]}"
            ensure_topics(bootstrap_servers, {f"{run}.images": partitions, f"{run}.decisions": partitions,
                                              f"{run}.flagged": 1, f"{run}.review": 1, f"{run}.dead-letter": 1})
            port = free_loopback_port()
            env = {**os.environ, **{f"MODERATOR_{k.upper()}": str(v) for k, v in (overrides or {}).items()},
                   "MODERATOR_KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers, "MODERATOR_INPUT_TOPIC": f"{run}.images",
                   "MODERATOR_CONSUMER_GROUP": run, "MODERATOR_DECISIONS_TOPIC": f"{run}.decisions",
                   "MODERATOR_FLAGGED_TOPIC": f"{run}.flagged", "MODERATOR_REVIEW_TOPIC": f"{run}.review",
                   "MODERATOR_DEAD_LETTER_TOPIC": f"{run}.dead-letter", "MODERATOR_REDIS_URL": "",
                   "MODERATOR_HTTP_HOST": "127.0.0.1", "MODERATOR_HTTP_PORT": str(port),
                   "MODERATOR_POLICY_RELOAD_INTERVAL_S": "0", "MODERATOR_MAX_BATCH": str(max_batch),
                   "MODERATOR_MAX_WAIT_MS": str(max_wait_ms), "MODERATOR_PROCESSES": str(n)}
            cpu0 = os.times()
            with open(logs / f"{run}.log", "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "moderator", "run", "--model-dir", str(model_dir),
                                         "--policy", str(policy)], env=env, stdout=out, stderr=subprocess.STDOUT)
            reader = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
            tps = [TopicPartition(f"{run}.decisions", p) for p in range(partitions)]
            deadline = time.monotonic() + timeout_s
            try:
                while local_get(port, "/readyz")[0] != 200:  # every process joined: start-up is over
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moderator run --processes {n} never got ready ({proc.poll()}):\n"
                                           + (logs / f"{run}.log").read_text(errors="replace")[-2000:])
                    time.sleep(0.2)
                log(f"moderator run --processes {n}: ready; {events} events as fast as they go ...")
                produce(bootstrap_servers, f"{run}.images", evs)
                loaded_ms = time.time() * 1000  # counted from here: the producer no longer takes CPU
                while sum(reader.end_offsets(tps).values()) < events:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moderator run --processes {n} stopped early ({proc.poll()}):\n"
                                           + (logs / f"{run}.log").read_text(errors="replace")[-2000:])
                    time.sleep(0.2)
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(120)
                cpu = sum(os.times()[2:4]) - sum(cpu0[2:4])  # children's user + system (waited for)
                reader.assign(tps)
                reader.seek_to_beginning(*tps)
                stamps: list[int] = []
                while len(stamps) < events:
                    got = reader.poll(timeout_ms=1000)
                    if not got:
                        break
                    stamps += [r.timestamp for recs in got.values() for r in recs]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
                reader.close()
            after = sorted(t for t in stamps if t >= loaded_ms)
            if len(after) < max(2, events // 10):
                raise RuntimeError(f"only {len(after)} of {events} decisions came after the events were loaded: "
                                   "use more --events")
            span = (after[-1] - loaded_ms) / 1000
            result["runs"][str(n)] = {"processes": n, "exit_status": rc, "decisions": len(stamps),
                                      "decisions_measured": len(after),
                                      "worker_decisions_per_s": round(len(after) / span, 1),
                                      "cpu_seconds_per_event_ms": round(1000 * cpu / events, 3)}
    enc_after = _encoder_rates(reference, images, max_batch, encoder_seconds)
    enc = _encoder_reference(enc_before, enc_after)
    result.update(enc)
    for r in result["runs"].values():
        r["ratio_worker_to_encoder_with_preprocess"] = round(
            r["worker_decisions_per_s"] / enc["encoder_with_preprocess_images_per_s"], 3)
    one, many = result["runs"]["1"], result["runs"][str(processes)]
    result["ratio_processes_to_one"] = round(many["worker_decisions_per_s"] / one["worker_decisions_per_s"], 2)
    result.update({"events": events, "max_batch": max_batch, "max_wait_ms": max_wait_ms, "partitions": partitions,
                   "image": _image_label(image, size, envelope), "cpus": os.cpu_count(), "machine": platform.machine()})
    return result


# --- delivery guarantees: what exactly-once costs ------------------------------------------------


def bench_guarantees(model_dir: Path | str, policy: Path | str, *, rounds: int = 2,
                     bootstrap_servers: str | None = None, overrides: dict | None = None, log=print,
                     **kwargs) -> dict:
    """The worker through one broker in both delivery modes, interleaved (at-least-once,
    exactly-once, at-least-once, ...: the machine's drift falls on both), each round a fresh
    topic and group; returns each mode's rates, their medians and the exactly-once /
    at-least-once ratio."""
    import statistics  # noqa: PLC0415

    modes = ("at_least_once", "exactly_once")
    rates: dict[str, list[float]] = {m: [] for m in modes}
    with contextlib.ExitStack() as stack:
        if bootstrap_servers is None:
            from moderator.devservices import services  # noqa: PLC0415

            bootstrap_servers = stack.enter_context(services(kafka=True, redis=False)).kafka_bootstrap
        for r in range(rounds):
            for mode in modes:
                log(f"round {r + 1}/{rounds}: {mode} ...")
                res = bench_worker(model_dir, policy, source="kafka", bootstrap_servers=bootstrap_servers,
                                   overrides={**(overrides or {}), "processing_guarantee": mode}, log=log, **kwargs)
                rates[mode].append(res["worker_decisions_per_s"])
    median = {m: round(statistics.median(v), 1) for m, v in rates.items()}
    return {"decisions_per_s": rates, "median_decisions_per_s": median,
            "ratio_exactly_once_to_at_least_once": round(median["exactly_once"] / median["at_least_once"], 3),
            "rounds": rounds, "cpus": os.cpu_count()}


# --- policies: what banks, PDQ or more categories cost ----------------------------------------


def bench_policies(model_dir: Path | str, policy: Path | str, other: Path | str, *, rounds: int = 2,
                   source: str = "memory", bootstrap_servers: str | None = None, log=print, **kwargs) -> dict:
    """The worker with ``policy`` and with ``other``, interleaved over ``rounds`` on the same
    events; each policy's rates, medians, per-event stage seconds of the last round, and the
    ``other`` / ``policy`` throughput ratio."""
    import statistics  # noqa: PLC0415

    names = {"policy": Path(policy), "other": Path(other)}
    rates: dict[str, list[float]] = {k: [] for k in names}
    stages: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        if source == "kafka" and bootstrap_servers is None:
            from moderator.devservices import services  # noqa: PLC0415

            bootstrap_servers = stack.enter_context(services(kafka=True, redis=False)).kafka_bootstrap
        for r in range(rounds):
            for key, path in names.items():
                log(f"round {r + 1}/{rounds}: {path} ...")
                res = bench_worker(model_dir, path, source=source, bootstrap_servers=bootstrap_servers, log=log,
                                   **kwargs)
                rates[key].append(res["worker_decisions_per_s"])
                stages[key] = res.get("stage_ms_per_event", {})
    median = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    return {"policy": str(names["policy"]), "other": str(names["other"]), "decisions_per_s": rates,
            "median_decisions_per_s": median, "stages_last_round": stages,
            "ratio_other_to_policy": round(median["other"] / median["policy"], 3), "rounds": rounds,
            "source": source, "cpus": os.cpu_count()}


# --- JPEG draft: what the DCT-domain downscale costs in accuracy and pixels ----------------------


def jpeg_draft_effect(model_dir: Path | str, *, n: int = 1000, size: int = 512, quality: int = 85,
                      seed: int = 0) -> dict:
    """Held-out zero-shot accuracy of the demo domain through the worker's decode path
    (``decode_image`` + preprocessing + the ONNX encoder), with and without ``draft``, on
    ``n`` held-out scenes drawn at ``size`` px and stored as JPEG; plus the pixel
    difference of the two preprocessed inputs (0-255 units, before normalisation) and the
    decode+preprocess time of each."""
    from moderator.decode import decode_image  # noqa: PLC0415
    from moderator.encode import ImageEncoder, TextEncoder, ensemble_embeddings  # noqa: PLC0415
    from moderator.model import synth  # noqa: PLC0415

    enc = ImageEncoder(model_dir)
    pre = enc.preprocessor
    h, w = pre.image_size
    names = synth.class_names()
    text = ensemble_embeddings(TextEncoder(model_dir), names, synth.ZERO_SHOT_TEMPLATES)
    rng = np.random.default_rng([seed, 5])
    blobs, labels = [], []
    for s in synth.iter_samples(n, seed, "heldout", size):
        arr = np.asarray(s.image, dtype=np.int16) + rng.normal(0, 4, (size, size, 1)).astype(np.int16)
        buf = io.BytesIO()
        from PIL import Image  # noqa: PLC0415

        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        blobs.append(buf.getvalue())
        labels.append(names.index(f"{s.colour} {s.shape}"))
    out: dict = {"n": n, "image": f"{size}x{size} JPEG q{quality}", "model_input": [h, w]}
    crops: dict[str, list] = {}
    for name, draft in (("full", None), ("draft", (w, h))):
        t0 = time.perf_counter()
        crops[name] = [np.asarray(pre.resize_and_crop(decode_image(b, draft=draft).image)) for b in blobs]
        dt = time.perf_counter() - t0
        pixels = np.stack([pre.to_array(decode_image(b, draft=draft).image) for b in blobs])
        pred = np.concatenate([(enc.encode_pixels(pixels[i:i + 64]) @ text.T).argmax(1)
                               for i in range(0, n, 64)])
        out[name] = {"accuracy": round(float((pred == np.asarray(labels)).mean()), 4),
                     "decode_preprocess_per_s": round(n / dt, 1)}
    diff = np.abs(np.stack(crops["full"]).astype(np.int16) - np.stack(crops["draft"]).astype(np.int16))
    out["pixel_abs_diff"] = {"max": int(diff.max()), "mean": round(float(diff.mean()), 3),
                             "p99": float(np.percentile(diff, 99))}
    out["accuracy_delta_points"] = round(100 * (out["draft"]["accuracy"] - out["full"]["accuracy"]), 2)
    return out
