"""``moderator bench-worker``: the worker's decisions/s through Kafka vs the bare encoder.

One run, one machine, the same images: pre-load N synthetic events onto a fresh
topic, start a worker (in this process), time first record consumed -> last input
acknowledged (every decision acked by the broker), check the decisions topic
holds N records; then run the ONNX image encoder alone over the same decoded
images at the worker's batch size. The ratio says how much of the encoder's
speed survives Kafka, JSON, base64, decode, preprocessing, policy and publishing.
A benchmark, not a test: it prints numbers and asserts nothing about speed.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import threading
import time
import uuid
from pathlib import Path

import numpy as np


def _encoder_rates(model_dir: Path, images: list[bytes], batch: int, min_seconds: float) -> dict:
    from PIL import Image  # noqa: PLC0415

    from moderator.encode import ImageEncoder  # noqa: PLC0415

    enc = ImageEncoder(model_dir)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    pixels = np.stack([enc.preprocessor.to_array(im) for im in pil])
    chunks = [pixels[i:i + batch] for i in range(0, len(pixels), batch)]

    def rate(fn) -> float:
        fn(chunks[0])  # warm-up
        n, t0 = 0, time.perf_counter()
        while True:
            for c in chunks:
                fn(c)
                n += len(c)
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                return n / dt

    enc_only = rate(enc.encode_pixels)
    pil_chunks = [pil[i:i + batch] for i in range(0, len(pil), batch)]
    enc.encode(pil_chunks[0])
    t0 = time.perf_counter()
    for c in pil_chunks:
        enc.encode(c)
    with_pre = len(pil) / (time.perf_counter() - t0)
    return {"encoder_images_per_s": round(enc_only, 1),
            "encoder_with_preprocess_images_per_s": round(with_pre, 1),
            "providers": enc.providers}


def bench_worker(model_dir: Path | str, policy: Path | str, *, events: int = 2000, size: int = 96,
                 max_batch: int = 32, max_wait_ms: int = 50, partitions: int = 3,
                 encoder_seconds: float = 5.0, bootstrap_servers: str | None = None,
                 timeout_s: float = 600.0, log=print) -> dict:
    from moderator.config import WorkerSettings  # noqa: PLC0415
    from moderator.produce import ensure_topics, produce, synthetic_events  # noqa: PLC0415
    from moderator.worker.app import Worker  # noqa: PLC0415

    model_dir = Path(model_dir)
    with contextlib.ExitStack() as stack:
        if bootstrap_servers is None:
            from moderator.devservices import services  # noqa: PLC0415

            running = stack.enter_context(services(kafka=True, redis=False))
            bootstrap_servers = running.kafka_bootstrap
        run = f"bench-{uuid.uuid4().hex[:8]}"
        topics = {f"{run}.images": partitions, f"{run}.decisions": partitions, f"{run}.flagged": 1,
                  f"{run}.review": 1, f"{run}.dead-letter": 1}
        ensure_topics(bootstrap_servers, topics)
        log(f"drawing {events} synthetic {size}x{size} PNG events ...")
        evs = list(synthetic_events(events, seed=7, size=size, id_prefix=run))
        images = [e.image for e in evs]
        report = produce(bootstrap_servers, f"{run}.images", evs)
        log(f"pre-loaded {report.sent} events ({report.bytes / 1e6:.1f} MB) in {report.seconds:.1f}s")

        settings = WorkerSettings(
            model_dir=model_dir, policy=Path(policy), kafka_bootstrap_servers=bootstrap_servers,
            input_topic=f"{run}.images", consumer_group=run, decisions_topic=f"{run}.decisions",
            flagged_topic=f"{run}.flagged", review_topic=f"{run}.review", dead_letter_topic=f"{run}.dead-letter",
            max_batch=max_batch, max_wait_ms=max_wait_ms, http_port=0, policy_reload_interval_s=0,
            redis_url=None, log_json=False)
        worker = Worker(settings)
        thread = threading.Thread(target=worker.run, name="bench-worker", daemon=True)
        t_start = time.time()
        thread.start()
        deadline = time.monotonic() + timeout_s
        while worker.stats.inputs_acked < events and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        stats = worker.stats.snapshot()
        worker.request_stop()
        thread.join(60)
        if stats["inputs_acked"] < events:
            raise RuntimeError(f"worker acknowledged {stats['inputs_acked']} of {events} inputs")
        from kafka import KafkaConsumer, TopicPartition  # noqa: PLC0415

        c = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
        try:
            ends = c.end_offsets([TopicPartition(f"{run}.decisions", p) for p in range(partitions)])
        finally:
            c.close()
        on_topic = sum(ends.values())
        busy = stats["last_acked_at"] - stats["first_consumed_at"]
        worker_rate = events / busy
        log("measuring the bare ONNX encoder on the same images ...")
        enc = _encoder_rates(model_dir, images, max_batch, encoder_seconds)
    result = {
        "events": events, "decisions_on_topic": on_topic, "dead_letters": stats["dead_letters"],
        "worker_decisions_per_s": round(worker_rate, 1),
        "worker_seconds_first_consume_to_last_ack": round(busy, 2),
        "worker_seconds_including_startup": round(stats["last_acked_at"] - t_start, 2),
        **enc,
        "ratio_worker_to_encoder": round(worker_rate / enc["encoder_images_per_s"], 3),
        "ratio_worker_to_encoder_with_preprocess": round(worker_rate / enc["encoder_with_preprocess_images_per_s"], 3),
        "max_batch": max_batch, "max_wait_ms": max_wait_ms, "partitions": partitions,
        "image": f"{size}x{size} PNG, base64 in JSON", "cpus": os.cpu_count(), "machine": platform.machine(),
    }
    return result
