"""Decision engine mechanics: scoring independence, bands, roll-up, audit, caches, reload."""

import logging
import time
import uuid

import numpy as np
import pytest

from moderator import metrics
from moderator.decide.embeddings import InProcessCache, RedisEmbeddingCache, cache_key
from moderator.decide.engine import DecisionEngine, ModelInfo, audit_draw, compile_policy
from moderator.decide.policy import parse_policy
from moderator.decide.reload import PolicyWatcher
from moderator.encode import ModelDirectory, TextEncoder

BASE = """
version: "v1"
templates: ["a photo of {}.", "a drawing of {}."]
categories:
  - id: alpha
    label: Alpha
    prompts: ["a red star", "a crimson star"]
    thresholds: {flag: 0.9, escalate: 0.5}
  - id: beta
    label: Beta
    prompts: ["a blue circle"]
    contrast_prompts: ["a green circle", "a blue square"]
    thresholds: {flag: 0.8, escalate: 0.4}
"""
EXTRA = """  - id: gamma
    label: Gamma
    prompts: ["a yellow triangle", "something entirely different"]
    contrast_prompts: ["a purple square"]
    thresholds: {flag: 0.5, escalate: 0.1}
"""


class CountingFactory:
    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return TextEncoder(self.model_dir)


@pytest.fixture(scope="module")
def md(random_model_dir):
    return ModelDirectory(random_model_dir)


def _compile(md, text, cache=None, factory=None):
    return compile_policy(parse_policy(text.encode()), md.model_sha256, md.manifest.logit_scale,
                          factory or CountingFactory(md), cache or InProcessCache())


def _embeddings(md, n=40, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, md.manifest.embed_dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_adding_a_category_changes_no_other_score_or_decision(md):
    x = _embeddings(md)
    before = _compile(md, BASE)
    after = _compile(md, BASE + EXTRA)
    s0, s1 = before.scores(x), after.scores(x)
    np.testing.assert_array_equal(s0, s1[:, :2])
    e0 = DecisionEngine(before, ModelInfo(md.model_sha256, "t"))
    e1 = DecisionEngine(after, ModelInfo(md.model_sha256, "t"))
    ids = [f"e{i}" for i in range(len(x))]
    for d0, d1 in zip(e0.decide(ids, x), e1.decide(ids, x)):
        for c0, c1 in zip(d0.categories, d1.categories[:2]):
            assert (c0.id, c0.score, c0.action) == (c1.id, c1.score, c1.action)


def test_scores_follow_the_documented_rule(md):
    enc = TextEncoder(md)
    from moderator.encode import ensemble_embeddings

    p = _compile(md, BASE)
    x = _embeddings(md, 5)
    tpl = ("a photo of {}.", "a drawing of {}.")
    alpha = ensemble_embeddings(enc, ["a red star", "a crimson star"], tpl)
    np.testing.assert_allclose(p.scores(x)[:, 0], (x @ alpha.T).max(axis=1), atol=1e-5)
    beta = ensemble_embeddings(enc, ["a blue circle", "a green circle", "a blue square"], tpl)
    logits = md.manifest.logit_scale * (x @ beta.T)
    prob = np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1)
    np.testing.assert_allclose(p.scores(x)[:, 1], prob, atol=1e-5)


def _engine_with(md, text):
    return DecisionEngine(_compile(md, text), ModelInfo(md.model_sha256, "arch"))


