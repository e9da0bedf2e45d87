"""Kafka / Redis in containers via testcontainers, when a Docker engine answers.

Imported lazily by ``services()``: neither ``docker`` nor ``testcontainers`` is
needed unless an engine is actually there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Confluent's image is the one testcontainers' KafkaContainer scripts against.
DEFAULT_KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
DEFAULT_REDIS_IMAGE = "redis:7"


def docker_engine_available(timeout_s: float = 2.0) -> bool:
    """True only if a Docker engine answers a ping; a docker CLI without a daemon is False."""
    try:
        import docker

        client = docker.from_env(timeout=max(1, round(timeout_s)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@contextlib.contextmanager
def kafka_container(image: str | None = None) -> Iterator[str]:
    """A KRaft Kafka container; yields its bootstrap servers (``host:port``)."""
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # testcontainers < 4.14
        from testcontainers.kafka import KafkaContainer

    container = KafkaContainer(image or os.environ.get("MODERATOR_KAFKA_IMAGE", DEFAULT_KAFKA_IMAGE))
    with container.with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


@contextlib.contextmanager
def redis_container(image: str | None = None) -> Iterator[str]:
    """A Redis container; yields its ``redis://host:port/0`` URL."""
    try:
        from testcontainers.community.redis import RedisContainer
    except ImportError:  # testcontainers < 4.14
        from testcontainers.redis import RedisContainer

    with RedisContainer(image or os.environ.get("MODERATOR_REDIS_IMAGE", DEFAULT_REDIS_IMAGE)) as redis:
        host, port = redis.get_container_host_ip(), redis.get_exposed_port(redis.port)
        yield f"redis://{host}:{port}/0"
