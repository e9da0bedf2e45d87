"""Image banks: the file format and its bad-input errors, the decision rules, hot reload, the CLI."""

import json
import logging
import shutil

import numpy as np
import pytest

from moderator import metrics
from moderator.cli import main
from moderator.decide.banks import BankLoader, read_bank, write_bank
from moderator.decide.embeddings import InProcessCache
from moderator.decide.engine import DecisionEngine, ModelInfo, compile_policy
from moderator.decide.policy import load_policy, parse_policy
from moderator.decide.reload import PolicyWatcher
from moderator.encode import ModelDirectory, TextEncoder
from moderator.errors import BankError, PolicyError
from moderator.schemas import BankItem, BankManifest

POLICY = """
version: "b1"
templates: ["a photo of {}."]
categories:
  - id: alpha
    label: Alpha
    prompts: ["a red star"]
    thresholds: {flag: 0.99, escalate: 0.98}
  - id: beta
    label: Beta
    prompts: ["a blue circle"]
    thresholds: {flag: 0.99, escalate: 0.98}
    never_overridable: true
banks:
  - {name: bad, path: bad.npz, kind: known_bad, threshold: 0.9, action: flag}
  - {name: good, path: good.npz, kind: allow, threshold: 0.9}
"""


@pytest.fixture(scope="module")
def md(random_model_dir):
    return ModelDirectory(random_model_dir)


def _unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _manifest(md, name, n):
    return BankManifest(name=name, model_sha256=md.model_sha256, model_architecture="t",
                        embed_dim=md.manifest.embed_dim, count=n, created_at="2026-01-01T00:00:00+00:00",
                        updated_at="2026-01-01T00:00:00+00:00")


def _write(md, path, name, emb, shas=None):
    items = [BankItem(id=f"{name}-{i}", label="case", added_at="2026-01-01T00:00:00+00:00",
                      sha256=(shas or {}).get(i)) for i in range(len(emb))]
    return write_bank(path, _manifest(md, name, len(emb)), items, emb)


def _compile(md, folder, text=POLICY):
    (folder / "policy.yaml").write_text(text)
    return compile_policy(load_policy(folder / "policy.yaml"), md.model_sha256, md.manifest.logit_scale,
                          lambda: TextEncoder(md), InProcessCache(), embed_dim=md.manifest.embed_dim)


def test_round_trip_and_exact_best_match(md, tmp_path):
    rng = np.random.default_rng(0)
    emb = _unit(rng, 300, md.manifest.embed_dim)
    _write(md, tmp_path / "b.npz", "bad", emb, {5: "a" * 64})
    bank = read_bank(tmp_path / "b.npz")
    assert len(bank) == 300 and bank.manifest.count == 300 and bank.by_sha256 == {"a" * 64: 5}
    np.testing.assert_allclose(bank.embeddings, emb, atol=1e-6)
    rows, sims = bank.best(emb[[7, 123, 299]])
    assert rows.tolist() == [7, 123, 299] and np.allclose(sims, 1.0, atol=1e-5)
    # no temporary files left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["b.npz"]


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "corrupt or truncated"),
    (lambda p: p.write_bytes(b"not a zip at all"), "not a moderator bank file"),
    (lambda p: p.write_bytes(b""), "not a moderator bank file"),
    (lambda p: np.save(open(p, "wb"), np.zeros((2, 4), np.float32)), "not a moderator bank file"),  # a bare .npy
    (lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 40), "corrupt or truncated"),
    (lambda p: p.unlink(), "cannot read bank file"),
    (lambda p: np.savez(p, embeddings=np.zeros((1, 4), np.float32)), "no 'manifest' array"),
])
def test_damaged_files_are_named_errors(md, tmp_path, damage, message):
    path = _write(md, tmp_path / "b.npz", "bad", _unit(np.random.default_rng(1), 3, md.manifest.embed_dim))
    damage(path)
    with pytest.raises(BankError, match=message) as e:
        read_bank(path)
    assert str(path) in str(e.value)


