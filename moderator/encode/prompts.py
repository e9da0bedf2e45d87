"""Prompt-template ensembles (CLIP paper, section 3.1.4).

Each class is encoded under every template; the normalised embeddings are
averaged and the mean is re-normalised. One matrix multiply then scores an
image against every class.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

DEFAULT_TEMPLATES = (
    "a photo of {}.",
    "a picture of {}.",
    "an image showing {}.",
    "a close-up photo of {}.",
    "a low resolution photo of {}.",
)


class TextEncoderLike(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def fill_templates(text: str, templates: Sequence[str]) -> list[str]:
    if not templates:
        return [text]
    return [t.format(text) if "{}" in t else f"{t} {text}" for t in templates]


def ensemble_embeddings(
    encoder: TextEncoderLike,
    texts: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> np.ndarray:
    """(len(texts), D) float32: per text, the re-normalised mean over templates."""
    if not texts:
        raise ValueError("no texts to encode")
    filled = [p for text in texts for p in fill_templates(text, templates)]
    emb = encoder.encode(filled).astype(np.float32)
    per = max(len(templates), 1)
    emb = emb.reshape(len(texts), per, -1)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    mean = emb.mean(axis=1)
    return (mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)).astype(np.float32)
