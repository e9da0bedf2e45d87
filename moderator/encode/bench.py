"""Encoder throughput benchmark (``moderator bench-encoder``), not a test.

Measures images/s for each backend and batch size in one process, so the rows
of one run can be compared as ratios. Reports the encoder alone (preprocessed
pixels) and preprocessing + encoder (from decoded PIL images).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from moderator.encode.model_dir import ModelDirectory


def _rate(fn, n_per_call: int, seconds: float) -> tuple[float, int]:
    fn()  # warm-up (session init, CUDA graph capture, allocator)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            return calls * n_per_call / elapsed, calls


BACKENDS = ("onnx", "torch", "torch-eager", "torch-fp32")


def _encoder(backend: str, md: ModelDirectory):
    """onnx: ONNX Runtime. torch: defaults (fp16 + CUDA graphs on CUDA). torch-eager:
    fp16 without graphs. torch-fp32: fp32 without graphs."""
    if backend == "onnx":
        from moderator.encode.onnx_backend import ImageEncoder  # noqa: PLC0415

        return ImageEncoder(md)
    from moderator.encode.torch_backend import TorchImageEncoder  # noqa: PLC0415

    if backend == "torch-eager":
        return TorchImageEncoder(md, cuda_graphs=False)
    if backend == "torch-fp32":
        return TorchImageEncoder(md, fp16=False, cuda_graphs=False)
    return TorchImageEncoder(md)


def bench_encoders(model_dir: Path | str, batch_sizes: Sequence[int], seconds: float,
                   backends: Sequence[str] = ("onnx",)) -> Iterator[dict]:
    md = ModelDirectory(model_dir)
    h, w = md.manifest.preprocess.image_size
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(max(batch_sizes))]
    for backend in backends:
        enc = _encoder(backend, md)
        for bs in batch_sizes:
            pixels = rng.standard_normal((bs, 3, h, w)).astype(np.float32)
            enc_rate, calls = _rate(lambda: enc.encode_pixels(pixels), bs, seconds)
            full_rate, _ = _rate(lambda: enc.encode(photos[:bs]), bs, seconds)
            yield {
                "backend": backend, "batch": bs, "images_per_s_encoder": round(enc_rate, 1),
                "images_per_s_with_preprocess_640x480": round(full_rate, 1), "calls": calls,
                "model": md.manifest.architecture, "image_size": [h, w],
                "runtime": enc.runtime_info(), "cpus": os.cpu_count(), "machine": platform.machine(),
            }
