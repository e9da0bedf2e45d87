"""The demo policy on the demo model: real outcomes, caches across restarts, classify CLI."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moderator import metrics
from moderator.classify import Classifier
from moderator.decide.evaluate import confusion, format_confusion, read_labelled
from moderator.resources import DEMO_POLICY

POLICY = DEMO_POLICY


@pytest.fixture(scope="module")
def classifier(demo_model):
    return Classifier(demo_model.model_dir, POLICY)


@pytest.fixture(scope="module")
def matrix(demo_model, classifier):
    m = confusion(classifier, read_labelled(demo_model.heldout_jsonl))
    print("\n" + format_confusion(m))
    return m


def _share(matrix, labels, actions):
    total = sum(sum(matrix[label].values()) for label in labels)
    hit = sum(matrix[label][a] for label in labels for a in actions)
    return hit / total


def test_flagged_concept_is_flagged(matrix):
    assert _share(matrix, ["red star"], ["flag"]) >= 0.95


def test_near_misses_escalate_as_the_policy_says(matrix):
    # Other red shapes: review-only category -> escalate, never flag.
    near = ["red circle", "red square", "red triangle"]
    assert _share(matrix, near, ["escalate"]) >= 0.9
    assert _share(matrix, near, ["flag"]) <= 0.02


OTHERS = [f"{c} {s}" for c in ("green", "blue", "purple") for s in ("circle", "square", "triangle", "star")]


def test_other_concepts_are_allowed_apart_from_the_audit_sample(matrix):
    assert _share(matrix, OTHERS, ["allow", "audit"]) >= 0.95
    audit = _share(matrix, OTHERS, ["audit"])
    assert 0.01 <= audit <= 0.12  # red_star's audit_sample_rate is 5%, deterministic per event id
    # Stars of other colours are the red star's contrast set: not flagged.
    assert _share(matrix, ["green star", "blue star", "purple star"], ["flag"]) <= 0.02


def test_review_only_cosine_category_escalates(matrix):
    yellow = [f"yellow {s}" for s in ("circle", "square", "triangle", "star")]
    assert _share(matrix, yellow, ["escalate"]) >= 0.95
    assert _share(matrix, yellow, ["flag"]) == 0


def test_second_start_reuses_redis_embeddings(demo_model, redis_url):
    import redis

    from moderator.decide.embeddings import cache_key
    from moderator.decide.policy import load_policy
    from moderator.encode import ModelDirectory

    key = cache_key(ModelDirectory(demo_model.model_dir).model_sha256, load_policy(POLICY).doc)
    client = redis.Redis.from_url(redis_url)
    client.delete(key)  # a cold cache, whatever ran before
    runs_before = metrics.TEXT_ENCODER_RUNS._value.get()
    first = Classifier(demo_model.model_dir, POLICY, redis_url=redis_url)
    runs_after_first = metrics.TEXT_ENCODER_RUNS._value.get()
    assert runs_after_first - runs_before == 1 and not first.engine.policy.embeddings.from_cache
    assert client.exists(key)  # the first start stored what it computed
    second = Classifier(demo_model.model_dir, POLICY, redis_url=redis_url)
    assert metrics.TEXT_ENCODER_RUNS._value.get() == runs_after_first
    assert second.engine.policy.embeddings.from_cache
    np.testing.assert_array_equal(first.engine.policy.embeddings.matrix, second.engine.policy.embeddings.matrix)


def _write_hostile(d: Path) -> dict[str, str | None]:
    """file name -> expected error reason (None: decodes fine)."""
    from moderator.model.synth import draw_sample

    rng = np.random.default_rng(11)
    good = draw_sample(rng, 96, "red", "star").image
    buf = io.BytesIO()
    good.save(buf, "JPEG")
    jpeg = buf.getvalue()
    (d / "red_star.jpg").write_bytes(jpeg)
    (d / "empty.png").write_bytes(b"")
    (d / "notes.png").write_bytes(b"just some text")
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    good.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 50000, dtype=np.uint16)).save(d / "sixteen.png")
    frames = [draw_sample(rng, 64, "blue", "circle").image.convert("P") for _ in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=40)
    exif = Image.Exif()
    exif[0x0112] = 8
    good.save(d / "rotated.jpg", exif=exif.tobytes())
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    (d / "bomb.png").write_bytes(bomb)
    return {"red_star.jpg": None, "empty.png": "empty_image", "notes.png": "not_an_image",
            "truncated.jpg": "truncated_image", "cmyk.jpg": None, "sixteen.png": None,
            "animated.gif": None, "rotated.jpg": None, "bomb.png": "decompression_bomb"}


def test_classify_cli_handles_hostile_files(demo_model, tmp_path):
    expected = _write_hostile(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "moderator.cli", "classify", str(tmp_path), "--model", str(demo_model.model_dir),
         "--policy", str(POLICY), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr  # some files failed, none crashed
    assert "Traceback" not in out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    got = {}
    for r in rows:
        if "error" in r:
            got[Path(r["path"]).name] = r["error"]["reason"]
        else:
            got[Path(r["metadata"]["path"]).name] = None
            assert r["policy_version"] == "demo-1" and len(r["model_sha256"]) == 64
            assert r["image_sha256"] and {c["id"] for c in r["categories"]} >= {"red_star", "red_shapes"}
    assert got == expected
    by_name = {Path(r["metadata"]["path"]).name: r for r in rows if "error" not in r}
    assert by_name["red_star.jpg"]["action"] == "flag"
    assert by_name["red_star.jpg"]["top_category"] == "red_star"


def test_classify_table_output(demo_model, tmp_path):
    from moderator.model.synth import draw_sample

    draw_sample(np.random.default_rng(2), 96, "green", "circle").image.save(tmp_path / "g.png")
    out = subprocess.run(
        [sys.executable, "-m", "moderator.cli", "classify", str(tmp_path / "g.png"), "--model",
         str(demo_model.model_dir), "--policy", str(POLICY)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[0] == "allow"
    assert "policy demo-1" in out.stdout
