"""Image banks, PDQ banks and the shadow policy through the streaming worker, on the real broker.

The trained demo model decides synthetic shapes. A known-bad bank holds one image the
demo policy allows (a banked file sent again, and a resized, re-encoded JPEG copy of it,
are both flagged with ``bank:``); an allow bank holds one image the policy flags (it is
allowed); a ThreatExchange-style PDQ CSV holds the hash of another (its resized JPEG copy
is flagged with ``pdq:``). A shadow policy with a lower threshold runs beside the live one: its records
go to the shadow topic with the disagreements the test predicts from the live scores,
and the live topics are the same as those of a worker without it.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from moderator import metrics
from moderator.produce import OutgoingEvent, encode_image, produce
from moderator.resources import DEMO_POLICY

DEMO_POLICY_PATH = DEMO_POLICY
THRESHOLD = 0.95  # bank cosine threshold in this test
SHADOW_YELLOW_ESCALATE = 0.3  # the live demo policy escalates yellow shapes from 0.8


def _near_duplicate(png: bytes) -> bytes:
    """Resized to 80% and re-encoded as a JPEG at quality 75: what a re-upload looks like."""
    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        small = im.resize((int(im.width * 0.8), int(im.height * 0.8)), Image.BICUBIC)
    return encode_image(small, "JPEG", quality=75)


@pytest.fixture(scope="module")
def case(demo_model, tmp_path_factory):
    """Images picked from the demo domain by what the model itself sees, and the bank files."""
    from moderator.bank_tool import BankBuilder, Source
    from moderator.encode import ImageEncoder
    from moderator.model import synth

    tmp = tmp_path_factory.mktemp("banks")
    rng = np.random.default_rng(4242)
    pool = {label: [encode_image(synth.draw_sample(rng, 96, *label.split(" ", 1)).image) for _ in range(6)]
            for label in ("blue square", "red star", "green circle", "yellow triangle", "purple star")}
    enc = ImageEncoder(demo_model.model_dir)

    def emb(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return enc.encode([im.convert("RGB")])[0]

    # the banned image: allowed by the policy, and its near-duplicate stays well above the threshold
    banned = max(pool["blue square"], key=lambda d: float(emb(d) @ emb(_near_duplicate(d))))
    near = _near_duplicate(banned)
    assert float(emb(banned) @ emb(near)) >= THRESHOLD + 0.02
    trusted = pool["red star"][0]  # the policy flags red stars; this one is allow-listed
    banked = np.stack([emb(banned), emb(trusted)])
    # controls: images no bank item is near (the tiny demo model matches by class, not by instance)
    controls = [d for label in ("green circle", "yellow triangle", "purple star") for d in pool[label]
                if float((banked @ emb(d)).max()) < THRESHOLD - 0.1][:6]
    assert len(controls) >= 4

    # a PDQ bank (ThreatExchange-style CSV) with the hash of one larger image: PDQ needs some detail
    from moderator.decode.pdq import pdq_hash

    def pdq(data: bytes) -> tuple[bytes, int]:
        with Image.open(io.BytesIO(data)) as im:
            return pdq_hash(im.convert("RGB"))

    def bits(a: bytes, b: bytes) -> int:
        return int(np.unpackbits(np.frombuffer(bytes(x ^ y for x, y in zip(a, b)), np.uint8)).sum())

    candidates = [encode_image(synth.draw_sample(rng, 256, "green", "triangle").image) for _ in range(8)]
    scored = [(bits(pdq(d)[0], pdq(_near_duplicate(d))[0]), d) for d in candidates if pdq(d)[1] >= 60]
    distance, hashed = min(scored, key=lambda t: t[0])
    assert distance <= 20
    (tmp / "threatexchange.csv").write_text(f"pdq_hash,id,label\n{pdq(hashed)[0].hex()},te-9001,weapons\n")
    controls = [d for d in controls if bits(pdq(d)[0], pdq(hashed)[0]) > 64]
    assert len(controls) >= 4

    files = {}
    for name, data in (("banned", banned), ("trusted", trusted)):
        files[name] = tmp / f"{name}.png"
        files[name].write_bytes(data)
    builder = BankBuilder(demo_model.model_dir, progress=False)
    builder.build(tmp / "known-bad.npz", "known_bad", [Source(files["banned"], "case-17", "weapons", "test")])
    builder.build(tmp / "trusted.npz", "trusted", [Source(files["trusted"], "brand-logo-3", "logo", "test")])

    doc = yaml.safe_load(DEMO_POLICY_PATH.read_text())
    doc["version"] = "demo-banks"
    doc["banks"] = [
        {"name": "known_bad", "path": "known-bad.npz", "kind": "known_bad", "threshold": THRESHOLD,
         "action": "flag"},
        {"name": "trusted", "path": "trusted.npz", "kind": "allow", "threshold": THRESHOLD},
    ]
    doc["pdq_banks"] = [{"name": "threatexchange", "path": "threatexchange.csv", "max_distance": 31}]
    (tmp / "policy.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    shadow = yaml.safe_load(DEMO_POLICY_PATH.read_text())
    shadow["version"] = "demo-shadow"
    for c in shadow["categories"]:
        if c["id"] == "yellow_shapes":
            c["thresholds"]["escalate"] = SHADOW_YELLOW_ESCALATE
    (tmp / "shadow.yaml").write_text(yaml.safe_dump(shadow, sort_keys=False))
    return {"dir": tmp, "banned": banned, "near": near, "trusted": trusted, "controls": controls,
            "pool": pool, "pdq_near": _near_duplicate(hashed), "pdq_distance": bits(pdq(hashed)[0],
                                                                                      pdq(_near_duplicate(hashed))[0])}


@pytest.mark.slow
def test_banked_near_duplicate_and_allow_listed_images(
        case, demo_model, stream_topics, worker_settings, start_worker, read_outputs, kafka_bootstrap):
    topics = stream_topics(2)
    start_worker(worker_settings(demo_model.model_dir, topics, policy=case["dir"] / "policy.yaml", max_batch=8))
    before = {a: metrics.BANK_MATCHES.labels(bank=b, action=a, applied="true")._value.get()
              for b, a in (("known_bad", "flag"), ("trusted", "allow"))}
    events = [OutgoingEvent("banned-exact", "bank", image=case["banned"]),
              OutgoingEvent("banned-near", "bank", image=case["near"]),
              OutgoingEvent("trusted-exact", "allow", image=case["trusted"]),
              OutgoingEvent("pdq-near", "pdq", image=case["pdq_near"]),
              *[OutgoingEvent(f"control-{i}", "control", image=d) for i, d in enumerate(case["controls"])]]
    produce(kafka_bootstrap, topics.input, events)
    out = read_outputs(topics, len(events), timeout_s=120)
    got = {v["event_id"]: v for _, v in out[topics.decisions]}
    assert set(got) == {e.id for e in events} and out[topics.dead_letter] == []

    for eid, by_sha in (("banned-exact", True), ("banned-near", False)):
        d = got[eid]
        assert d["action"] == "flag", d
        assert d["categories"] and all(c["action"] == "allow" for c in d["categories"])  # the bank flagged it
        (m,) = d["bank_matches"]
        assert (m["bank"], m["kind"], m["item_id"], m["applied"], m["by_sha256"]) == (
            "known_bad", "known_bad", "case-17", True, by_sha)
        assert m["similarity"] >= THRESHOLD
        assert any(r.startswith("bank:known_bad flag item case-17") for r in d["reasons"])
    assert got["banned-exact"]["bank_matches"][0]["similarity"] > 0.999  # the stored embedding itself
    t = got["trusted-exact"]
    assert t["action"] == "allow" and any(c["id"] == "red_star" and c["action"] == "flag" for c in t["categories"])
    assert t["bank_matches"][0]["item_id"] == "brand-logo-3" and t["bank_matches"][0]["applied"]
    assert any(r.startswith("allow_bank:trusted flag -> allow item brand-logo-3") for r in t["reasons"])
    for i in range(len(case["controls"])):
        assert got[f"control-{i}"]["bank_matches"] == []
        assert got[f"control-{i}"]["timings_ms"]["pdq"] >= 0  # every image is PDQ-hashed under this policy
    p = got["pdq-near"]
    assert p["action"] == "flag", p
    (m,) = p["bank_matches"]
    assert (m["bank"], m["method"], m["item_id"], m["label"], m["applied"]) == (
        "threatexchange", "pdq", "te-9001", "weapons", True)
    assert m["distance"] <= 31
    assert any(r.startswith("pdq:threatexchange flag item te-9001 distance") for r in p["reasons"])
    flagged = sorted(v["event_id"] for _, v in out[topics.flagged])
    assert flagged == ["banned-exact", "banned-near", "pdq-near"]
    assert metrics.BANK_MATCHES.labels(bank="known_bad", action="flag", applied="true")._value.get() == \
        before["flag"] + 2
    assert metrics.BANK_MATCHES.labels(bank="trusted", action="allow", applied="true")._value.get() == \
        before["allow"] + 1


def _volatile_free(v: dict) -> dict:
    """A live decision without what differs between any two runs: the clock fields, and the last
    printed digit of scores (a float32 product's last bit depends on the batch's BLAS kernel, and
    two workers batch differently), so scores are compared to 5 places and reasons without numbers."""
    import re

    out = {k: x for k, x in v.items() if k not in ("decided_at", "timings_ms", "categories", "reasons")}
    out["categories"] = [{**c, "score": None} for c in v["categories"]]
    out["reasons"] = [re.sub(r"\d+\.\d+", "#", r) for r in v["reasons"]]
    out["scores"] = [c["score"] for c in v["categories"]]
    return out


def _same_live_records(a: list, b: list) -> None:
    """The same (key, headers, decision) records on a live topic of both workers, as sets (under
    load a rebalance may legitimately replay a record in either run)."""
    def index(records):
        out = {}
        for r, v in records:
            d = _volatile_free(v)
            scores = d.pop("scores")
            out.setdefault((r.key, tuple(sorted(r.headers)), json.dumps(d, sort_keys=True)), scores)
        return out

    ia, ib = index(a), index(b)
    assert set(ia) == set(ib)
    for k, scores in ia.items():
        assert scores == pytest.approx(ib[k], abs=1.5e-6), k[0]


@pytest.mark.slow
def test_shadow_policy_decides_beside_the_live_one_and_changes_nothing_live(
        case, demo_model, stream_topics, topic_factory, worker_settings, start_worker, read_outputs,
        kafka_bootstrap, read_records):
    from moderator.decide.policy import load_policy

    plain_topics, shadowed_topics = stream_topics(2), stream_topics(2)
    shadowed_topics.input = plain_topics.input  # both workers read the same input (two groups)
    shadow_topic = topic_factory(1, suffix="shadow")
    start_worker(worker_settings(demo_model.model_dir, plain_topics, max_batch=8))
    shadow_worker = start_worker(worker_settings(
        demo_model.model_dir, shadowed_topics, max_batch=8, shadow_policy=case["dir"] / "shadow.yaml",
        shadow_decisions_topic=shadow_topic))
    assert shadow_worker.shadow_engine.policy.version == "demo-shadow"
    yellow = ("yellow_shapes", "allow", "escalate")
    before = metrics.SHADOW_DISAGREEMENTS.labels(category=yellow[0], live=yellow[1], shadow=yellow[2])._value.get()
    before_overall = Counter({k: metrics.SHADOW_DISAGREEMENTS.labels(category="_overall", live=k[0], shadow=k[1])
                              ._value.get() for k in (("allow", "escalate"),)})
    images = [d for ds in case["pool"].values() for d in ds]
    events = [OutgoingEvent(f"sh-{i}", "any", image=d) for i, d in enumerate(images)]
    produce(kafka_bootstrap, plain_topics.input, events)
    plain = read_outputs(plain_topics, len(events), timeout_s=120)
    live = read_outputs(shadowed_topics, len(events), timeout_s=120)
    shadow_records = read_records([shadow_topic], len(events))

    # live topics: the same records as without a shadow policy (keys, headers, values but the clock)
    for name in ("decisions", "flagged", "review", "dead_letter"):
        _same_live_records(plain[getattr(plain_topics, name)], live[getattr(shadowed_topics, name)])
    assert all(not v["shadow"] for _, v in live[shadowed_topics.decisions])

    # the shadow topic: one record per decision, marked, by the shadow policy
    sh = {r.key.decode(): (r, json.loads(r.value)) for r in shadow_records}
    assert len(shadow_records) >= len(events) and set(sh) == {e.id for e in events}
    shadow_doc = load_policy(case["dir"] / "shadow.yaml")
    live_by_id = {v["event_id"]: v for _, v in live[shadowed_topics.decisions]}
    expected_disagreements = 0
    for r in shadow_records:  # one disagreement check per shadow decision made (replays included)
        s = json.loads(r.value)
        v = live_by_id[s["event_id"]]
        assert s["shadow"] is True and s["policy_version"] == "demo-shadow"
        assert s["policy_sha256"] == shadow_doc.sha256
        assert dict((k, x.decode()) for k, x in r.headers)["moderator-shadow"] == "true"
        live_yellow = next(c for c in v["categories"] if c["id"] == "yellow_shapes")
        shadow_yellow = next(c for c in s["categories"] if c["id"] == "yellow_shapes")
        assert shadow_yellow["score"] == live_yellow["score"]  # the same embedding, the same prompts
        want = "escalate" if live_yellow["score"] >= SHADOW_YELLOW_ESCALATE else "allow"
        assert shadow_yellow["action"] == want
        expected_disagreements += (live_yellow["action"], want) == ("allow", "escalate")
        for c_live, c_sh in zip(v["categories"], s["categories"]):
            if c_live["id"] != "yellow_shapes":
                assert c_live["action"] == c_sh["action"]
    assert expected_disagreements >= 3, "the lower threshold must change some decisions in this set"
    got = metrics.SHADOW_DISAGREEMENTS.labels(category=yellow[0], live=yellow[1], shadow=yellow[2])._value.get()
    assert got - before == expected_disagreements
    overall = metrics.SHADOW_DISAGREEMENTS.labels(category="_overall", live="allow", shadow="escalate")._value.get()
    assert overall - before_overall[("allow", "escalate")] >= 1
    # the shadow decisions are nowhere on the live topics
    live_ids = {v["event_id"] for _, v in live[shadowed_topics.review]}
    plain_ids = {v["event_id"] for _, v in plain[plain_topics.review]}
    assert live_ids == plain_ids and all(not v["shadow"] for _, v in live[shadowed_topics.review])


@pytest.mark.slow
def test_a_failing_shadow_topic_never_touches_the_live_path(
        random_model_dir, stream_topics, topic_factory, worker_settings, start_worker, read_outputs,
        kafka_bootstrap, kafka_offsets, tmp_path, read_records):
    """Every shadow record is refused by the broker (the topic takes 200-byte records at most):
    the live decisions, their routing and the committed offsets are as if there were no shadow."""
    topics = stream_topics(1)
    tiny = topic_factory(1, suffix="shadow-tiny", configs={"max.message.bytes": "200"})
    (tmp_path / "shadow.yaml").write_text(DEMO_POLICY_PATH.read_text().replace('version: "demo-1"',
                                                                               'version: "demo-shadow"'))
    settings = worker_settings(random_model_dir, topics, max_batch=8, shadow_policy=tmp_path / "shadow.yaml",
                               shadow_decisions_topic=tiny)
    before = metrics.SHADOW_ERRORS.labels(stage="publish")._value.get()
    worker = start_worker(settings)
    from moderator.produce import synthetic_events

    events = list(synthetic_events(40, seed=77, size=48, id_prefix="iso"))
    produce(kafka_bootstrap, topics.input, events)
    out = read_outputs(topics, len(events))
    got = {v["event_id"] for _, v in out[topics.decisions]}
    assert got == {e.id for e in events} and out[topics.dead_letter] == []
    deadline = time.monotonic() + 30
    while metrics.SHADOW_ERRORS.labels(stage="publish")._value.get() - before < len(events):
        assert time.monotonic() < deadline, "the shadow sends should all have failed by now"
        time.sleep(0.2)
    while kafka_offsets.committed(settings.consumer_group, topics.input, 1).get(0) != len(events):
        assert time.monotonic() < deadline + 30, "offsets must commit as without a shadow policy"
        time.sleep(0.2)
    assert worker._fatal is None and worker._health()[0]
    assert read_records([tiny], 1, timeout_s=3) == []
