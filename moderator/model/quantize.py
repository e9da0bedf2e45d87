"""``moderator export --quantize int8``: a static QDQ int8 image encoder.

Static quantization fixes every activation's int8 range ahead of time from
*calibration images*: real images run through the serving path's own decoding
(``moderator.decode.decode_image``) and preprocessing (``ImagePreprocessor``),
so the ranges are those of the pixels the worker will feed. The graph is QDQ
(QuantizeLinear/DequantizeLinear pairs around float ops): ONNX Runtime's CPU
provider fuses them into integer kernels, TensorRT reads them as int8 layers.

Only the image encoder is quantized. The text encoder stays fp32 because it is
not on the per-image path: policy prompt embeddings are computed once per policy
version and cached (Redis), so int8 would save nothing per image and would only
move every category's reference point.

The fp32 image encoder stays in the directory next to the int8 one (named by
``quantization.source_file``). The directory already carries the fp32 weights as
safetensors, so the extra file adds the size of one encoder; in exchange a
quantized directory can be quantized again (``quantize_model_dir`` on its own
output, say with other calibration images) and compared with its reference
without torch. The worker serves ``image_encoder.file``: the int8 file.

Choices, measured (demo model: held-out zero-shot accuracy; ViT-B-32 with random
weights: cosine to fp32 on held-out images):

- only the weight-bearing ops (Conv, MatMul, Gemm) are quantized. Quantizing every
  op ORT can (residual Adds, Muls, Softmax too) ran ~20% faster on ViT-B-32 but
  cost ten times the error (mean cosine 0.990 instead of 0.9996);
- MatMuls with no weight (attention's scores and weighted sum) stay float: on the
  random-weight ResNet they alone took the cosine to fp32 from 0.9999 to 0.59;
- MinMax calibration: Entropy and Percentile were within noise of it on both
  models, and are slower and hold histograms of every activation;
- per-channel weights: as fast as per-tensor on ORT's CPU kernels, a little
  closer to fp32 on the convolutional demo model;
- uint8 activations and int8 weights (U8S8, the pair ORT's x86 kernels are built
  for). ``activation_type="int8"`` gives symmetric int8 activations, the form
  TensorRT needs (zero point 0).

int8 pays off on real encoders (ViT-B-32: about 2.3x the images/s of fp32 on
CPU); on the tiny demo model the Quantize/Dequantize steps cost more than the
integer arithmetic saves, and fp32 is faster.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import random
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, get_args

import numpy as np

from moderator.decode import DecodeLimits, decode_image
from moderator.encode.model_dir import MANIFEST_FILE, ModelDirectory, sha256_file, staged_directory
from moderator.encode.preprocess import ImagePreprocessor
from moderator.errors import InputError, MissingDependency, ModelError, PayloadTooLarge
from moderator.schemas import EncoderFile, QuantActivations, QuantCalibration, Quantization

if TYPE_CHECKING:
    from moderator.model.export import LoadedModel

log = logging.getLogger(__name__)

QUANTIZED_IMAGE_ONNX = "image_encoder.int8.onnx"
DEFAULT_CALIBRATION_IMAGES = 200
CALIBRATION_BATCH = 16
PARITY_IMAGES = 32  # calibration images re-encoded by both encoders for the manifest's cosine record
OP_TYPES_TO_QUANTIZE = ("Conv", "MatMul", "Gemm")  # weights only; see the module docstring
CalibrateMethod = QuantCalibration
ActivationType = QuantActivations
CALIBRATE_METHODS: tuple[str, ...] = get_args(CalibrateMethod)
ACTIVATION_TYPES: tuple[str, ...] = get_args(ActivationType)

CALIBRATION_INVALID = "calibration_invalid"  # the ModelError reason for unusable calibration images


def _calibration_error(message: str) -> ModelError:
    return ModelError(message, reason=CALIBRATION_INVALID)


# --- calibration images --------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationSet:
    """The calibration images chosen from a directory: paths and content digests, no pixels.

    Files directly in the directory (not its subdirectories) are tried in a seeded
    shuffle of their sorted names, so a directory sorted by class still yields a
    mix; files that do not decode are skipped (counted, never fatal unless none
    decodes). ``sha256`` identifies the set by content: the digest of the sorted
    sha256 digests of the images used.
    """

    directory: Path
    paths: tuple[Path, ...]
    image_sha256: tuple[str, ...]
    skipped: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.image_sha256)).encode()).hexdigest()

    @classmethod
    def scan(cls, directory: str | Path | None, limit: int = DEFAULT_CALIBRATION_IMAGES, *,
             limits: DecodeLimits = DecodeLimits(), seed: int = 0) -> "CalibrationSet":
        if directory is None:
            raise _calibration_error(
                "int8 quantization needs calibration images: pass --calibration-dir DIR "
                "(a directory of typical input images)"
            )
        directory = Path(directory)
        if limit < 1:
            raise _calibration_error(f"the number of calibration images must be at least 1, not {limit}")
        if not directory.exists():
            raise _calibration_error(f"calibration directory {directory} does not exist")
        if not directory.is_dir():
            raise _calibration_error(f"calibration directory {directory} is not a directory")
        candidates = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
        if not candidates:
            hint = " (subdirectories are not searched)" if any(p.is_dir() for p in directory.iterdir()) else ""
            raise _calibration_error(f"calibration directory {directory} holds no files{hint}")
        random.Random(seed).shuffle(candidates)
        paths, digests, skipped, first_failure = [], [], 0, None
        for p in candidates:
            if len(paths) == limit:
                break
            try:
                if p.stat().st_size > limits.max_bytes:
                    raise PayloadTooLarge(f"larger than the {limits.max_bytes} byte cap")
                digest = decode_image(p.read_bytes(), limits).sha256
            except (InputError, OSError) as e:
                skipped += 1
                first_failure = first_failure or f"{p.name}: {e}"
                log.debug("calibration: skipping %s (%s)", p, e)
                continue
            paths.append(p)
            digests.append(digest)
        if not paths:
            raise _calibration_error(
                f"calibration directory {directory}: none of its {len(candidates)} files decodes as an "
                f"image (first failure: {first_failure})"
            )
        if skipped:
            log.warning("calibration: skipped %d file(s) in %s that do not decode", skipped, directory)
        return cls(directory, tuple(paths), tuple(digests), skipped)

    def pixels(self, preprocessor: ImagePreprocessor, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
        """Decode the chosen files again (same bytes, checked) and preprocess them: float32 NCHW."""
        arrays = []
        for p, expected in zip(self.paths, self.image_sha256):
            try:
                decoded = decode_image(p.read_bytes(), limits)
            except (InputError, OSError) as e:
                raise _calibration_error(f"calibration image {p} no longer decodes: {e}") from e
            if decoded.sha256 != expected:
                raise _calibration_error(f"calibration image {p} changed while quantizing")
            arrays.append(preprocessor.to_array(decoded.image))
        return np.ascontiguousarray(np.stack(arrays))


def _calibration_reader(input_name: str, pixels: np.ndarray, batch: int = CALIBRATION_BATCH):
    """A ``CalibrationDataReader`` over preprocessed pixels, in batches.

    Supports ``set_range`` so ORT's strided calibration collects one batch at a
    time: histogram calibrators otherwise hold every activation of every image.
    """
    from onnxruntime.quantization import CalibrationDataReader  # noqa: PLC0415

    class PixelReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = [pixels[i:i + batch] for i in range(0, len(pixels), batch)]
            self.set_range(0, len(self.batches))

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._next, self._end = start_index, min(end_index, len(self.batches))

        def get_next(self) -> dict | None:
            if self._next >= self._end:
                return None
            self._next += 1
            return {input_name: self.batches[self._next - 1]}

    return PixelReader()


# --- quantization --------------------------------------------------------------------


def _ort_session(path: Path):
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _ort_version() -> str:
    import onnxruntime as ort  # noqa: PLC0415

    return ort.__version__


def _embed(session, input_name: str, pixels: np.ndarray) -> np.ndarray:
    out = np.concatenate([session.run(None, {input_name: pixels[i:i + CALIBRATION_BATCH]})[0]
                          for i in range(0, len(pixels), CALIBRATION_BATCH)]).astype(np.float32)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _quantize_onnx(src: Path, dest: Path, work: Path, input_name: str, pixels: np.ndarray, *,
                   per_channel: bool, calibrate_method: CalibrateMethod,
                   activation_type: ActivationType, reduce_range: bool) -> str:
    """ORT's pre-processing (as far as it succeeds) then ``quantize_static``. Returns the
    pre-processing that ran: ``full``, ``onnx_shapes`` or ``none``."""
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    # ORT's symbolic shape inference does not follow every graph torch.onnx writes (it fails on
    # the Expand of ModifiedResNet's attention pool), so fall back to ONNX shape inference alone,
    # then to the model as exported; the manifest records which step ran.
    model_in, preprocessed = src, "none"
    for step, kwargs in (("full", {}), ("onnx_shapes", {"skip_symbolic_shape": True})):
        pre = work / f"preprocessed-{step}.onnx"
        try:
            quant_pre_process(str(src), str(pre), **kwargs)
        except Exception as e:  # ORT's optimiser and shape inference raise many types
            log.info("quantization pre-processing (%s) of %s failed: %s: %s", step, src.name, type(e).__name__, e)
            continue
        model_in, preprocessed = pre, step
        break
    else:
        log.warning("quantization pre-processing of %s failed; quantizing the model as exported", src.name)
    exclude = _activation_matmuls(model_in)
    reader = _calibration_reader(input_name, pixels)
    root = logging.getLogger()
    quiet = _OrtAdvice()
    root.addFilter(quiet)
    try:
        # the histogram calibrators print progress to stdout
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(model_in), str(dest), reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(OP_TYPES_TO_QUANTIZE),
                nodes_to_exclude=exclude,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[calibrate_method],
                extra_options={
                    "CalibStridedMinMax": 1,  # one batch at a time (see _calibration_reader)
                    # int8 activations are for TensorRT, which takes symmetric ranges only (zero point 0)
                    "ActivationSymmetric": activation_type == "int8",
                },
            )
    except Exception as e:  # onnxruntime raises ValueError, RuntimeError and its own types
        raise ModelError(f"ONNX Runtime could not quantize {src.name}: {type(e).__name__}: {e}") from e
    finally:
        root.removeFilter(quiet)
    return preprocessed


def _activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes with no constant input: attention's scores and weighted sum.

    They hold no weights to shrink, are small next to the projections, and
    quantizing both of their inputs is where the error came from (ORT's
    ``MatMulConstBOnly`` does this for QOperator graphs only, not QDQ).
    """
    import onnx  # noqa: PLC0415

    graph = onnx.load(str(path), load_external_data=False).graph
    constant = {t.name for t in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and not any(i in constant for i in n.input)]


