"""finetune: both losses train, write a loadable local-dir, and export from it."""

import json

import pytest

from moderator.errors import InputError

pytest.importorskip("torch")

from moderator.encode import ImageEncoder, ModelDirectory  # noqa: E402
from moderator.model.export import export_model, load_model  # noqa: E402
from moderator.model.finetune import FinetuneConfig, finetune, read_pairs  # noqa: E402
from moderator.model.synth import class_names, write_dataset  # noqa: E402


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synth"), 48, seed=3, split="train", size=72)


def test_synth_is_seeded_balanced_and_split(tmp_path, pairs):
    again = write_dataset(tmp_path, 48, seed=3, split="train", size=72)
    assert again.read_text() == pairs.read_text()
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert {r["label"] for r in rows} <= set(class_names()) and len({r["label"] for r in rows}) == 20
    assert any(r["path"].endswith(".jpg") for r in rows) and any(r["path"].endswith(".png") for r in rows)
    held = write_dataset(tmp_path, 48, seed=3, split="heldout", size=72)
    a = {(tmp_path / r["path"]).read_bytes() for r in map(json.loads, again.read_text().splitlines())}
    b = {(tmp_path / r["path"]).read_bytes() for r in map(json.loads, held.read_text().splitlines())}
    assert not a & b  # no held-out image occurs in training


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_finetune_then_export(tmp_path, pairs, loss):
    r = finetune(FinetuneConfig(data=pairs, out=tmp_path / "ckpt", loss=loss, steps=3, batch_size=16,
                                warmup_steps=1, progress=False))
    assert r.steps == 3 and r.final_loss == r.final_loss  # not NaN
    assert (tmp_path / "ckpt" / "open_clip_model.safetensors").is_file()
    log = json.loads((tmp_path / "ckpt" / "training_log.json").read_text())
    assert log["config"]["loss"] == loss and log["history"]
    md = export_model(load_model("moderator-tiny", checkpoint=tmp_path / "ckpt"), tmp_path / "model")
    m = ModelDirectory(md.path).manifest
    assert m.weights.kind == "checkpoint" and m.weights.checkpoint_sha256
    assert (m.logit_bias is not None) == (loss == "siglip")
    from PIL import Image

    assert ImageEncoder(md).encode([Image.new("RGB", (80, 80), "red")]).shape == (1, m.embed_dim)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_training_lowers_the_loss(tmp_path, pairs, loss):
    """40 steps over 48 pairs: the contrastive loss must fall well below where it started
    (step 0 is logged before any update has had an effect)."""
    r = finetune(FinetuneConfig(data=pairs, out=tmp_path / "ckpt", loss=loss, steps=40, batch_size=16,
                                warmup_steps=2, progress=False, seed=0))
    first, last = r.history[0], r.history[-1]
    assert first["step"] == 0 and last["step"] == 39
    assert last["loss"] < 0.7 * first["loss"], r.history


def test_freeze_towers_trains_only_projections(tmp_path, pairs):
    import torch
    from safetensors.torch import load_file

    base = tmp_path / "base"
    finetune(FinetuneConfig(data=pairs, out=base, steps=1, batch_size=8, progress=False))
    finetune(FinetuneConfig(data=pairs, out=tmp_path / "tuned", init_checkpoint=base, steps=2, batch_size=8,
                            freeze_towers=True, lr=1e-2, warmup_steps=1, progress=False))
    a = load_file(str(base / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "tuned" / "open_clip_model.safetensors"))
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k in {"logit_scale", "text_projection"} or k.startswith("visual.attnpool.c_proj.")
                           for k in changed), changed


def test_bad_pairs_are_reported_with_line_numbers(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"path": "missing.png", "caption": "x"}\nnot json\n{"path": "a.png"}\n')
    with pytest.raises(InputError) as e:
        read_pairs(f)
    msg = str(e.value)
    assert "3 bad line(s)" in msg and "p.jsonl:1" in msg and "p.jsonl:2" in msg and "p.jsonl:3" in msg
