"""Encode stage: CLIP image/text encoders served from an exported model directory.

ONNX Runtime by default (no torch import); a torch backend with the same
interface lives in ``moderator.encode.torch_backend`` for parity and GPU work.
"""

from moderator.encode.model_dir import ModelDirectory
from moderator.encode.onnx_backend import ImageEncoder, TextEncoder, choose_providers
from moderator.encode.preprocess import ImagePreprocessor
from moderator.encode.prompts import DEFAULT_TEMPLATES, ensemble_embeddings
from moderator.encode.tokenizer import ClipTokenizer

__all__ = [
    "ClipTokenizer",
    "DEFAULT_TEMPLATES",
    "ImageEncoder",
    "ImagePreprocessor",
    "ModelDirectory",
    "TextEncoder",
    "choose_providers",
    "ensemble_embeddings",
]
