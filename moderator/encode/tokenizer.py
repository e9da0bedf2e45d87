"""CLIP's byte-level BPE tokenizer, served by Hugging Face ``tokenizers`` (no torch).

The vocabulary and merges are exported from open_clip's ``SimpleTokenizer`` into a
``tokenizer.json`` at export time (see ``moderator.model.export``). The text
cleaning open_clip applies before BPE (ftfy, double HTML unescape, whitespace
collapse, lower-case) is not expressible as a ``tokenizers`` normaliser, so it
runs here in Python with the same library open_clip uses (ftfy).
"""

from __future__ import annotations

import html
import re
import string
from pathlib import Path
from typing import Sequence

import ftfy
import numpy as np
from tokenizers import Tokenizer

from moderator.schemas import TokenizerSpec

# The pre-tokenisation pattern of open_clip's SimpleTokenizer (case-insensitive).
CLIP_SPLIT_PATTERN = (
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")

_WS = re.compile(r"\s+")


def _basic_clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def _whitespace_clean(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _canonicalize(text: str) -> str:
    text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation))
    return _whitespace_clean(text.lower())


def clean_text(text: str, mode: str = "lower") -> str:
    """open_clip's ``clean`` step, by name."""
    text = _basic_clean(text)
    if mode == "lower":
        return _whitespace_clean(text).lower()
    if mode == "whitespace":
        return _whitespace_clean(text)
    if mode == "canonicalize":
        return _canonicalize(text)
    raise ValueError(f"unknown tokenizer clean mode {mode!r}")


class ClipTokenizer:
    """Text -> int64 token ids of shape (N, context_length), like ``open_clip.tokenize``."""

    def __init__(self, spec: TokenizerSpec, tokenizer_file: Path) -> None:
        self.spec = spec
        self._tok = Tokenizer.from_file(str(tokenizer_file))

    @property
    def context_length(self) -> int:
        return self.spec.context_length

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        cleaned = [clean_text(t, self.spec.clean) for t in texts]
        encodings = self._tok.encode_batch(cleaned, add_special_tokens=False)
        n = self.spec.context_length
        out = np.full((len(cleaned), n), self.spec.pad_token_id, dtype=np.int64)
        for i, enc in enumerate(encodings):
            ids = [self.spec.sot_token_id, *enc.ids, self.spec.eot_token_id]
            if len(ids) > n:  # truncate like open_clip: keep the end-of-text marker last
                ids = ids[:n]
                ids[-1] = self.spec.eot_token_id
            out[i, : len(ids)] = ids
        return out
