"""``moderator finetune``: train or fine-tune an open_clip model on image-caption pairs.

Input: JSONL, one ``{"path": ..., "caption": ...}`` per line (paths relative to
the JSONL file). Loss: open_clip's own ``ClipLoss`` (InfoNCE) or ``SigLipLoss``,
with the learned temperature (and bias for SigLIP). Output: an open_clip
"local-dir" (``open_clip_config.json`` + ``open_clip_model.safetensors`` + a
training log) that ``moderator export --checkpoint DIR`` turns into a model
directory. No pickle anywhere.

The same tool serves the synthetic demo (random init, high learning rate) and real
domain adaptation (a pretrained start, a small learning rate, optionally
``--freeze-towers`` to tune only the projections and temperature).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from moderator.errors import InputError, ModelError
from moderator.model._deps import require_train_extra
from moderator.model.export import load_model

log = logging.getLogger(__name__)

_PRELOAD_LIMIT_BYTES = 2 << 30  # decode every image once when the set fits in 2 GiB


@dataclass
class FinetuneConfig:
    data: Path
    out: Path
    model: str = "moderator-tiny"
    config: Path | None = None
    pretrained: str | None = None
    init_checkpoint: Path | None = None
    loss: Literal["clip", "siglip"] = "clip"
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    grad_clip: float = 1.0
    freeze_towers: bool = False
    seed: int = 0
    threads: int | None = None
    progress: bool = True


@dataclass
class FinetuneResult:
    out: Path
    steps: int
    seconds: float
    final_loss: float
    logit_scale: float
    history: list[dict] = field(default_factory=list)


def read_pairs(jsonl: Path) -> list[tuple[Path, str]]:
    """Parse and check the pairs file; every bad line is reported with its number."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise InputError(f"{jsonl}: no such file")
    pairs, errors = [], []
    for n, line in enumerate(jsonl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            path, caption = rec["path"], rec["caption"]
            if not isinstance(path, str) or not isinstance(caption, str) or not caption.strip():
                raise TypeError("path and caption must be non-empty strings")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            errors.append(f"{jsonl}:{n}: {e}")
            continue
        p = (jsonl.parent / path) if not os.path.isabs(path) else Path(path)
        if not p.is_file():
            errors.append(f"{jsonl}:{n}: image {p} does not exist")
            continue
        pairs.append((p, caption))
    if errors:
        shown = "\n".join(errors[:20])
        raise InputError(f"{len(errors)} bad line(s) in {jsonl}:\n{shown}")
    if not pairs:
        raise InputError(f"{jsonl}: no image-caption pairs")
    return pairs


def _cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * min(1.0, progress)))


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    require_train_extra()
    import open_clip  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    if cfg.batch_size < 2:
        raise ModelError("contrastive training needs a batch size of at least 2")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    pairs = read_pairs(cfg.data)
    extra = {"init_logit_bias": -10.0, "init_logit_scale": math.log(10.0)} if cfg.loss == "siglip" else {}
    loaded = load_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.init_checkpoint,
                        config=cfg.config, seed=cfg.seed)
    model = loaded.model
    model_cfg = dict(loaded.model_cfg)
    if extra and getattr(model, "logit_bias", None) is None:
        # SigLIP needs a learned bias; rebuild with it and carry the weights over.
        model_cfg.update(extra)
        cls = open_clip.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.CLIP
        fresh = cls(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
        missing = fresh.load_state_dict(model.state_dict(), strict=False)
        if set(missing.missing_keys) - {"logit_bias"}:
            raise ModelError(f"cannot add a SigLIP bias to {loaded.name}: {missing}")
        if loaded.weights.kind == "random":
            with torch.no_grad():
                fresh.logit_scale.fill_(extra["init_logit_scale"])
        model = fresh
    # Frozen towers stay in eval mode too, so BatchNorm statistics don't drift.
    model.train(not cfg.freeze_towers)
    if cfg.freeze_towers:
        # Projections into the shared space + temperature (ViT: visual.proj; ResNet:
        # the attention pool's output projection; timm towers: their head projection).
        heads = ("visual.attnpool.c_proj.", "visual.head.proj.")
        for name, p in model.named_parameters():
            p.requires_grad = (name in {"logit_scale", "logit_bias", "text_projection", "visual.proj"}
                               or name.startswith(heads))

    tokenizer = open_clip.get_tokenizer(loaded.tokenizer_ref)
    preprocess = open_clip.image_transform(
        model.visual.image_size, is_train=False,
        mean=loaded.preprocess_cfg.get("mean"), std=loaded.preprocess_cfg.get("std"),
        interpolation=loaded.preprocess_cfg.get("interpolation"),
        resize_mode=loaded.preprocess_cfg.get("resize_mode"),
    )
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    def load_image(p: Path):
        with Image.open(p) as im:
            return preprocess(im.convert("RGB"))

    tokens = tokenizer([c for _, c in pairs])
    preload = len(pairs) * 3 * size[0] * size[1] * 4 <= _PRELOAD_LIMIT_BYTES
    images = torch.stack([load_image(p) for p, _ in pairs]) if preload else None

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("nothing to train: every parameter is frozen")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    from open_clip.loss import ClipLoss, SigLipLoss  # noqa: PLC0415 (SigLipLoss is not re-exported)

    loss_fn = ClipLoss() if cfg.loss == "clip" else SigLipLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(pairs)
    bs = min(cfg.batch_size, n)
    history: list[dict] = []
    start = time.monotonic()
    perm, pos = torch.randperm(n, generator=gen), 0
    bar = tqdm(range(cfg.steps), desc=f"finetune[{cfg.loss}]", disable=not cfg.progress, unit="step")
    loss_val = float("nan")
    for step in bar:
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + bs]
        pos += bs
        x = images[idx] if images is not None else torch.stack([load_image(pairs[i][0]) for i in idx.tolist()])
        t = tokens[idx]
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        img_f = model.encode_image(x, normalize=True)
        txt_f = model.encode_text(t, normalize=True)
        scale = model.logit_scale.exp()
        if cfg.loss == "clip":
            loss = loss_fn(img_f, txt_f, scale)
        else:
            loss = loss_fn(img_f, txt_f, scale, model.logit_bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_val = float(loss.detach())
        if step % 10 == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": round(loss_val, 4), "logit_scale": round(float(scale.detach()), 3),
                   "lr": opt.param_groups[0]["lr"], "seconds": round(time.monotonic() - start, 1)}
            history.append(rec)
            bar.set_postfix(loss=f"{loss_val:.3f}", scale=f"{float(scale.detach()):.1f}")
    seconds = time.monotonic() - start
    model.eval()

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps({
        "name": loaded.name,
        "model_cfg": model_cfg,
        "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in loaded.preprocess_cfg.items()},
    }, indent=2))
    result = FinetuneResult(out, cfg.steps, seconds, loss_val, float(model.logit_scale.detach().exp()), history)
    (out / "training_log.json").write_text(json.dumps({
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "pairs": n, "seconds": round(seconds, 1), "final_loss": loss_val,
        "logit_scale": result.logit_scale, "history": history,
    }, indent=2))
    return result
