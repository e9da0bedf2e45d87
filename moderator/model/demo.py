"""The demo model: a tiny CLIP trained here on the synthetic shapes domain.

``ensure_demo_model()`` draws the data set, trains, exports and evaluates, or
reuses a cached result keyed by everything that shapes it (model config, seed,
training parameters, and the source of the generator and trainer). Tests and
``make demo`` share it through ``$MODERATOR_CACHE_DIR`` (default
``~/.cache/moderator``); nothing of it enters git.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from moderator.model import export as export_mod
from moderator.model import finetune as finetune_mod
from moderator.model import synth

log = logging.getLogger(__name__)

DEMO_ARCH = "moderator-tiny"
DEMO_SEED = 0
TRAIN_IMAGES = 12_000
HELDOUT_IMAGES = 1_000
TRAIN = {"steps": 800, "batch_size": 64, "lr": 3e-3, "warmup_steps": 30, "loss": "clip"}


def cache_root() -> Path:
    return Path(os.environ.get("MODERATOR_CACHE_DIR") or Path.home() / ".cache" / "moderator")


def demo_key(seed: int = DEMO_SEED) -> str:
    h = hashlib.sha256()
    h.update((export_mod.bundled_configs_dir() / f"{DEMO_ARCH}.json").read_bytes())
    for mod in (synth, finetune_mod, export_mod):
        h.update(Path(mod.__file__).read_bytes())
    h.update(json.dumps({"seed": seed, "train": TRAIN, "n": [TRAIN_IMAGES, HELDOUT_IMAGES]},
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass
class DemoModel:
    root: Path
    model_dir: Path
    heldout_jsonl: Path
    report: dict


def zero_shot_accuracy(model_dir: Path, jsonl: Path, templates: tuple[str, ...] = synth.ZERO_SHOT_TEMPLATES) -> dict:
    """Held-out zero-shot accuracy through the exported ONNX encoders (the serving path), class
    names embedded as an ensemble over ``templates`` (one template: no ensemble)."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from moderator.encode import ImageEncoder, TextEncoder, ensemble_embeddings  # noqa: PLC0415

    names = synth.class_names()
    text = ensemble_embeddings(TextEncoder(model_dir), names, templates)
    image_encoder = ImageEncoder(model_dir)
    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    correct, per_class, confusion = 0, {n: [0, 0] for n in names}, {}
    for i in range(0, len(records), 64):
        chunk = records[i:i + 64]
        imgs = []
        for r in chunk:
            with Image.open(Path(jsonl).parent / r["path"]) as im:
                imgs.append(im.convert("RGB"))
        pred = (image_encoder.encode(imgs) @ text.T).argmax(axis=1)
        for r, p in zip(chunk, pred):
            guess = names[int(p)]
            ok = guess == r["label"]
            correct += ok
            per_class[r["label"]][0] += ok
            per_class[r["label"]][1] += 1
            if not ok:
                confusion[f"{r['label']} -> {guess}"] = confusion.get(f"{r['label']} -> {guess}", 0) + 1
    return {
        "accuracy": correct / len(records),
        "n": len(records),
        "per_class": {k: round(v[0] / v[1], 3) for k, v in per_class.items() if v[1]},
        "errors": dict(sorted(confusion.items(), key=lambda kv: -kv[1])),
        "worst_class_accuracy": float(np.min([v[0] / v[1] for v in per_class.values() if v[1]])),
    }


def _load_cached(root: Path) -> DemoModel | None:
    report_file = root / "report.json"
    if not report_file.is_file():
        return None
    try:
        from moderator.encode import ModelDirectory  # noqa: PLC0415

        ModelDirectory(root / "model")  # verifies every checksum
        return DemoModel(root, root / "model", root / "data" / "heldout.jsonl", json.loads(report_file.read_text()))
    except Exception as e:  # a damaged cache is rebuilt, not trusted
        log.warning("demo model cache at %s unusable (%s); rebuilding", root, e)
        return None


def ensure_demo_model(seed: int = DEMO_SEED, *, force: bool = False, progress: bool = True) -> DemoModel:
    """Return the cached demo model, building it first if needed.

    A file lock serialises concurrent callers (parallel test sessions, the demo).
    ``report.json`` is written last and marks a complete build, so a crash never
    leaves a half-built cache that looks complete.
    """
    root = cache_root() / "demo-model" / demo_key(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and (cached := _load_cached(root)) is not None:
            return cached
        if root.exists():
            shutil.rmtree(root)
        root.mkdir()
        report = {"key": root.name, **_build(root, seed, progress)}
        (root / "report.json").write_text(json.dumps(report, indent=2))
    return DemoModel(root, root / "model", root / "data" / "heldout.jsonl", report)


def _build(root: Path, seed: int, progress: bool) -> dict:
    t0 = time.monotonic()
    data = root / "data"
    train_jsonl = synth.write_dataset(data, TRAIN_IMAGES, seed, "train")
    heldout_jsonl = synth.write_dataset(data, HELDOUT_IMAGES, seed, "heldout")
    t_data = time.monotonic() - t0
    result = finetune_mod.finetune(finetune_mod.FinetuneConfig(
        data=train_jsonl, out=root / "checkpoint", model=DEMO_ARCH, seed=seed, progress=progress, **TRAIN,
    ))
    t_export = time.monotonic()
    loaded = export_mod.load_model(DEMO_ARCH, checkpoint=root / "checkpoint")
    export_mod.export_model(loaded, root / "model")
    t_eval = time.monotonic()
    acc = zero_shot_accuracy(root / "model", heldout_jsonl)
    return {
        "seed": seed, "train": TRAIN, "train_images": TRAIN_IMAGES,
        "heldout_images": HELDOUT_IMAGES, "data_seconds": round(t_data, 1),
        "train_seconds": round(result.seconds, 1), "export_seconds": round(t_eval - t_export, 1),
        "eval_seconds": round(time.monotonic() - t_eval, 1), "final_loss": result.final_loss,
        "logit_scale": result.logit_scale, "total_seconds": round(time.monotonic() - t0, 1), **acc,
    }
