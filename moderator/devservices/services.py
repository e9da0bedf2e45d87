"""One entry point that finds or starts Kafka and Redis, whatever the machine offers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from moderator.devservices.errors import DevServiceError, ServiceStartError
from moderator.devservices.kafka import LocalKafka, wait_for_kafka
from moderator.devservices.redis import LocalRedis, wait_for_redis

Source = Literal["env", "docker", "local"]
Backend = Literal["auto", "docker", "local"]

KAFKA_ENV = "KAFKA_BOOTSTRAP_SERVERS"
REDIS_ENV = "REDIS_URL"
BACKEND_ENV = "MODERATOR_DEVSERVICES"


@dataclass(frozen=True)
class Services:
    """Where the running services are, and how each was obtained.

    ``local_kafka`` / ``local_redis`` are the process handles when a service
    was started locally (e.g. ``local_redis.stop()`` to simulate an outage);
    None for services that came from the environment or a container.
    """

    kafka_bootstrap: str | None = None
    redis_url: str | None = None
    kafka_source: Source | None = None
    redis_source: Source | None = None
    local_kafka: LocalKafka | None = None
    local_redis: LocalRedis | None = None


@contextlib.contextmanager
def services(kafka: bool = True, redis: bool = True, *, backend: Backend | None = None) -> Iterator[Services]:
    """Provide Kafka and/or Redis for the duration of the block.

    Per service, first match wins:

    1. ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` set: used as is (checked to answer).
    2. A Docker engine answers: testcontainers (``KafkaContainer`` / ``RedisContainer``).
    3. Local processes: ``LocalKafka`` (JVM, jars via Maven) / ``LocalRedis`` (redis-server).

    ``backend`` (default ``$MODERATOR_DEVSERVICES`` or ``auto``) narrows steps 2-3:
    ``docker`` requires the engine, ``local`` never asks for it.

    Raises:
        DevServiceError: a service could not be provided; never a silent skip.
    """
    backend = backend or os.environ.get(BACKEND_ENV, "auto")  # type: ignore[assignment]
    if backend not in ("auto", "docker", "local"):
        raise DevServiceError(f"{BACKEND_ENV}={backend!r}: expected auto, docker or local")

    docker_answer: list[bool] = []  # probe the engine at most once, and only if needed

    def use_docker() -> bool:
        if backend == "local":
            return False
        if not docker_answer:
            from moderator.devservices.docker import docker_engine_available

            docker_answer.append(docker_engine_available())
        if backend == "docker" and not docker_answer[0]:
            raise DevServiceError(f"{BACKEND_ENV}=docker but no Docker engine answers a ping.")
        return docker_answer[0]

    found: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        # Redis first: it is instant, so a missing redis-server fails before a JVM starts.
        if redis:
            if os.environ.get(REDIS_ENV):
                found.update(redis_url=os.environ[REDIS_ENV], redis_source="env")
                _check_env(REDIS_ENV, lambda: wait_for_redis(os.environ[REDIS_ENV], timeout_s=10))
            elif use_docker():
                from moderator.devservices.docker import redis_container

                found.update(redis_url=stack.enter_context(redis_container()), redis_source="docker")
            else:
                local_redis = stack.enter_context(LocalRedis())
                found.update(redis_url=local_redis.url, redis_source="local", local_redis=local_redis)
        if kafka:
            if os.environ.get(KAFKA_ENV):
                found.update(kafka_bootstrap=os.environ[KAFKA_ENV], kafka_source="env")
                _check_env(KAFKA_ENV, lambda: wait_for_kafka(os.environ[KAFKA_ENV], timeout_s=30))
            elif use_docker():
                from moderator.devservices.docker import kafka_container

                found.update(kafka_bootstrap=stack.enter_context(kafka_container()), kafka_source="docker")
            else:
                local = stack.enter_context(LocalKafka())
                found.update(kafka_bootstrap=local.bootstrap_servers, kafka_source="local", local_kafka=local)
        yield Services(**found)  # type: ignore[arg-type]


def _check_env(name: str, wait: Callable[[], None]) -> None:
    try:
        wait()
    except ServiceStartError as exc:
        raise ServiceStartError(f"{exc} It came from ${name}; unset it to start one instead.") from None
