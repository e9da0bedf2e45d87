"""Image-embedding cache, keyed by content hash: an image seen before skips decode and encode.

Key: ``moderator:image-embedding:v1:<model sha256>:<image sha256>``. It stores what
the image *is* to this model (its embedding), not a decision, so a policy edit
keeps every entry: the worker re-applies the policy in force to the cached
embedding, which gives exactly the decision a fresh run would (the same scores
and actions, with the per-event parts -- event id, metadata, the audit sample
drawn per event id -- of *this* event). Scoring is microseconds; decode and
encode are what it saves. A new model never reuses an old entry.

Redis is optional and never required: when it fails the worker decodes and
encodes as if nothing were cached, counts the failure, logs once per outage
(``RedisHealth``), and skips Redis for ``retry_s`` so a dead or hung server does
not cost a timeout per image.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import numpy as np

from moderator import metrics
from moderator.decide.embeddings import RedisHealth
from moderator.redis_client import redis_client

KEY_PREFIX = "moderator:image-embedding:v1"


def image_embedding_key(model_sha256: str, image_sha256: str) -> str:
    return f"{KEY_PREFIX}:{model_sha256}:{image_sha256}"


class ImageEmbeddingCache:
    def __init__(self, client, ttl_s: int, retry_s: float = 2.0, health: RedisHealth | None = None) -> None:
        self.client = client
        self.ttl_s = int(ttl_s)
        self.retry_s = retry_s
        self.health = health or RedisHealth("redis (image-embedding cache)")
        self._skip_until = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, ttl_s: int, *, timeout_s: float = 0.5, retry_s: float = 2.0,
                 options: Mapping[str, object] | None = None) -> "ImageEmbeddingCache":
        """``options``: user, password and TLS files (``RedisClientSettings.redis_options()``)."""
        return cls(redis_client(url, options, timeout_s=timeout_s, health_check_interval=0), ttl_s, retry_s)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, op: str, err: Exception) -> None:
        with self._lock:
            self._skip_until = time.monotonic() + self.retry_s
        self.health.failed(op, err)

    def get(self, key: str) -> np.ndarray | None:
        if not self.available:
            metrics.IMAGE_EMBEDDING_CACHE.labels(result="unavailable").inc()
            return None
        try:
            raw = self.client.get(key)
        except Exception as e:  # redis-py: ConnectionError, TimeoutError, ...
            self._failed("image_embedding_cache_get", e)
            metrics.IMAGE_EMBEDDING_CACHE.labels(result="unavailable").inc()
            return None
        self.health.ok()
        if not raw or len(raw) % 4:
            metrics.IMAGE_EMBEDDING_CACHE.labels(result="miss").inc()
            return None
        metrics.IMAGE_EMBEDDING_CACHE.labels(result="hit").inc()
        return np.frombuffer(raw, dtype=np.float32).copy()

    def put_many(self, entries: list[tuple[str, np.ndarray]]) -> None:
        if not entries or not self.available:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, emb in entries:
                pipe.set(key, np.ascontiguousarray(emb, dtype=np.float32).tobytes(), ex=self.ttl_s or None)
            pipe.execute()
        except Exception as e:
            self._failed("image_embedding_cache_put", e)
            return
        self.health.ok()

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a dead connection is not an error worth raising
            pass
