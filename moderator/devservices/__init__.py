"""Real Kafka and Redis for development, tests and demos -- Docker optional.

``services()`` is the one entry point: it uses ``KAFKA_BOOTSTRAP_SERVERS`` /
``REDIS_URL`` when set, testcontainers when a Docker engine answers, and local
processes otherwise (a KRaft Kafka JVM whose jars Maven fetches once, and
``redis-server``). ``python -m moderator.devservices up`` runs them in the
foreground for ``make demo``.

Never imported by the worker; needs kafka-python and redis, plus testcontainers
only when the Docker path is taken.
"""

from moderator.devservices.docker import docker_engine_available
from moderator.devservices.errors import (
    DevServiceError,
    KafkaLibsError,
    ServiceStartError,
    ToolNotInstalledError,
)
from moderator.devservices.kafka import (
    KAFKA_VERSION,
    LocalKafka,
    kafka_libs_dir,
    kafka_ready,
    wait_for_kafka,
)
from moderator.devservices.redis import LocalRedis, redis_ready, wait_for_redis
from moderator.devservices.services import Services, services

__all__ = [
    "KAFKA_VERSION",
    "DevServiceError",
    "KafkaLibsError",
    "LocalKafka",
    "LocalRedis",
    "ServiceStartError",
    "Services",
    "ToolNotInstalledError",
    "docker_engine_available",
    "kafka_libs_dir",
    "kafka_ready",
    "redis_ready",
    "services",
    "wait_for_kafka",
    "wait_for_redis",
]
