"""The test harness itself: real Kafka and Redis behave, and the launcher's edges hold."""

from __future__ import annotations

import shutil
import time
import uuid
from collections import Counter

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from moderator.devservices import (
    KafkaLibsError,
    LocalRedis,
    ToolNotInstalledError,
    kafka_libs_dir,
    services,
)

N_MESSAGES = 30


def test_keyed_messages_spread_over_partitions_and_arrive_once(kafka_bootstrap, topic_factory):
    topic = topic_factory(3)
    # Raw bytes, no (de)serializer callables: kafka-python 3 deprecates plain
    # functions there in favour of kafka.serializer classes that 2.x lacks.
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        sent = [producer.send(topic, key=f"user-{i}".encode(), value=f"event-{i}".encode())
                for i in range(N_MESSAGES)]
        producer.flush(timeout=30)
        produced_partitions = {future.get(timeout=10).partition for future in sent}
    finally:
        producer.close()
    assert produced_partitions == {0, 1, 2}

    group = f"test-group-{uuid.uuid4().hex[:8]}"
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=group,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    received = []
    try:
        deadline = time.monotonic() + 30
        while len(received) < N_MESSAGES and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend(records)
        # One more poll so a duplicate delivered after the 30th record is seen too.
        for records in consumer.poll(timeout_ms=500).values():
            received.extend(records)
        consumer.commit()
        committed = {p: consumer.committed(TopicPartition(topic, p)) for p in range(3)}
    finally:
        consumer.close()

    counts = Counter(record.value for record in received)
    assert counts == Counter(f"event-{i}".encode() for i in range(N_MESSAGES)), "each message exactly once"
    assert {record.partition for record in received} == {0, 1, 2}
    assert all(record.value == b"event-" + record.key.removeprefix(b"user-") for record in received)
    per_partition = Counter(record.partition for record in received)
    assert committed == {p: per_partition[p] for p in range(3)}, "group committed to the end"


def test_redis_round_trip(redis_url):
    client = redis.Redis.from_url(redis_url)
    key = f"test:{uuid.uuid4().hex}"
    try:
        client.set(key, b"\x00binary\xff", ex=60)
        assert client.get(key) == b"\x00binary\xff"
    finally:
        client.delete(key)
        client.close()


def test_local_redis_stop_and_start_on_same_port(local_redis: LocalRedis):
    url = local_redis.url
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    client.set("k", "v")

    local_redis.stop()
    assert not local_redis.running
    with pytest.raises(redis.ConnectionError):
        client.ping()

    local_redis.start()
    assert local_redis.url == url
    assert client.ping()  # the same client reconnects
    assert client.get("k") is None, "nothing is persisted across restarts"
    client.close()


def test_environment_wins_over_starting_anything(kafka_bootstrap, redis_url, monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("REDIS_URL", redis_url)
    with services() as running:
        assert (running.kafka_bootstrap, running.redis_url) == (kafka_bootstrap, redis_url)
        assert (running.kafka_source, running.redis_source) == ("env", "env")
        assert running.local_kafka is None and running.local_redis is None


def test_missing_redis_server_is_a_clear_error():
    with pytest.raises(ToolNotInstalledError, match="redis-server"):
        LocalRedis(executable="/nonexistent/redis-server").start()


@pytest.mark.skipif(shutil.which("mvn") is None, reason="exercises the Maven path; mvn not installed")
def test_maven_failure_carries_maven_output(tmp_path, monkeypatch):
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    (deploy / "pom.xml").write_text("<project>not a pom</project>")
    monkeypatch.setenv("MODERATOR_KAFKA_DEPLOY_DIR", str(deploy))
    monkeypatch.setenv("MODERATOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MODERATOR_KAFKA_LIBS", raising=False)
    with pytest.raises(KafkaLibsError) as failure:
        kafka_libs_dir()
    message = str(failure.value)
    assert "Maven could not resolve" in message
    assert "[ERROR]" in message  # Maven's own words, not just an exit code


def test_orphaned_workdirs_are_swept_live_ones_kept(tmp_path, monkeypatch):
    from moderator.devservices._process import Workdir

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    live = Workdir("moderator-test-")
    orphan = tmp_path / "moderator-test-orphan"
    orphan.mkdir()
    (orphan / ".owner.lock").touch()  # lock file nobody holds: its owner died

    fresh = Workdir("moderator-test-")
    assert not orphan.exists()
    assert live.path.exists() and fresh.path.exists()
    live.remove()
    fresh.remove()
    assert list(tmp_path.iterdir()) == []