def test_bad_item_lines_are_named_by_line(md, tmp_path):
    path = tmp_path / "b.npz"
    man = _manifest(md, "bad", 2).model_dump_json().encode()
    items = b'{"id": "x", "added_at": "t"}\n{"id": "", "added_at": "t"}\n'
    np.savez(path, embeddings=np.ones((2, md.manifest.embed_dim), np.float32),
             manifest=np.frombuffer(man, np.uint8), items=np.frombuffer(items, np.uint8))
    with pytest.raises(BankError, match=r"items line 2: id: String should have at least 1 character"):
        read_bank(path)
    items = b'{"id": "x", "added_at": "t"}\n{"id": "x", "added_at": "t"}\n'
    np.savez(path, embeddings=np.ones((2, md.manifest.embed_dim), np.float32),
             manifest=np.frombuffer(man, np.uint8), items=np.frombuffer(items, np.uint8))
    with pytest.raises(BankError, match=r"item id 'x' appears twice"):
        read_bank(path)


def test_a_bank_for_another_model_or_name_is_refused(md, tmp_path):
    emb = _unit(np.random.default_rng(2), 2, md.manifest.embed_dim)
    write_bank(tmp_path / "bad.npz", _manifest(md, "bad", 2).model_copy(update={"model_sha256": "f" * 64}),
               [BankItem(id=str(i), added_at="t") for i in range(2)], emb)
    _write(md, tmp_path / "good.npz", "good", emb)
    with pytest.raises(BankError, match=r"built for model ffffffffffff .*not for the model in use"):
        _compile(md, tmp_path)
    _write(md, tmp_path / "bad.npz", "other", emb)
    with pytest.raises(BankError, match="the policy calls this bank 'bad' but the file holds bank 'other'"):
        _compile(md, tmp_path)


def test_policy_schema_for_banks():
    with pytest.raises(PolicyError, match="action applies to known_bad banks only"):
        parse_policy(POLICY.replace("kind: allow, threshold: 0.9", "kind: allow, threshold: 0.9, action: flag")
                     .encode())
    with pytest.raises(PolicyError, match="duplicate bank names"):
        parse_policy(POLICY.replace("name: good", "name: bad").encode())


@pytest.fixture
def banked(md, tmp_path):
    rng = np.random.default_rng(3)
    dim = md.manifest.embed_dim
    bad, good, other = _unit(rng, 4, dim), _unit(rng, 4, dim), _unit(rng, 4, dim)
    _write(md, tmp_path / "bad.npz", "bad", bad, {0: "b" * 64})
    _write(md, tmp_path / "good.npz", "good", good)
    policy = _compile(md, tmp_path)
    return policy, bad, good, other


def _decide(policy, x, shas=None):
    return DecisionEngine(policy, ModelInfo("m", "t")).decide([f"e{i}" for i in range(len(x))], x,
                                                             image_sha256=shas)


def _forced(policy, x, category, action):
    """Decisions as if ``category`` scored into ``action`` (thresholds moved below its score)."""
    import dataclasses

    cats = []
    for cc in policy.categories:
        if cc.cat.id == category:
            th = {"flag": {"flag": -1.0, "escalate": -1.0}, "escalate": {"flag": 2.0, "escalate": -1.0}}[action]
            cc = dataclasses.replace(cc, cat=cc.cat.model_copy(update={"thresholds": cc.cat.thresholds.model_copy(
                update=th)}))
        cats.append(cc)
    return dataclasses.replace(policy, categories=tuple(cats))


