"""ONNX Runtime encoders: the serving path. Imports no torch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from moderator.errors import MissingDependency

try:
    import onnxruntime as ort
except ImportError as e:  # the base install leaves the ONNX Runtime build to the cpu / gpu extra
    raise MissingDependency(
        "ONNX Runtime is not installed: pip install 'moderator[cpu]' (or 'moderator[gpu]' for "
        f"onnxruntime-gpu on CUDA) ({e})") from e

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

    ``requested`` (the worker passes ``MODERATOR_ORT_PROVIDERS`` from its settings)
    overrides the order; asking for a provider this build lacks is an error, not a
    silent fallback.
    """
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            hint = (" (GPU providers need the onnxruntime-gpu wheel: `pip install moderator[gpu]`)"
                    if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in missing) else "")
            raise ModelError(
                f"execution provider(s) {missing} not available in this onnxruntime build "
                f"(available: {available}){hint}"
            )
        return list(requested)
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen or ["CPUExecutionProvider"]


@dataclass(frozen=True)
class OrtOptions:
    """How an ONNX Runtime session is built (the worker fills it from ``WorkerSettings``)."""

    providers: tuple[str, ...] = ()  # empty: the best this build offers
    intra_op_threads: int = 0  # 0: ONNX Runtime's default
    device_id: int = 0  # GPU for the CUDA and TensorRT providers
    trt_fp16: bool = True  # TensorRT builds fp16 engines (the ONNX file stays fp32)
    trt_engine_cache_dir: str = ""  # "": no cache; engines take minutes to build, so set it in production
    io_binding: bool = True  # on CUDA: output stays on the device until one copy back per batch
    # ONNX Runtime's intra-op threads busy-wait for the next run by default: right for a benchmark
    # loop, but in the worker the encoder runs between other stages' work, and the spinning eats
    # the cores that decode and Kafka need
    allow_spinning: bool = True


def provider_options(providers: Sequence[str], opts: OrtOptions) -> list[dict]:
    """Per-provider options in ``providers`` order (what ``InferenceSession`` takes)."""
    out = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            o = {"device_id": str(opts.device_id), "trt_fp16_enable": "True" if opts.trt_fp16 else "False"}
            if opts.trt_engine_cache_dir:
                o.update(trt_engine_cache_enable="True", trt_engine_cache_path=opts.trt_engine_cache_dir,
                         trt_timing_cache_enable="True", trt_timing_cache_path=opts.trt_engine_cache_dir)
            out.append(o)
        elif p == "CUDAExecutionProvider":
            out.append({"device_id": str(opts.device_id)})
        else:
            out.append({})
    return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


class _OnnxEncoder:
    def __init__(self, model_dir: ModelDirectory, spec, options: OrtOptions) -> None:
        self.model_dir = model_dir
        self.spec = spec
        self.options = options
        sess = ort.SessionOptions()
        # ORT_ENABLE_ALL's layout transforms crash onnxruntime 1.31's CPU provider on fp16
        # graphs (segfault at session creation); EXTENDED keeps the fusions that matter.
        sess.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if spec.input_dtype == "float16"
            or model_dir.manifest.precision == "fp16" else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        if options.intra_op_threads:
            sess.intra_op_num_threads = options.intra_op_threads
        if not options.allow_spinning:
            sess.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess.add_session_config_entry("session.inter_op.allow_spinning", "0")
        sess.log_severity_level = 3
        chosen = choose_providers(options.providers or None)
        if options.trt_engine_cache_dir and "TensorrtExecutionProvider" in chosen:
            Path(options.trt_engine_cache_dir).mkdir(parents=True, exist_ok=True)
        path = model_dir.file(spec.file)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=sess, providers=chosen,
                                                provider_options=provider_options(chosen, options))
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError(f"cannot load {path} with providers {chosen}: {e}") from e
        self.providers = self.session.get_providers()
        self._in_dtype = _NP_DTYPES[spec.input_dtype]
        on_gpu = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.output_device = "cuda" if on_gpu else "cpu"
        self.io_binding = options.io_binding and on_gpu
        log.info("loaded %s with providers %s (asked %s), io_binding=%s", path.name, self.providers, chosen,
                 self.io_binding)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 0:
            return np.zeros((0, self.model_dir.manifest.embed_dim), dtype=np.float32)
        x = np.ascontiguousarray(x, dtype=self._in_dtype)
        if self.io_binding:
            out = self._run_bound(x, self.output_device)
        else:
            out = self.session.run([self.spec.output_name], {self.spec.input_name: x})[0]
        return l2_normalize(out)

    def _run_bound(self, x: np.ndarray, device: str) -> np.ndarray:
        """I/O binding: the input is copied to the device once, the output is left there and
        copied back once, instead of ONNX Runtime's per-run staging of both."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.spec.input_name, x)
        binding.bind_output(self.spec.output_name, device, self.options.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def runtime_info(self) -> dict:
        return {
            "backend": "onnxruntime",
            "onnxruntime": ort.__version__,
            "providers": list(self.providers),
            "io_binding": self.io_binding,
            "model_sha256": self.model_dir.model_sha256,
            "file": self.spec.file,
        }


def _options(options: OrtOptions | None, providers: Sequence[str] | None, threads: int | None) -> OrtOptions:
    if options is not None:
        return options
    return OrtOptions(providers=tuple(providers or ()), intra_op_threads=threads or 0)


class ImageEncoder(_OnnxEncoder):
    """PIL images (or preprocessed NCHW arrays) -> L2-normalised float32 embeddings."""

    def __init__(self, model_dir: ModelDirectory | str, *, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None, options: OrtOptions | None = None) -> None:
        md = model_dir if isinstance(model_dir, ModelDirectory) else ModelDirectory(model_dir)
        super().__init__(md, md.manifest.image_encoder, _options(options, providers, intra_op_threads))
        self.preprocessor = ImagePreprocessor(md.manifest.preprocess)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Normalised float32 NCHW pixels (``ImagePreprocessor.batch``) -> embeddings."""
        return self._run(pixels)

    def encode_uint8(self, pixels: np.ndarray) -> np.ndarray:
        """Resized and cropped uint8 pixels, (N, H, W, 3) or (N, 3, H, W), not normalised
        (``ImagePreprocessor.to_uint8``, stacked) -> embeddings; normalised here per batch."""
        return self._run(self.preprocessor.normalise(pixels))

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._run(self.preprocessor.batch(images))


class TextEncoder(_OnnxEncoder):
    """Strings -> L2-normalised float32 embeddings, tokenised like open_clip."""

    def __init__(self, model_dir: ModelDirectory | str, *, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None, options: OrtOptions | None = None) -> None:
        md = model_dir if isinstance(model_dir, ModelDirectory) else ModelDirectory(model_dir)
        super().__init__(md, md.manifest.text_encoder, _options(options, providers, intra_op_threads))
        self.tokenizer = ClipTokenizer(md.manifest.tokenizer, md.file(md.manifest.tokenizer.file))

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self._run(tokens)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._run(self.tokenizer(list(texts)))