def test_bands_overall_action_top_category_and_record(md):
    # Thresholds placed around the actual scores of a fixed vector, so every band is hit.
    x = _embeddings(md, 1, seed=3)
    s = _compile(md, BASE).scores(x)[0]
    text = BASE.replace("{flag: 0.9, escalate: 0.5}", f"{{flag: {s[0] - 0.01}, escalate: {s[0] - 0.02}}}")
    text = text.replace("{flag: 0.8, escalate: 0.4}", f"{{flag: {s[1] + 0.01}, escalate: {s[1] - 0.01}}}")
    d = _engine_with(md, text).decide(["evt-1"], x, image_sha256=["ab" * 32], metadata=[{"k": "v"}])[0]
    assert [c.action for c in d.categories] == ["flag", "escalate"]
    assert d.action == "flag" and d.top_category == "alpha"
    assert any(r.startswith("flag:alpha") for r in d.reasons) and any(r.startswith("escalate:beta") for r in d.reasons)
    assert d.policy_version == "v1" and d.model_sha256 == md.model_sha256 and d.model_architecture == "arch"
    assert d.image_sha256 == "ab" * 32 and d.metadata == {"k": "v"} and "score" in d.timings_ms
    text = text.replace(f"{{flag: {s[0] - 0.01}, escalate: {s[0] - 0.02}}}", "{flag: 2, escalate: 1.5}")
    d = _engine_with(md, text).decide(["evt-1"], x)[0]
    assert d.action == "escalate" and d.top_category == "beta"


def test_parent_takes_the_most_severe_child_action(md):
    x = _embeddings(md, 1, seed=4)
    s = _compile(md, BASE).scores(x)[0]
    text = BASE.replace("{flag: 0.9, escalate: 0.5}", "{flag: 2, escalate: 1.5}")
    text = text.replace("{flag: 0.8, escalate: 0.4}", f"{{flag: {s[1] - 0.01}, escalate: {s[1] - 0.02}}}")
    text = text.replace("  - id: beta\n", "  - id: beta\n    parent: alpha\n")
    d = _engine_with(md, text).decide(["e"], x)[0]
    by = {c.id: c for c in d.categories}
    assert by["beta"].action == "flag" and by["alpha"].action == "flag" and by["beta"].parent == "alpha"
    assert "flag:alpha via child category" in d.reasons


def test_disabled_category_is_not_scored(md):
    text = BASE.replace("  - id: beta\n", "  - id: beta\n    enabled: false\n")
    d = _engine_with(md, text).decide(["e"], _embeddings(md, 1))[0]
    assert [c.id for c in d.categories] == ["alpha"]


def test_audit_sampling_is_deterministic_and_near_its_rate(md):
    text = BASE.replace("{flag: 0.9, escalate: 0.5}", "{flag: 2, escalate: 1.5}\n    audit_sample_rate: 0.1")
    text = text.replace("{flag: 0.8, escalate: 0.4}", "{flag: 2, escalate: 1.5}")
    eng = _engine_with(md, text)
    ids = [f"event-{i}" for i in range(2000)]
    x = np.repeat(_embeddings(md, 1), len(ids), axis=0)
    first = eng.decide(ids, x)
    again = eng.decide(ids, x)
    sampled = [d.event_id for d in first if d.action == "escalate"]
    assert sampled == [d.event_id for d in again if d.action == "escalate"]
    assert 150 <= len(sampled) <= 250
    assert all("audit_sample:alpha" in d.reasons for d in first if d.action == "escalate")
    assert all(audit_draw(i, "alpha") < 0.1 for i in sampled)


def test_warm_cache_skips_the_text_encoder(md):
    cache = InProcessCache()
    f1, f2 = CountingFactory(md), CountingFactory(md)
    a = _compile(md, BASE, cache, f1)
    b = _compile(md, BASE, cache, f2)
    assert (f1.calls, f2.calls) == (1, 0)
    assert not a.embeddings.from_cache and b.embeddings.from_cache
    np.testing.assert_array_equal(a.embeddings.matrix, b.embeddings.matrix)
    # A different prompt set (or model) is a different key.
    assert cache_key(md.model_sha256, parse_policy(BASE.encode()).doc) != cache_key(
        md.model_sha256, parse_policy((BASE + EXTRA).encode()).doc)
    assert cache_key("0" * 64, parse_policy(BASE.encode()).doc) != a.embeddings.key