def test_known_bad_flags_with_the_item_and_similarity(banked):
    policy, bad, _, other = banked
    before = metrics.BANK_MATCHES.labels(bank="bad", action="flag", applied="true")._value.get()
    x = np.stack([bad[2] * 0.98 + other[0] * 0.05, other[1]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d, miss = _decide(policy, x)
    assert d.action == "flag" and miss.action == "allow" and miss.bank_matches == []
    assert d.categories[0].action == "allow"  # the scores are untouched; the bank decided
    (m,) = d.bank_matches
    assert (m.bank, m.kind, m.item_id, m.applied, m.by_sha256) == ("bad", "known_bad", "bad-2", True, False)
    assert m.similarity >= 0.9
    assert any(r.startswith("bank:bad flag item bad-2 similarity") for r in d.reasons)
    assert metrics.BANK_MATCHES.labels(bank="bad", action="flag", applied="true")._value.get() == before + 1


def test_sha256_match_counts_whatever_the_similarity(banked):
    policy, bad, _, other = banked
    (d,) = _decide(policy, other[:1], ["b" * 64])
    assert d.action == "flag" and d.bank_matches[0].by_sha256 and d.bank_matches[0].item_id == "bad-0"
    assert "(same file, sha256)" in d.reasons[-1]
    np.testing.assert_allclose(policy.bank_embedding("b" * 64), bad[0], atol=1e-6)
    assert policy.bank_embedding("c" * 64) is None


def test_allow_bank_overrides_flags_except_never_overridable(banked):
    policy, bad, good, _ = banked
    flagged_alpha = _forced(policy, good[:1], "alpha", "flag")
    (d,) = _decide(flagged_alpha, good[:1])
    assert d.action == "allow" and d.categories[0].action == "flag"
    assert d.bank_matches[0].kind == "allow" and d.bank_matches[0].applied
    assert any(r.startswith("allow_bank:good flag -> allow item good-0") for r in d.reasons)
    # beta is never_overridable: its escalate stands
    (d,) = _decide(_forced(policy, good[1:2], "beta", "escalate"), good[1:2])
    assert d.action == "escalate" and not d.bank_matches[0].applied
    assert any("allow_bank:good not applied: never_overridable beta" in r for r in d.reasons)
    # a known-bad match beats an allow match
    both = (bad[3] + good[3]) / np.linalg.norm(bad[3] + good[3])
    two = _forced(policy, both[None], "alpha", "flag")
    two = type(two)(**{**two.__dict__, "banks": tuple(
        type(cb)(cb.ref.model_copy(update={"threshold": 0.6}), cb.bank) for cb in two.banks)})
    (d,) = _decide(two, both[None])
    assert d.action == "flag"
    assert {(m.bank, m.applied) for m in d.bank_matches} == {("bad", True), ("good", False)}


def test_allow_listed_images_are_not_audit_sampled(md, tmp_path):
    rng = np.random.default_rng(4)
    good = _unit(rng, 64, md.manifest.embed_dim)
    _write(md, tmp_path / "good.npz", "good", good)
    _write(md, tmp_path / "bad.npz", "bad", _unit(rng, 1, md.manifest.embed_dim))
    policy = _compile(md, tmp_path, POLICY.replace("never_overridable: true", "audit_sample_rate: 1.0"))
    decisions = _decide(policy, good)
    assert all(d.action == "allow" and not any(r.startswith("audit_sample") for r in d.reasons) for d in decisions)
    decisions = _decide(policy, _unit(rng, 4, md.manifest.embed_dim))
    assert all(d.action == "escalate" for d in decisions)  # not banked: sampled as before


def test_bank_files_hot_reload_and_a_bad_one_keeps_the_old(md, tmp_path, caplog):
    rng = np.random.default_rng(5)
    dim = md.manifest.embed_dim
    first, second = _unit(rng, 2, dim), _unit(rng, 2, dim)
    _write(md, tmp_path / "bad.npz", "bad", first)
    _write(md, tmp_path / "good.npz", "good", _unit(rng, 1, dim))
    loader = BankLoader()

    def compile_fn(loaded):
        return compile_policy(loaded, md.model_sha256, md.manifest.logit_scale, lambda: TextEncoder(md),
                              InProcessCache(), embed_dim=dim, banks=loader)

    (tmp_path / "policy.yaml").write_text(POLICY)
    engine = DecisionEngine(compile_fn(load_policy(tmp_path / "policy.yaml")), ModelInfo("m", "t"))
    watcher = PolicyWatcher(tmp_path / "policy.yaml", engine, compile_fn, interval_s=0.05)
    assert watcher.check_once() == "unchanged"
    _write(md, tmp_path / "bad.npz", "bad", np.concatenate([first, second]))  # policy file untouched
    assert watcher.check_once() == "reloaded"
    assert len(engine.policy.banks[0].bank) == 4
    assert watcher.check_once() == "unchanged"
    with caplog.at_level(logging.ERROR):
        (tmp_path / "bad.npz").write_bytes(b"garbage")
        assert watcher.check_once() == "rejected"
    assert len(engine.policy.banks[0].bank) == 4  # the old bank stays in force
    assert any("bad.npz" in r.getMessage() and "not a moderator bank file" in r.getMessage() for r in caplog.records)
    # a policy naming a missing bank is retried once the file appears
    (tmp_path / "policy.yaml").write_text(POLICY.replace("bad.npz", "later.npz").replace('"b1"', '"b2"'))
    assert watcher.check_once() == "rejected"
    assert watcher.check_once() == "unchanged"
    _write(md, tmp_path / "later.npz", "bad", first)
    assert watcher.check_once() == "reloaded" and engine.policy.version == "b2"


# --- the CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from moderator.model.synth import write_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, 12, seed=7, split="heldout")
    return out


def test_cli_build_add_remove_list_info(md, shapes, tmp_path, capsys):
    imgs = sorted((shapes / "heldout").iterdir())
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in imgs[:5]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    bank = tmp_path / "known-bad.npz"
    rc = main(["bank", "build", str(bank), str(folder), "--model-dir", str(md.path), "--label", "csam-case-1",
               "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1  # one input failed; the others are banked
    assert out["count"] == 5 and [f["id"] for f in out["failed"]] == ["broken.png"]
    b = read_bank(bank)
    assert b.name == "known_bad" and {i.label for i in b.items} == {"csam-case-1"}
    assert all(i.sha256 and len(i.sha256) == 64 for i in b.items)

    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("\n".join(json.dumps({"path": str(p), "id": f"case-{i}", "label": "weapons"})
                               for i, p in enumerate(imgs[5:8])) + "\n")
    assert main(["bank", "add", str(bank), "--jsonl", str(jsonl), "--model-dir", str(md.path)]) == 0
    assert "3 added; 8 items" in capsys.readouterr().out
    assert main(["bank", "add", str(bank), "--jsonl", str(jsonl), "--model-dir", str(md.path), "--json"]) == 1
    assert {f["reason"] for f in json.loads(capsys.readouterr().out)["failed"]} == {"duplicate_id"}
    assert main(["bank", "remove", str(bank), "case-1"]) == 0
    capsys.readouterr()
    assert main(["bank", "list", str(bank), "--json"]) == 0
    ids = [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]
    assert len(ids) == 7 and "case-1" not in ids and "case-2" in ids
    assert main(["bank", "info", str(bank), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 7 and info["model_sha256"] == md.model_sha256 and info["labels"]["weapons"] == 2
    # every embedding is what the encoder gives for that file
    from moderator.encode import ImageEncoder
    from PIL import Image

    with Image.open(folder / imgs[0].name) as im:
        e = ImageEncoder(md).encode([im.convert("RGB")])[0]
    np.testing.assert_allclose(read_bank(bank).embeddings[0], e, atol=1e-5)


def test_cli_bad_inputs_are_one_line_errors(md, shapes, tmp_path, capsys):
    bank = tmp_path / "b.npz"
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"path": "a.jpg"}\n{"path": \n')
    assert main(["bank", "build", str(bank), "--jsonl", str(jsonl), "--model-dir", str(md.path)]) == 2
    err = capsys.readouterr().err
    assert f"{jsonl}: line 2: not JSON" in err and "Traceback" not in err
    jsonl.write_text('{"id": "x"}\n')
    assert main(["bank", "build", str(bank), "--jsonl", str(jsonl), "--model-dir", str(md.path)]) == 2
    assert f"{jsonl}:1: each line needs a \"path\"" in capsys.readouterr().err
    bank.write_bytes(b"PK\x03\x04 truncated")
    assert main(["bank", "info", str(bank)]) == 2
    assert "[bank_invalid]" in capsys.readouterr().err
    np.save(open(bank, "wb"), np.zeros((2, 4), np.float32))  # a bare .npy is refused, not a traceback
    assert main(["bank", "list", str(bank)]) == 2
    assert "not a moderator bank file" in capsys.readouterr().err
    assert main(["bank", "remove", str(tmp_path / "missing.npz"), "x"]) == 2
    assert "cannot read bank file" in capsys.readouterr().err


def test_bench_finds_planted_copies():
    from moderator.decide.bank_bench import bench_matching

    (row,) = bench_matching([2_000], dim=64, batch=8, seconds=0.05, faiss_indexes=False)
    assert row["numpy_found_planted"] == row["planted"] == 8 and row["numpy_exact_ms_per_batch"] > 0


# --- PDQ hash banks ------------------------------------------------------------------------------


def _pdq_policy(folder, csv_name="hashes.csv", **ref):
    ref = {"name": "tx", "path": csv_name, **ref}
    return POLICY.split("banks:")[0] + "pdq_banks:\n  - " + json.dumps(ref) + "\n"


def test_pdq_bank_files_csv_tsv_header_comments_and_errors(tmp_path):
    from moderator.decide.pdq import read_pdq_bank

    h1, h2 = "f" * 64, "0" * 63 + "1"
    p = tmp_path / "a.csv"
    p.write_text(f"pdq_hash,id,label\n# exported from ThreatExchange\n{h1},te-1,weapons\n\n{h2}\n")
    bank = read_pdq_bank(p)
    assert bank.ids == ("te-1", "line-5") and bank.labels == ("weapons", None) and bank.hashes.shape == (2, 32)
    p.write_text(f"{h1}\tte-1\n{h2}\tte-2\n")
    assert read_pdq_bank(p).ids == ("te-1", "te-2")
    for text, message in (
            (f"{h1},a\nnot-a-hash,b\n", r"a.csv: line 2: 'not-a-hash' is not a PDQ hash"),
            (f"{h1},a\n{h2[:-1]},b\n", r"line 2: .* is not a PDQ hash"),
            (f"{h1},a\n{h2},a\n", r"line 2: id 'a' already used on line 1"),
            (f"{h1},a,b,c\n", r"line 1: expected hash\[,id\[,label\]\], got 4 fields"),
            (f"{h1[:-2]},a\n{h2},b\n", r"line 1: .* is not a PDQ hash"),  # a short first hash is no header
            ("pdq_hash,id\n", r"a.csv: no PDQ hashes"),
            ("", r"a.csv: no PDQ hashes")):
        p.write_text(text)
        with pytest.raises(BankError, match=message):
            read_pdq_bank(p)
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(BankError, match="not UTF-8"):
        read_pdq_bank(p)


def test_pdq_matching_distance_quality_and_reason(md, tmp_path):
    import pdqhash  # noqa: F401 - the pdq extra is part of the test install: fail, never skip
    from PIL import Image

    from moderator.decode.pdq import pdq_hash
    from moderator.model.synth import draw_sample

    rng = np.random.default_rng(9)
    img = draw_sample(rng, 256, "green", "star").image.convert("RGB")
    h, quality = pdq_hash(img)
    assert len(h) == 32 and quality >= 50
    near, _ = pdq_hash(img.resize((200, 200), Image.BILINEAR))
    other, _ = pdq_hash(draw_sample(rng, 256, "blue", "circle").image.convert("RGB"))
    bits = lambda a, b: int(np.unpackbits(np.frombuffer(bytes(x ^ y for x, y in zip(a, b)), np.uint8)).sum())  # noqa: E731
    assert bits(h, near) <= 31 < bits(h, other)
    (tmp_path / "hashes.csv").write_text(f"{h.hex()},te-42,weapons\n")
    policy = _compile(md, tmp_path, _pdq_policy(tmp_path))
    assert policy.needs_pdq
    x = _unit(np.random.default_rng(0), 3, md.manifest.embed_dim)
    engine = DecisionEngine(policy, ModelInfo("m", "t"))
    d_near, d_other, d_low = engine.decide(["a", "b", "c"], x, pdq=[(near, quality), (other, 90), (h, 10)])
    assert d_near.action == "flag" and d_other.action == "allow" and d_low.bank_matches == []
    (m,) = d_near.bank_matches
    assert (m.bank, m.method, m.item_id, m.label, m.distance) == ("tx", "pdq", "te-42", "weapons", bits(h, near))
    assert any(r.startswith(f"pdq:tx flag item te-42 distance {bits(h, near)} <= 31") for r in d_near.reasons)
    # no hash given (an image the worker could not hash): nothing matches, nothing breaks
    assert engine.decide(["d"], x[:1], pdq=[None])[0].bank_matches == []


def test_a_pdq_policy_without_the_package_is_refused_at_load(md, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pdqhash(name, *a, **kw):
        if name == "pdqhash":
            raise ImportError("No module named 'pdqhash'")
        return real_import(name, *a, **kw)

    (tmp_path / "hashes.csv").write_text("f" * 64 + "\n")
    monkeypatch.setattr(builtins, "__import__", no_pdqhash)
    from moderator.errors import MissingDependency

    with pytest.raises(MissingDependency, match=r"moderator\[pdq\]"):
        _compile(md, tmp_path, _pdq_policy(tmp_path))


def test_pdq_bank_files_hot_reload_and_a_malformed_one_keeps_the_old(md, tmp_path, caplog):
    import pdqhash  # noqa: F401 - the pdq extra is part of the test install: fail, never skip
    dim = md.manifest.embed_dim
    (tmp_path / "hashes.csv").write_text("f" * 64 + ",a\n")

    def compile_fn(loaded):
        return compile_policy(loaded, md.model_sha256, md.manifest.logit_scale, lambda: TextEncoder(md),
                              InProcessCache(), embed_dim=dim)

    (tmp_path / "policy.yaml").write_text(_pdq_policy(tmp_path))
    engine = DecisionEngine(compile_fn(load_policy(tmp_path / "policy.yaml")), ModelInfo("m", "t"))
    watcher = PolicyWatcher(tmp_path / "policy.yaml", engine, compile_fn)
    (tmp_path / "hashes.csv").write_text("f" * 64 + ",a\n" + "0" * 64 + ",b\n")
    assert watcher.check_once() == "reloaded" and engine.policy.pdq_banks[0].bank.ids == ("a", "b")
    with caplog.at_level(logging.ERROR):
        (tmp_path / "hashes.csv").write_text("f" * 64 + ",a\nzz,b\n")
        assert watcher.check_once() == "rejected"
    assert engine.policy.pdq_banks[0].bank.ids == ("a", "b")
    assert any("hashes.csv: line 2" in r.getMessage() for r in caplog.records)


def test_bank_cache_keeps_what_any_policy_lists(tmp_path):
    from moderator.decide.banks import FileCache

    reads = []
    cache = FileCache(lambda p: reads.append(p) or object())
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text(name)
    a, b, c = (tmp_path / n for n in "abc")
    cache.load(a), cache.load(c)  # the live policy's compile
    cache.retain("live.yaml", [a, c])
    cache.load(b)  # the shadow policy's compile must not evict the live policy's banks
    cache.retain("shadow.yaml", [b])
    cache.load(a), cache.load(b), cache.load(c)  # a live reload with the same files reads nothing
    assert reads == [a, c, b]
    cache.retain("live.yaml", [a])  # c is listed by no policy now: dropped, read again if listed again
    cache.load(c)
    assert reads == [a, c, b, c]
