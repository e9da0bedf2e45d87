"""Policy prompt embeddings, computed once per (model, prompt set) and cached.

The text encoder is the expensive part of loading a policy, and its result only
depends on the model and the prompts. So the embeddings live in Redis under a key
derived from both hashes (float32 bytes + shape) and every replica and restart
reuses them; a cold start with a warm cache never builds the text encoder.
Without Redis an in-process cache serves; with Redis configured but failing, the
embeddings are computed locally, the failure is counted and logged once per outage.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from moderator import metrics
from moderator.decide.policy import prompt_set, prompt_set_sha256
from moderator.encode.prompts import ensemble_embeddings
from moderator.schemas import PolicyDoc

log = logging.getLogger(__name__)

KEY_PREFIX = "moderator:policy-embeddings:v1"


class EmbeddingCache(Protocol):
    def get(self, key: str) -> np.ndarray | None: ...
    def put(self, key: str, value: np.ndarray) -> None: ...


class InProcessCache:
    def __init__(self) -> None:
        self._data: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: str, value: np.ndarray) -> None:
        with self._lock:
            self._data[key] = value


class RedisHealth:
    """Counts Redis failures and logs once per outage (and once on recovery)."""

    def __init__(self, name: str = "redis") -> None:
        self.name = name
        self.down = False
        self._lock = threading.Lock()

    def failed(self, op: str, err: Exception) -> None:
        metrics.REDIS_ERRORS.labels(op=op).inc()
        with self._lock:
            if not self.down:
                self.down = True
                log.error("%s unavailable (%s: %s); serving without it until it returns",
                          self.name, type(err).__name__, err)

    def ok(self) -> None:
        if self.down:
            with self._lock:
                if self.down:
                    self.down = False
                    log.warning("%s is back", self.name)


class RedisEmbeddingCache:
    """Redis hash per key: ``data`` (float32 bytes, C order), ``shape`` ("rows,dim")."""

    def __init__(self, client, ttl_seconds: int | None = None, health: RedisHealth | None = None) -> None:
        self.client = client
        self.ttl = ttl_seconds
        self.health = health or RedisHealth()

    @classmethod
    def from_url(cls, url: str, ttl_seconds: int | None = None, timeout: float = 1.0,
                 options: Mapping[str, object] | None = None) -> "RedisEmbeddingCache":
        """``options``: user, password and TLS files (``RedisClientSettings.redis_options()``)."""
        from moderator.redis_client import redis_client  # noqa: PLC0415

        return cls(redis_client(url, options, timeout_s=timeout), ttl_seconds)

    def get(self, key: str) -> np.ndarray | None:
        try:
            raw = self.client.hgetall(key)
        except Exception as e:  # redis-py raises ConnectionError, TimeoutError, ResponseError...
            self.health.failed("get", e)
            return None
        self.health.ok()
        if not raw:
            return None
        try:
            rows, dim = (int(v) for v in raw[b"shape"].decode().split(","))
            arr = np.frombuffer(raw[b"data"], dtype=np.float32)
            return arr.reshape(rows, dim).copy()
        except (KeyError, ValueError) as e:
            log.warning("ignoring malformed cached embeddings at %s: %s", key, e)
            return None

    def put(self, key: str, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, dtype=np.float32)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(key, mapping={"data": value.tobytes(), "shape": f"{value.shape[0]},{value.shape[1]}"})
            if self.ttl:
                pipe.expire(key, self.ttl)
            pipe.execute()
        except Exception as e:
            self.health.failed("put", e)
            return
        self.health.ok()


class TextEncoderLike(Protocol):
    def encode(self, texts): ...


@dataclass(frozen=True)
class PolicyEmbeddings:
    """One L2-normalised row per unique (prompt, templates) pair of a policy."""

    matrix: np.ndarray
    index: dict[tuple[str, tuple[str, ...]], int]
    key: str
    from_cache: bool

    def rows(self, prompts: list[str], templates: tuple[str, ...]) -> np.ndarray:
        return self.matrix[[self.index[(p, templates)] for p in prompts]]


def cache_key(model_sha256: str, doc: PolicyDoc) -> str:
    return f"{KEY_PREFIX}:{model_sha256}:{prompt_set_sha256(prompt_set(doc))}"


def policy_embeddings(
    doc: PolicyDoc,
    model_sha256: str,
    text_encoder: Callable[[], TextEncoderLike],
    cache: EmbeddingCache,
) -> PolicyEmbeddings:
    """Fetch the policy's prompt embeddings, or compute and store them.

    ``text_encoder`` is a factory: it is only called on a cache miss, so a warm
    cache means the text encoder is never even loaded.
    """
    pairs = prompt_set(doc)
    key = cache_key(model_sha256, doc)
    index = {pair: i for i, pair in enumerate(pairs)}
    cached = cache.get(key)
    if cached is not None and cached.shape[0] == len(pairs):
        metrics.POLICY_EMBEDDING_CACHE.labels(result="hit").inc()
        return PolicyEmbeddings(cached, index, key, True)
    metrics.POLICY_EMBEDDING_CACHE.labels(result="miss").inc()
    encoder = text_encoder()
    metrics.TEXT_ENCODER_RUNS.inc()
    by_templates: dict[tuple[str, ...], list[int]] = {}
    for i, (_, templates) in enumerate(pairs):
        by_templates.setdefault(templates, []).append(i)
    matrix = None
    for templates, idx in by_templates.items():
        emb = ensemble_embeddings(encoder, [pairs[i][0] for i in idx], templates)
        if matrix is None:
            matrix = np.zeros((len(pairs), emb.shape[1]), dtype=np.float32)
        matrix[idx] = emb
    cache.put(key, matrix)
    return PolicyEmbeddings(matrix, index, key, False)
