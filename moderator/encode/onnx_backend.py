"""ONNX Runtime encoders: the serving path. Imports no torch."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from moderator.encode.model_dir import ModelDirectory
from moderator.encode.preprocess import ImagePreprocessor
from moderator.encode.tokenizer import ClipTokenizer
from moderator.errors import ModelError

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Execution providers in preference order, from what this onnxruntime build offers.

    ``requested`` (or, when not given, the comma-separated ``MODERATOR_ORT_PROVIDERS``)
    overrides the order; asking for a provider this build lacks is an error, not a
    silent fallback.
    """
    available = ort.get_available_providers()
    if not requested and os.environ.get("MODERATOR_ORT_PROVIDERS"):
        requested = [p.strip() for p in os.environ["MODERATOR_ORT_PROVIDERS"].split(",") if p.strip()]
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ModelError(
                f"execution provider(s) {missing} not available in this onnxruntime build "
                f"(available: {available})"
            )
        return list(requested)
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen or ["CPUExecutionProvider"]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


class _OnnxEncoder:
    def __init__(self, model_dir: ModelDirectory, spec, providers: Sequence[str] | None,
                 intra_op_threads: int | None) -> None:
        self.model_dir = model_dir
        self.spec = spec
        opts = ort.SessionOptions()
        # ORT_ENABLE_ALL's layout transforms crash onnxruntime 1.31's CPU provider on fp16
        # graphs (segfault at session creation); EXTENDED keeps the fusions that matter.
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if spec.input_dtype == "float16"
            or model_dir.manifest.precision == "fp16" else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        threads = intra_op_threads or int(os.environ.get("MODERATOR_ORT_THREADS", "0") or 0)
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        chosen = choose_providers(providers)
        path = model_dir.file(spec.file)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError(f"cannot load {path} with providers {chosen}: {e}") from e
        self.providers = self.session.get_providers()
        self._in_dtype = _NP_DTYPES[spec.input_dtype]
        log.info("loaded %s with providers %s (asked %s)", path.name, self.providers, chosen)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 0:
            return np.zeros((0, self.model_dir.manifest.embed_dim), dtype=np.float32)
        out = self.session.run([self.spec.output_name], {self.spec.input_name: x.astype(self._in_dtype, copy=False)})[0]
        return l2_normalize(out)

    def runtime_info(self) -> dict:
        return {
            "backend": "onnxruntime",
            "onnxruntime": ort.__version__,
            "providers": list(self.providers),
            "model_sha256": self.model_dir.model_sha256,
            "file": self.spec.file,
        }


class ImageEncoder(_OnnxEncoder):
    """PIL images (or preprocessed NCHW arrays) -> L2-normalised float32 embeddings."""

    def __init__(self, model_dir: ModelDirectory | str, *, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None) -> None:
        md = model_dir if isinstance(model_dir, ModelDirectory) else ModelDirectory(model_dir)
        super().__init__(md, md.manifest.image_encoder, providers, intra_op_threads)
        self.preprocessor = ImagePreprocessor(md.manifest.preprocess)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self._run(pixels)

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._run(self.preprocessor.batch(images))


class TextEncoder(_OnnxEncoder):
    """Strings -> L2-normalised float32 embeddings, tokenised like open_clip."""

    def __init__(self, model_dir: ModelDirectory | str, *, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None) -> None:
        md = model_dir if isinstance(model_dir, ModelDirectory) else ModelDirectory(model_dir)
        super().__init__(md, md.manifest.text_encoder, providers, intra_op_threads)
        self.tokenizer = ClipTokenizer(md.manifest.tokenizer, md.file(md.manifest.tokenizer.file))

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self._run(tokens)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._run(self.tokenizer(list(texts)))
