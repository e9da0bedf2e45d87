"""Redis with TLS (``rediss://``, a CA made at test time) and an ACL user whose password is
not URL-safe, given as its own setting: a worker's prompt-embedding and image-embedding
caches both work through it (entries written, then hit), and a wrong password or an
untrusted CA ends the worker's start with a named error instead of a silent cache outage."""

from __future__ import annotations

import time

import pytest
import redis
from pydantic import ValidationError

from moderator import metrics
from moderator.config import WorkerSettings
from moderator.devservices.redis import LocalRedis
from moderator.errors import ServiceAccessError
from moderator.produce import produce, synthetic_events
from moderator.worker import Worker

PASSWORD = "p@ss/w:rd#%?&=ok"  # would need escaping in a redis:// URL


@pytest.fixture(scope="module")
def secured_redis():
    with LocalRedis(tls=True, users={"svc-moderator": PASSWORD}) as server:
        yield server


def _settings_from_env(server: LocalRedis, **overrides) -> dict:
    env = server.settings_env(**overrides)
    assert env["MODERATOR_REDIS_URL"].startswith("rediss://") and env["MODERATOR_REDIS_PASSWORD"] == \
        overrides.get("password", PASSWORD)
    return {k.removeprefix("MODERATOR_").lower(): v for k, v in env.items()}


def _hits() -> float:
    return metrics.IMAGE_EMBEDDING_CACHE.labels(result="hit")._value.get()


def test_both_caches_over_tls_with_an_acl_user(secured_redis, random_model_dir, stream_topics, worker_settings,
                                               start_worker, read_outputs, kafka_bootstrap):
    admin = redis.Redis.from_url(secured_redis.url, **secured_redis.client_options("admin"))
    anonymous = redis.Redis.from_url(secured_redis.url, ssl_ca_certs=str(secured_redis.pki.ca_cert))
    with pytest.raises(redis.AuthenticationError):  # the default user is off: no way in without a login
        anonymous.ping()
    topics = stream_topics(2)
    settings = worker_settings(random_model_dir, topics, **_settings_from_env(secured_redis), max_batch=8,
                               redis_timeout_s=2.0)  # a TLS handshake on a busy 2-core machine
    assert settings.redis_options()["password"] == PASSWORD
    worker = start_worker(settings)

    policy_keys = admin.keys("moderator:policy-embeddings:v1:*")
    assert len(policy_keys) == 1, "the policy's prompt embeddings were not written through TLS + AUTH"

    first = list(synthetic_events(16, seed=7, size=64, id_prefix="tls1"))
    produce(kafka_bootstrap, topics.input, first)
    read_outputs(topics, len(first))
    image_keys = admin.keys("moderator:image-embedding:v1:*")
    assert 1 <= len(image_keys) <= len(first)  # one per distinct image content
    assert all(admin.ttl(k) > 0 for k in image_keys)

    hits = _hits()
    again = [type(e)(**{**vars(e), "id": e.id.replace("tls1-", "tls2-")}) for e in first]
    produce(kafka_bootstrap, topics.input, again)
    read_outputs(topics, len(first) + len(again))
    assert _hits() - hits >= len(again), "the second round was not served from the TLS Redis"
    assert worker.embedding_cache.health.down is False

    # A second worker compiles the same policy: its prompt embeddings come from Redis.
    second = Worker(worker_settings(random_model_dir, topics, **_settings_from_env(secured_redis)))
    assert second.engine.policy.embeddings.from_cache


@pytest.mark.parametrize("wrong", ["password", "ca"])
def test_a_wrong_password_or_ca_ends_the_start_with_a_named_error(wrong, secured_redis, random_model_dir,
                                                                   stream_topics, worker_settings):
    overrides = {"password": "not-it"} if wrong == "password" else {"cafile": secured_redis.pki.other_ca()}
    settings = worker_settings(random_model_dir, stream_topics(1), **_settings_from_env(secured_redis, **overrides))
    started = time.monotonic()
    with pytest.raises(ServiceAccessError) as info:
        Worker(settings)
    assert time.monotonic() - started < 10
    if wrong == "password":
        assert info.value.reason == "redis_auth_failed" and "'svc-moderator'" in str(info.value)
        assert "not-it" not in str(info.value) and PASSWORD not in str(info.value)
    else:
        assert info.value.reason == "redis_tls_untrusted" and "MODERATOR_REDIS_SSL_CA_FILE" in str(info.value)


def test_an_unreachable_redis_is_not_fatal_at_start(random_model_dir, stream_topics, worker_settings):
    server = LocalRedis(tls=True, users={"svc-moderator": PASSWORD}).start()
    env = _settings_from_env(server)
    server.close()  # gone: an outage, not a misconfiguration; the worker serves without it
    worker = Worker(worker_settings(random_model_dir, stream_topics(1), **env))
    assert worker.embedding_cache is not None


def test_redis_settings_are_checked():
    with pytest.raises(ValidationError, match="need a rediss:// redis_url"):
        WorkerSettings(redis_url="redis://h:6379/0", redis_ssl_ca_file="/ca.pem")
    with pytest.raises(ValidationError, match="give it in one place"):
        WorkerSettings(redis_url="redis://:inurl@h:6379/0", redis_password="separate")
    with pytest.raises(ValidationError, match="give it in one place"):
        WorkerSettings(redis_url="redis://alice@h:6379/0", redis_username="bob")
    with pytest.raises(ValidationError) as info:  # errors never echo the values: they may be secrets
        WorkerSettings(redis_url="redis://:inurl-secret@h:6379/0", redis_password="other-secret")
    assert "secret" not in str(info.value)
    with pytest.raises(ValidationError, match="go together"):
        WorkerSettings(redis_url="rediss://h:6379/0", redis_ssl_certfile="/c.pem")
    s = WorkerSettings(redis_url="rediss://h:6379/0", redis_username="u", redis_password="a b@c/d",
                       redis_ssl_ca_file="/ca.pem")
    assert s.redis_options() == {"username": "u", "password": "a b@c/d", "ssl_ca_certs": "/ca.pem"}
    assert "a b@c/d" not in repr(s)
