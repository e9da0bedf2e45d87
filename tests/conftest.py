"""Shared fixtures: real Kafka and Redis for the whole session, fresh topics per test.

Services come from ``moderator.devservices.services()``: ``KAFKA_BOOTSTRAP_SERVERS`` /
``REDIS_URL`` when set, else testcontainers when a Docker engine answers, else
local processes. Each is started only if some test asks for it. When a service
cannot be had the fixture errors -- tests that need Kafka never silently skip.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator

import pytest

from moderator.devservices import LocalRedis, Services
from moderator.devservices import services as devservices

# --- services (session) --------------------------------------------------------


@pytest.fixture(scope="session")
def _kafka_service() -> Iterator[Services]:
    with devservices(kafka=True, redis=False) as running:
        yield running


@pytest.fixture(scope="session")
def _redis_service() -> Iterator[Services]:
    with devservices(kafka=False, redis=True) as running:
        yield running


@pytest.fixture(scope="session")
def kafka_bootstrap(_kafka_service: Services) -> str:
    """``host:port`` of a running Kafka broker."""
    assert _kafka_service.kafka_bootstrap
    return _kafka_service.kafka_bootstrap


@pytest.fixture(scope="session")
def redis_url(_redis_service: Services) -> str:
    """``redis://`` URL of a running Redis (shared: use unique keys)."""
    assert _redis_service.redis_url
    return _redis_service.redis_url


@pytest.fixture(scope="session")
def services(_kafka_service: Services, _redis_service: Services) -> Services:
    """Both services, with how each was obtained (``kafka_source``, ``redis_source``)."""
    return Services(
        kafka_bootstrap=_kafka_service.kafka_bootstrap,
        redis_url=_redis_service.redis_url,
        kafka_source=_kafka_service.kafka_source,
        redis_source=_redis_service.redis_source,
        local_kafka=_kafka_service.local_kafka,
        local_redis=_redis_service.local_redis,
    )


@pytest.fixture
def local_redis() -> Iterator[LocalRedis]:
    """A private redis-server for tests that stop/restart it; never the shared one."""
    with LocalRedis() as server:
        yield server


# --- Kafka topics (per test) -----------------------------------------------------


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str):
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="moderator-tests-admin")
    yield admin
    admin.close()


TopicFactory = Callable[..., str]


@pytest.fixture
def topic_factory(kafka_admin, request: pytest.FixtureRequest) -> Iterator[TopicFactory]:
    """``make(partitions=1, *, suffix="", configs=None) -> name``: create a fresh topic.

    Names embed the test name plus a random part, so tests can share one broker
    (and reruns one long-lived broker) without seeing each other's records.
    Returns once every partition has a leader. Topics are deleted afterwards.
    """
    created: list[str] = []
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:120]

    def make(partitions: int = 1, *, suffix: str = "", configs: dict[str, str] | None = None) -> str:
        name = f"test.{base}{'.' + suffix if suffix else ''}.{uuid.uuid4().hex[:8]}"
        kafka_admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1, "configs": configs or {}}},
            wait_for_metadata=True,
        )
        created.append(name)
        return name

    yield make
    if created:
        try:
            kafka_admin.delete_topics(created, raise_errors=False)
        except Exception:  # cleanup only; the broker is throwaway anyway
            pass


@pytest.fixture
def unique_topic(topic_factory: TopicFactory) -> str:
    """A fresh single-partition topic."""
    return topic_factory(1)


# --- models (session) ------------------------------------------------------------


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """The tiny architecture with random weights, exported once per session (mechanics only)."""
    pytest.importorskip("torch")
    from moderator.model.export import export_model, load_model

    out = tmp_path_factory.mktemp("models") / "random-tiny"
    export_model(load_model("moderator-tiny", seed=0), out)
    return out


@pytest.fixture(scope="session")
def demo_model():
    """The tiny CLIP trained on the synthetic shapes domain (cached across runs: semantics)."""
    pytest.importorskip("torch")
    from moderator.model.demo import ensure_demo_model

    return ensure_demo_model(progress=False)
