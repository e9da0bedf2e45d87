"""``moderator synth``: a seeded, procedurally drawn image-caption data set.

Coloured shapes on varied backgrounds: the class is (colour, shape), so a model
must read both to be right. Backgrounds (flat, gradient, stripes, noise, checks),
position, size, rotation, colour jitter and distractor marks vary per image;
captions vary over templates and mention size and background. Held-out sets use
a different seed stream, so none of their images occur in training.

Pure Pillow + numpy: no torch needed to draw.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (35, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
}
SHAPES = ("circle", "square", "triangle", "star")
BACKGROUNDS = ("plain", "gradient", "striped", "noisy", "checkered")

CAPTION_TEMPLATES = (
    "a photo of a {colour} {shape}.",
    "a {colour} {shape}.",
    "a {size} {colour} {shape}.",
    "a {colour} {shape} on a {background} background.",
    "a {size} {colour} {shape} on a {background} background.",
    "a drawing of a {colour} {shape}.",
    "a {shape} coloured {colour}.",
    "{colour} {shape}",
)
ZERO_SHOT_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a drawing of a {}.",
)

SPLIT_SEED_OFFSET = {"train": 0, "heldout": 1_000_003, "val": 2_000_003}


def class_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    colour: str
    shape: str
    size_word: str
    background: str
    caption: str

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


def _background(rng: np.random.Generator, size: int, kind: str) -> Image.Image:
    # Muted tones only, so the saturated shape colours stay the signal.
    base = rng.integers(40, 200, size=3)
    grey = int(base.mean())
    base = (0.35 * base + 0.65 * grey).astype(np.int64)
    if kind == "plain":
        arr = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    elif kind == "gradient":
        other = (0.35 * rng.integers(40, 200, size=3) + 0.65 * grey).astype(np.float32)
        t = np.linspace(0, 1, size, dtype=np.float32)
        t = t[:, None] if rng.random() < 0.5 else t[None, :]
        t = np.broadcast_to(t, (size, size))[..., None]
        arr = base * (1 - t) + other * t
    elif kind == "striped":
        period = int(rng.integers(4, 12))
        yy, xx = np.mgrid[0:size, 0:size]
        band = ((xx + yy * int(rng.integers(0, 2))) // period) % 2
        arr = np.where(band[..., None] == 1, base, base * 0.7).astype(np.float32)
    elif kind == "noisy":
        arr = base + rng.normal(0, 25, size=(size, size, 3))
    else:  # checkered
        cell = int(rng.integers(6, 16))
        yy, xx = np.mgrid[0:size, 0:size]
        band = ((xx // cell) + (yy // cell)) % 2
        arr = np.where(band[..., None] == 1, base, base * 0.75).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(rot + math.pi / 4 + k * math.pi / 2), math.sin(rot + math.pi / 4 + k * math.pi / 2)) for k in range(4)]
    elif shape == "triangle":
        pts = [(math.cos(rot + k * 2 * math.pi / 3), math.sin(rot + k * 2 * math.pi / 3)) for k in range(3)]
    else:  # star: 5 outer points, inner radius 0.45
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = rot + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    return [(cx + r * x, cy + r * y) for x, y in pts]


def draw_sample(rng: np.random.Generator, size: int = 96,
                colour: str | None = None, shape: str | None = None) -> Sample:
    colour = colour or str(rng.choice(list(COLOURS)))
    shape = shape or str(rng.choice(SHAPES))
    background = str(rng.choice(BACKGROUNDS))
    img = _background(rng, size, background)
    draw = ImageDraw.Draw(img)
    # A few grey distractor marks: texture that carries no class information.
    for _ in range(int(rng.integers(0, 4))):
        g = int(rng.integers(60, 200))
        x0, y0 = rng.integers(0, size, 2)
        draw.line([(int(x0), int(y0)), (int(x0 + rng.integers(-20, 20)), int(y0 + rng.integers(-20, 20)))],
                  fill=(g, g, g), width=int(rng.integers(1, 3)))
    size_word = "large" if rng.random() < 0.5 else "small"
    r = size * (rng.uniform(0.26, 0.36) if size_word == "large" else rng.uniform(0.15, 0.22))
    margin = r * 1.05
    cx, cy = rng.uniform(margin, size - margin, 2)
    rgb = np.array(COLOURS[colour], dtype=np.float64)
    rgb = np.clip(rgb * rng.uniform(0.85, 1.1) + rng.normal(0, 10, 3), 0, 255).astype(int)
    fill = tuple(int(v) for v in rgb)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=fill)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    template = str(rng.choice(CAPTION_TEMPLATES))
    caption = template.format(colour=colour, shape=shape, size=size_word, background=background)
    return Sample(img, colour, shape, size_word, background, caption)


def iter_samples(n: int, seed: int, split: str = "train", size: int = 96) -> Iterator[Sample]:
    """``n`` samples, classes balanced (round robin), deterministic for (seed, split)."""
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    rng = np.random.default_rng([seed, SPLIT_SEED_OFFSET[split]])
    order = rng.permutation(n) % len(classes)
    for i in range(n):
        c, s = classes[order[i]]
        yield draw_sample(rng, size, c, s)


JPEG_SHARE = 0.4  # the rest are PNG: uploads arrive both ways, with JPEG artifacts


def write_dataset(out_dir: Path, n: int, seed: int, split: str = "train", size: int = 96,
                  progress=None) -> Path:
    """Write images and ``<split>.jsonl`` (path relative to the JSONL, caption, labels);
    ``progress(1)`` after each image.

    A share of the images is stored as JPEG at a random quality (40-95) so models
    learn to see through compression artifacts, as they must in production.
    """
    out_dir = Path(out_dir)
    img_dir = out_dir / split
    img_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{split}.jsonl"
    tmp = jsonl.with_suffix(".jsonl.tmp")
    fmt_rng = np.random.default_rng([seed, SPLIT_SEED_OFFSET[split], 7])
    with open(tmp, "w") as f:
        for i, s in enumerate(iter_samples(n, seed, split, size)):
            if fmt_rng.random() < JPEG_SHARE:
                rel = f"{split}/{i:06d}.jpg"
                s.image.save(out_dir / rel, quality=int(fmt_rng.integers(40, 96)))
            else:
                rel = f"{split}/{i:06d}.png"
                s.image.save(out_dir / rel, optimize=False)
            f.write(json.dumps({
                "path": rel, "caption": s.caption, "label": s.label, "colour": s.colour,
                "shape": s.shape, "size": s.size_word, "background": s.background,
            }) + "\n")
            if progress is not None:
                progress(1)
    tmp.replace(jsonl)
    return jsonl


def dataset_fingerprint(**params) -> str:
    """Key for caches: the generator's parameters and this module's source."""
    src = Path(__file__).read_bytes()
    h = hashlib.sha256(src)
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]