class _OrtAdvice(logging.Filter):
    """Drops the advice ORT's quantizer logs through the root logger ("consider pre-processing")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname


def _check_options(calibrate_method: str, activation_type: str) -> None:
    if calibrate_method not in CALIBRATE_METHODS:
        raise ModelError(f"unknown calibration method {calibrate_method!r}; known: {', '.join(CALIBRATE_METHODS)}")
    if activation_type not in ACTIVATION_TYPES:
        raise ModelError(f"unknown activation type {activation_type!r}; known: {', '.join(ACTIVATION_TYPES)}")
    try:
        import onnx  # noqa: F401, PLC0415
        import onnxruntime.quantization  # noqa: F401, PLC0415
    except ImportError as e:
        raise MissingDependency(
            f"int8 quantization needs onnx ({e.name} is missing): pip install 'moderator[train]'"
        ) from e


def quantized_weights(path: str | Path) -> list[str]:
    """Names of the 8-bit weight tensors (rank >= 2) that feed a DequantizeLinear in the
    graph at ``path``: empty when quantization left every weight in float."""
    import onnx  # noqa: PLC0415

    graph = onnx.load(str(path)).graph
    eight_bit = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    weights = {t.name for t in graph.initializer if t.data_type in eight_bit and len(t.dims) >= 2}
    return sorted({n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights})


def quantize_model_dir(
    src_dir: str | Path,
    out_dir: str | Path,
    calibration_dir: str | Path,
    *,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    per_channel: bool = True,
    calibrate_method: CalibrateMethod = "minmax",
    activation_type: ActivationType = "uint8",
    reduce_range: bool = True,
    overwrite: bool = False,
) -> ModelDirectory:
    """Write ``out_dir``: ``src_dir`` with a static QDQ int8 image encoder serving.

    ``reduce_range`` (default): 7-bit weights. ONNX Runtime's uint8 x int8 kernels on x86
    CPUs without VNNI (AVX2, AVX-512 before VNNI) saturate on full-range weights: measured
    here (AMD EPYC, AVX2), a ViT's int8-vs-fp32 cosine fell from above 0.999 to 0.989.
    An int8 model may be served on any CPU, so the safe range is the default; ``False``
    only for fleets that all have VNNI (or ARM).

    ``src_dir`` is an exported fp32 model directory (or an already quantized one:
    it is quantized again from its kept fp32 encoder). ``out_dir`` may be
    ``src_dir`` itself with ``overwrite=True``. Written atomically (temp dir, then
    rename); the manifest lists every file's sha256 and records the quantization.
    """
    _check_options(calibrate_method, activation_type)
    src = ModelDirectory(src_dir)  # verifies every checksum before anything is built on it
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ModelError(f"{out_dir} already exists (pass --overwrite to replace it)")
    m = src.manifest
    if m.precision != "fp32" or m.image_encoder.input_dtype != "float32":
        raise ModelError(
            f"{src.path} is a {m.precision} export; int8 quantization starts from fp32 encoders "
            "(export with --precision fp32)"
        )
    calibration = CalibrationSet.scan(calibration_dir, calibration_images)
    source_file = m.quantization.source_file if m.quantization else m.image_encoder.file
    spec = m.image_encoder

    with staged_directory(out_dir) as tmp:
        pixels = calibration.pixels(ImagePreprocessor(m.preprocess))
        with tempfile.TemporaryDirectory(prefix="quantize.", dir=tmp) as work:
            preprocessed = _quantize_onnx(
                src.file(source_file), tmp / QUANTIZED_IMAGE_ONNX, Path(work), spec.input_name, pixels,
                per_channel=per_channel, calibrate_method=calibrate_method, activation_type=activation_type,
                reduce_range=reduce_range,
            )
        if not quantized_weights(tmp / QUANTIZED_IMAGE_ONNX):
            raise ModelError(f"quantizing {source_file} left every weight in float; refusing to label it int8")
        try:
            probe = pixels[:PARITY_IMAGES]
            reference = _embed(_ort_session(src.file(source_file)), spec.input_name, probe)
            quantized = _embed(_ort_session(tmp / QUANTIZED_IMAGE_ONNX), spec.input_name, probe)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError(f"the quantized image encoder does not run: {type(e).__name__}: {e}") from e
        cosine = np.sum(reference * quantized, axis=1)
        if not np.all(np.isfinite(cosine)):
            raise ModelError("the quantized image encoder produces non-finite embeddings")

        for name in m.files:
            if name != QUANTIZED_IMAGE_ONNX:
                shutil.copy2(src.file(name), tmp / name)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = m.model_copy(update={
            "image_encoder": EncoderFile(file=QUANTIZED_IMAGE_ONNX, input_name=spec.input_name,
                                         output_name=spec.output_name, input_dtype="float32"),
            "files": files,
            "quantization": Quantization(
                method="static_qdq_int8", source_file=source_file, source_sha256=files[source_file],
                calibration_images=len(calibration.paths), calibration_skipped=calibration.skipped,
                calibration_sha256=calibration.sha256, calibrate_method=calibrate_method,
                per_channel=per_channel, reduce_range=reduce_range, activation_type=activation_type,
                weight_type="int8", op_types=list(OP_TYPES_TO_QUANTIZE), ort_preprocess=preprocessed,
                calibration_cosine_min=round(float(cosine.min()), 6),
                calibration_cosine_mean=round(float(cosine.mean()), 6),
                onnxruntime=_ort_version(),
                quantized_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            ),
        })
        manifest = type(m).model_validate(manifest.model_dump())  # re-validate the updated copy
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    log.info("quantized %s -> %s on %d calibration images (cosine to fp32 min %.4f)",
             source_file, out_dir / QUANTIZED_IMAGE_ONNX, len(calibration.paths), float(cosine.min()))
    return ModelDirectory(out_dir)


def export_quantized(
    model: "LoadedModel | Callable[[], LoadedModel]",
    out_dir: str | Path,
    calibration_dir: str | Path | None,
    *,
    precision: str = "fp32",
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    per_channel: bool = True,
    calibrate_method: CalibrateMethod = "minmax",
    activation_type: ActivationType = "uint8",
    reduce_range: bool = True,
    overwrite: bool = False,
) -> ModelDirectory:
    """``moderator export --quantize int8``: export fp32, then ``quantize_model_dir`` into ``out_dir``.

    ``model`` may be a function that loads it, so that argument and calibration
    errors surface before minutes go into building and exporting the model.
    """
    from moderator.model.export import export_model  # noqa: PLC0415

    if precision != "fp32":
        raise ModelError(
            f"--quantize int8 starts from fp32 encoders; it cannot be combined with --precision {precision}"
        )
    _check_options(calibrate_method, activation_type)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ModelError(f"{out_dir} already exists (pass --overwrite to replace it)")
    CalibrationSet.scan(calibration_dir, calibration_images)  # fail now, not after the export
    loaded = model() if callable(model) else model
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.fp32.", dir=out_dir.parent) as work:
        fp32 = export_model(loaded, Path(work) / "fp32")
        return quantize_model_dir(
            fp32.path, out_dir, calibration_dir, calibration_images=calibration_images,
            per_channel=per_channel, calibrate_method=calibrate_method, activation_type=activation_type,
            reduce_range=reduce_range, overwrite=overwrite,
        )
