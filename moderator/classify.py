"""``moderator classify``: decisions for local image files, no Kafka.

Wires the stages together for one process: decode (hostile-input safe) ->
encode (ONNX) -> decide (policy engine, Redis-cached prompt embeddings when a
Redis URL is given). Every file yields either a decision or a named error.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from moderator.decide.embeddings import InProcessCache, RedisEmbeddingCache
from moderator.decide.engine import PolicyCompiler
from moderator.decide.policy import load_policy
from moderator.decode import DecodeLimits, decode_image
from moderator.decode.pdq import pdq_hash
from moderator.encode import ImageEncoder, ModelDirectory, TextEncoder
from moderator.errors import InputError, ModeratorError
from moderator.schemas import Decision

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".mpo"}


@dataclass
class FileResult:
    path: Path
    decision: Decision | None = None
    error: ModeratorError | None = None


def decode_file(path: Path, limits: DecodeLimits, draft: tuple[int, int] | None = None):
    """A local image file through the worker's decoder; ``ModeratorError`` (with its reason) if not."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror or e}", reason="unreadable_file") from e
    return decode_image(data, limits, draft=draft)


def expand_paths(inputs: Iterable[Path]) -> list[Path]:
    """Files as given; directories contribute their image files (recursively, sorted)."""
    out: list[Path] = []
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


class Classifier:
    """A model + policy ready to decide local files."""

    def __init__(self, model_dir: Path | str, policy_path: Path | str, *, redis_url: str | None = None,
                 providers: list[str] | None = None, limits: DecodeLimits = DecodeLimits(),
                 redis_options: dict | None = None, jpeg_draft: bool = True) -> None:
        self.model_dir = ModelDirectory(model_dir)
        self.image_encoder = ImageEncoder(self.model_dir, providers=providers)
        self.limits = limits
        h, w = self.image_encoder.preprocessor.image_size  # decode as the worker does (MODERATOR_JPEG_DRAFT)
        self.draft = (w, h) if jpeg_draft else None
        self.compile = PolicyCompiler(
            self.model_dir, (RedisEmbeddingCache.from_url(redis_url, options=redis_options) if redis_url
                             else InProcessCache()),
            lambda: TextEncoder(self.model_dir, providers=providers))
        self.engine = self.compile.engine(load_policy(policy_path))
        self.policy_path = Path(policy_path)

    def classify_files(self, paths: Iterable[Path], batch_size: int = 32) -> Iterator[FileResult]:
        batch: list[tuple[Path, object, dict]] = []
        for path in paths:
            t0 = time.perf_counter()
            try:
                decoded = decode_file(path, self.limits, self.draft)
            except ModeratorError as e:
                yield FileResult(path, error=e)
                continue
            batch.append((path, decoded, {"decode": round((time.perf_counter() - t0) * 1000, 3)}))
            if len(batch) >= batch_size:
                yield from self._flush(batch)
                batch = []
        if batch:
            yield from self._flush(batch)

    def _flush(self, batch) -> Iterator[FileResult]:
        t0 = time.perf_counter()
        emb = self.image_encoder.encode([d.image for _, d, _ in batch])
        enc_ms = (time.perf_counter() - t0) * 1000 / len(batch)
        for _, _, t in batch:
            t["encode"] = round(enc_ms, 3)
        pdq = [pdq_hash(d.image) for _, d, _ in batch] if self.engine.policy.needs_pdq else None
        decisions = self.engine.decide(
            [f"file:{p.name}:{d.sha256[:16]}" if d.sha256 else str(uuid.uuid4()) for p, d, _ in batch], emb,
            image_sha256=[d.sha256 for _, d, _ in batch], timings_ms=[t for _, _, t in batch],
            metadata=[{"path": str(p)} for p, _, _ in batch], pdq=pdq,
        )
        for (p, _, _), dec in zip(batch, decisions):
            yield FileResult(p, decision=dec)