def test_redis_cache_survives_restart_and_outage(md, local_redis, caplog):
    """Second start with a warm Redis never builds the text encoder; Redis dying mid-run
    only costs a local recompute, a metric and one log line per outage."""
    url = local_redis.url
    policy = BASE.replace('version: "v1"', f'version: "{uuid.uuid4()}"').replace(
        "a red star", f"a red star {uuid.uuid4().hex[:6]}")
    f1, f2 = CountingFactory(md), CountingFactory(md)
    first = _compile(md, policy, RedisEmbeddingCache.from_url(url), f1)
    second = _compile(md, policy, RedisEmbeddingCache.from_url(url), f2)  # "a restart": new client
    assert (f1.calls, f2.calls) == (1, 0) and second.embeddings.from_cache
    np.testing.assert_array_equal(first.embeddings.matrix, second.embeddings.matrix)

    local_redis.stop()
    errors_before = metrics.REDIS_ERRORS.labels(op="get")._value.get()
    f3 = CountingFactory(md)
    cache = RedisEmbeddingCache.from_url(url, timeout=0.2)
    with caplog.at_level(logging.ERROR, logger="moderator.decide.embeddings"):
        third = _compile(md, policy, cache, f3)
        fourth = _compile(md, policy, cache, CountingFactory(md))
    assert f3.calls == 1 and not third.embeddings.from_cache
    np.testing.assert_allclose(third.embeddings.matrix, first.embeddings.matrix, atol=1e-6)
    assert metrics.REDIS_ERRORS.labels(op="get")._value.get() >= errors_before + 2
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    eng = DecisionEngine(fourth, ModelInfo(md.model_sha256, "t"))
    assert len(eng.decide(["a", "b"], _embeddings(md, 2))) == 2  # decisions continue

    local_redis.start()  # back, and empty
    assert not cache.client.exists(first.embeddings.key)
    f5 = CountingFactory(md)
    fifth = _compile(md, policy, cache, f5)  # recovers: computes once and stores again
    assert not cache.health.down and f5.calls == 1
    assert cache.client.exists(first.embeddings.key), "embeddings not written back to Redis after it returned"
    np.testing.assert_array_equal(cache.get(first.embeddings.key), fifth.embeddings.matrix)
    sixth = _compile(md, policy, cache, CountingFactory(md))
    assert sixth.embeddings.from_cache


def test_hot_reload_swaps_and_rejects(md, tmp_path, caplog):
    path = tmp_path / "policy.yaml"
    path.write_text(BASE)
    cache = InProcessCache()
    compile_fn = lambda loaded: compile_policy(  # noqa: E731
        loaded, md.model_sha256, md.manifest.logit_scale, CountingFactory(md), cache)
    from moderator.decide.policy import load_policy

    engine = DecisionEngine(compile_fn(load_policy(path)), ModelInfo(md.model_sha256, "t"))
    watcher = PolicyWatcher(path, engine, compile_fn, interval_s=0.05)
    assert watcher.check_once() == "unchanged"
    path.write_text(BASE.replace('"v1"', '"v2"') + EXTRA)
    assert watcher.check_once() == "reloaded"
    assert engine.policy.version == "v2" and len(engine.policy.categories) == 3
    with caplog.at_level(logging.ERROR):
        path.write_text(BASE.replace('"v1"', '"v3"').replace("escalate: 0.5", "escalate: 0.95"))
        assert watcher.check_once() == "rejected"
    assert engine.policy.version == "v2"
    assert any("rejected" in r.getMessage() and "must be <= flag" in r.getMessage() for r in caplog.records)
    # The background thread picks up the next valid edit by itself.
    watcher.start()
    try:
        path.write_text(BASE.replace('"v1"', '"v4"'))
        deadline = time.monotonic() + 10
        while engine.policy.version != "v4" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.policy.version == "v4"
    finally:
        watcher.stop()
