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
from moderator.resources import DEMO_POLICY

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


@pytest.fixture(scope="session")
def _metadata_consumer(kafka_bootstrap: str):
    """A plain consumer for metadata look-ups only."""
    from kafka import KafkaConsumer

    client = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False,
                           client_id="moderator-tests-metadata")
    yield client
    client.close()


@pytest.fixture
def topic_factory(kafka_admin, _metadata_consumer, request: pytest.FixtureRequest) -> Iterator[TopicFactory]:
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
        # The admin client can see leaders a moment before a client's metadata request lists
        # every partition; a consumer group that forms in that moment is assigned nothing and
        # kafka-python did not rejoin within the tests' timeouts. Wait until a plain client sees
        # all partitions.
        deadline = _time.monotonic() + 30
        while True:
            _metadata_consumer.topics()  # always a fresh metadata request
            if len(_metadata_consumer.partitions_for_topic(name) or ()) >= partitions:
                break
            assert _time.monotonic() < deadline, f"topic {name}: partitions not in metadata after 30 s"
            _time.sleep(0.1)
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


# --- streaming worker (added with `moderator run`) ---------------------------------------

import time as _time  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

DEMO_POLICY_PATH = DEMO_POLICY


@pytest.fixture
def stream_topics(topic_factory: TopicFactory):
    """``make(partitions=3) -> topics``: a fresh input topic and the four output topics."""
    from types import SimpleNamespace

    def make(partitions: int = 3) -> SimpleNamespace:
        return SimpleNamespace(
            input=topic_factory(partitions, suffix="images"), decisions=topic_factory(partitions, suffix="decisions"),
            flagged=topic_factory(1, suffix="flagged"), review=topic_factory(1, suffix="review"),
            dead_letter=topic_factory(1, suffix="dead-letter"))
    return make


@pytest.fixture
def worker_settings(kafka_bootstrap: str):
    """``make(model_dir, topics, **overrides) -> WorkerSettings`` tuned for fast tests."""
    from moderator.config import WorkerSettings

    def make(model_dir, topics, **overrides) -> WorkerSettings:
        base = dict(
            model_dir=model_dir, policy=DEMO_POLICY_PATH, kafka_bootstrap_servers=kafka_bootstrap,
            input_topic=topics.input, consumer_group=f"test-{uuid.uuid4().hex[:8]}",
            decisions_topic=topics.decisions, flagged_topic=topics.flagged, review_topic=topics.review,
            dead_letter_topic=topics.dead_letter, http_host="127.0.0.1", http_port=0,
            session_timeout_ms=6000, heartbeat_interval_ms=1000, commit_interval_ms=200, max_wait_ms=20,
            policy_reload_interval_s=0, shutdown_grace_s=20, log_json=False,
            client_id=f"test-worker-{uuid.uuid4().hex[:6]}")
        base.update(overrides)
        return WorkerSettings(**base)
    return make


@pytest.fixture
def start_worker():
    """``start(settings, **kw) -> Worker`` serving in a thread until it has partitions;
    stopped (drain, commit, close) and joined at teardown."""
    import threading

    from moderator.worker import Worker

    running = []

    def start(settings, **kw):
        worker = Worker(settings, **kw)
        thread = threading.Thread(target=worker.run, name=f"worker-{settings.client_id}", daemon=True)
        thread.start()
        running.append((worker, thread))
        assert worker.ready_event.wait(60), "worker got no partition assignment within 60s"
        worker.thread = thread
        return worker

    yield start
    for worker, _ in running:
        worker.request_stop()
    for _, thread in running:
        thread.join(60)
        assert not thread.is_alive(), "worker did not stop within 60s"


@pytest.fixture
def send_records(kafka_bootstrap: str):
    """``send(topic, [(key, value, headers), ...]) -> [(partition, offset), ...]``: raw records,
    acked before returning."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", max_request_size=32 * 1024 * 1024)

    def send(topic: str, records) -> list[tuple[int, int]]:
        futures = [producer.send(topic, key=k, value=v, headers=list(h or [])) for k, v, h in records]
        producer.flush(timeout=60)
        return [(md.partition, md.offset) for md in (f.get(timeout=30) for f in futures)]

    yield send
    producer.close(timeout=10)


@pytest.fixture
def read_records(kafka_bootstrap: str):
    """``read(topics, n, timeout_s=60) -> [ConsumerRecord]``: the raw records of ``topics``
    from the beginning, until ``n`` of them (or the timeout)."""
    from kafka import KafkaConsumer

    def read(topics: list[str], n: int, timeout_s: float = 60.0) -> list:
        consumer = KafkaConsumer(*topics, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                                 enable_auto_commit=False)
        out: list = []
        deadline = _time.monotonic() + timeout_s
        try:
            while len(out) < n and _time.monotonic() < deadline:
                for recs in consumer.poll(timeout_ms=300).values():
                    out.extend(recs)
        finally:
            consumer.close()
        return out

    return read


@pytest.fixture
def read_outputs(kafka_bootstrap: str):
    """``read(topics, expected_inputs, timeout_s=60, bootstrap=None, isolation_level="read_uncommitted")
    -> {topic: [(record, json)]}`` (``read_committed``: what exactly-once readers see).

    Reads from the beginning until the decisions and dead-letter topics together
    name ``expected_inputs`` distinct inputs (then one more poll for stragglers).
    An input is its event id, or ``key:<record key>`` for dead letters without one.
    """
    import json as _json

    from kafka import KafkaConsumer

    def read(topics, expected_inputs: int, timeout_s: float = 60.0, bootstrap: str | None = None,
             isolation_level: str = "read_uncommitted") -> dict:
        names = [topics.decisions, topics.flagged, topics.review, topics.dead_letter]
        consumer = KafkaConsumer(*names, bootstrap_servers=bootstrap or kafka_bootstrap,
                                 auto_offset_reset="earliest", enable_auto_commit=False,
                                 isolation_level=isolation_level)
        out: dict = {n: [] for n in names}
        inputs: set = set()
        deadline = _time.monotonic() + timeout_s
        try:
            extra_polls = 2
            while _time.monotonic() < deadline and extra_polls:
                if len(inputs) >= expected_inputs:
                    extra_polls -= 1
                for recs in consumer.poll(timeout_ms=300).values():
                    for r in recs:
                        v = _json.loads(r.value)
                        out[r.topic].append((r, v))
                        if r.topic in (topics.decisions, topics.dead_letter):
                            inputs.add(input_name(v))
        finally:
            consumer.close()
        return out

    return read


def input_name(value: dict) -> str:
    """The input a decision or dead letter is about: its event id, else its source record key."""
    if value.get("event_id"):
        return value["event_id"]
    return f"key:{value['source']['key']}"


@pytest.fixture
def kafka_offsets(kafka_bootstrap: str):
    """``.committed(group, topic, partitions)`` and ``.end(topic, partitions)``: {partition: offset}."""
    from types import SimpleNamespace

    from kafka import KafkaConsumer, TopicPartition

    def committed(group: str, topic: str, partitions: int) -> dict:
        c = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
        try:
            return {p: c.committed(TopicPartition(topic, p)) for p in range(partitions)}
        finally:
            c.close()

    def end(topic: str, partitions: int) -> dict:
        c = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
        try:
            ends = c.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
            return {tp.partition: off for tp, off in ends.items()}
        finally:
            c.close()

    return SimpleNamespace(committed=committed, end=end)
