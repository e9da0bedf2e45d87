"""``moderator export --quantize int8``: static QDQ int8 image encoder, manifest record, errors.

The model is a two-layer ViT with random weights (written here as an open_clip
config): the architecture the service runs in production, and, unlike the
random ``moderator-tiny`` ResNet, whose embeddings barely depend on the image,
one whose embeddings differ between images, so closeness to fp32 means something.
"""

import hashlib
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from moderator.decode import decode_image
from moderator.encode import ImageEncoder, ModelDirectory
from moderator.errors import ChecksumMismatch, ModelError

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402

from moderator.cli import main  # noqa: E402
from moderator.model.export import export_model, load_model  # noqa: E402
from moderator.model.quantize import (  # noqa: E402
    CALIBRATION_INVALID,
    QUANTIZED_IMAGE_ONNX,
    export_quantized,
    quantize_model_dir,
)
from moderator.model.synth import iter_samples  # noqa: E402

VIT_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
CALIBRATION_IMAGES = 12
# Measured on this model (onnxruntime 1.31, 24 held-out images): cosine to fp32 >= 0.99986,
# cosine of the image-dependent part (embedding minus the fp32 mean) >= 0.997.
MIN_COSINE = 0.999
MIN_CENTRED_COSINE = 0.98


def _encoded(img: Image.Image, i: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if i % 2 else "PNG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def vit_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "test-vit-tiny.json"
    path.write_text(json.dumps(VIT_CONFIG))
    return path


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory):
    """Training-split images, JPEG and PNG, plus two files that do not decode."""
    d = tmp_path_factory.mktemp("calibration")
    for i, s in enumerate(iter_samples(CALIBRATION_IMAGES, 0, "train", size=80)):
        (d / f"{i:02d}.{'jpg' if i % 2 else 'png'}").write_bytes(_encoded(s.image, i))
    (d / "notes.txt").write_text("not an image")
    (d / "broken.png").write_bytes((d / "00.png").read_bytes()[:200])  # truncated
    return d


@pytest.fixture(scope="module")
def heldout_images():
    """Held-out images (a different seed stream from calibration), decoded as the worker does."""
    return [decode_image(_encoded(s.image, i)).image for i, s in enumerate(iter_samples(24, 0, "heldout", size=88))]


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory, vit_config):
    out = tmp_path_factory.mktemp("models") / "vit-fp32"
    export_model(load_model("unused", config=vit_config, seed=0), out)
    return out


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory, fp32_dir, calibration_dir):
    out = tmp_path_factory.mktemp("models") / "vit-int8"
    quantize_model_dir(fp32_dir, out, calibration_dir)
    return out


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# --- the quantized directory -------------------------------------------------------------


def test_manifest_records_quantization_and_verifies(int8_dir, fp32_dir, calibration_dir):
    md, src = ModelDirectory(int8_dir), ModelDirectory(fp32_dir)  # both re-hash every file
    m, q = md.manifest, md.manifest.quantization
    assert src.manifest.quantization is None
    assert m.image_encoder.file == QUANTIZED_IMAGE_ONNX and m.image_encoder.input_dtype == "float32"
    assert set(m.files) == set(src.manifest.files) | {QUANTIZED_IMAGE_ONNX}
    # the fp32 encoder is kept, byte for byte, and named as the source; the text encoder is untouched
    assert q.source_file == src.manifest.image_encoder.file
    assert q.source_sha256 == m.files[q.source_file] == src.manifest.files[q.source_file]
    assert m.files[m.text_encoder.file] == src.manifest.files[m.text_encoder.file]
    assert md.model_sha256 != src.model_sha256
    assert q.method == "static_qdq_int8" and q.weight_type == "int8" and q.activation_type == "uint8"
    assert q.per_channel is True and q.calibrate_method == "minmax" and q.reduce_range is True
    assert q.onnxruntime == ort.__version__
    # every decodable image was used (fewer than the default 200); the two others were skipped
    assert (q.calibration_images, q.calibration_skipped) == (CALIBRATION_IMAGES, 2)
    digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in calibration_dir.iterdir() if p.suffix in (".png", ".jpg") and p.name != "broken.png")
    assert q.calibration_sha256 == hashlib.sha256("\n".join(digests).encode()).hexdigest()
    assert MIN_COSINE < q.calibration_cosine_min < 1.0
    assert json.loads((int8_dir / "manifest.json").read_text())["quantization"]["source_file"] == q.source_file


def test_tampered_int8_encoder_is_refused(int8_dir, tmp_path):
    copy = shutil.copytree(int8_dir, tmp_path / "copy")
    with open(copy / QUANTIZED_IMAGE_ONNX, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumMismatch, match=QUANTIZED_IMAGE_ONNX):
        ModelDirectory(copy)


def test_graph_is_qdq_with_int8_weights(int8_dir):
    graph = onnx.load(str(int8_dir / QUANTIZED_IMAGE_ONNX)).graph
    producer = {o: n for n in graph.node for o in n.output}
    init = {t.name: t for t in graph.initializer}
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8

    def int8_weight(name):
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in init:
            return False
        w = init[dq.input[0]]
        return w.data_type == onnx.TensorProto.INT8 and len(w.dims) >= 2

    def quantized_activation(name):
        dq = producer.get(name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return q is not None and q.op_type == "QuantizeLinear" and init[q.input[2]].data_type == onnx.TensorProto.UINT8

    def constant(name):  # a weight: an initializer, or dequantized from one
        dq = producer.get(name)
        return name in init or (dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in init)

    weight_ops = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and constant(n.input[1])]
    # patch embedding (Conv), attention in/out projections, MLP, final projection: 2 layers * 4 + 2
    assert len(weight_ops) >= 10
    float_weights = [n.name for n in weight_ops if not int8_weight(n.input[1])]
    assert not float_weights, f"weights left in float: {float_weights}"
    assert all(quantized_activation(n.input[0]) for n in weight_ops)
    # the int8 file is smaller than the fp32 one: the weights really are stored as 8 bits
    assert (int8_dir / QUANTIZED_IMAGE_ONNX).stat().st_size < 0.6 * (int8_dir / "image_encoder.onnx").stat().st_size


def test_int8_encoder_serves_close_to_fp32(int8_dir, fp32_dir, heldout_images):
    int8, fp32 = ImageEncoder(int8_dir), ImageEncoder(fp32_dir)
    assert int8.runtime_info()["file"] == QUANTIZED_IMAGE_ONNX
    a, b = fp32.encode(heldout_images), int8.encode(heldout_images)
    assert b.shape == a.shape and b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.abs(a - b).max() > 1e-5, "int8 embeddings equal fp32: nothing was quantized"
    assert float(np.sum(a * b, axis=1).min()) > MIN_COSINE
    # the image-dependent part survives too (not just the direction every embedding shares)
    mean = a.mean(axis=0)
    ac, bc = a - mean, b - mean
    centred = np.sum(ac * bc, axis=1) / np.linalg.norm(ac, axis=1) / np.linalg.norm(bc, axis=1)
    assert float(centred.min()) > MIN_CENTRED_COSINE
    # batching does not change the answer
    np.testing.assert_allclose(int8.encode(heldout_images[:1]), b[:1], atol=1e-5)


def test_serving_path_needs_neither_torch_nor_onnx(int8_dir):
    """The worker's image has onnxruntime only: the int8 directory must load and run there."""
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('torch', 'open_clip', 'onnx'): raise ImportError(name + ' is banned here')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from moderator.encode import ImageEncoder\n"
        "from PIL import Image\n"
        f"e = ImageEncoder({str(int8_dir)!r})\n"
        "print(e.encode([Image.new('RGB', (50, 40), 'red')]).shape, e.runtime_info()['file'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == QUANTIZED_IMAGE_ONNX


def test_resnet_tower_quantizes_close_to_fp32(random_model_dir, calibration_dir, heldout_images, tmp_path):
    """The demo architecture (ModifiedResNet + attention pooling). Its attention's two
    activation-by-activation MatMuls must stay float: quantized, they turned this model's
    embeddings to cosine 0.59 with fp32."""
    md = quantize_model_dir(random_model_dir, tmp_path / "int8", calibration_dir, calibration_images=8)
    graph = onnx.load(str(md.file(QUANTIZED_IMAGE_ONNX))).graph
    assert sum(n.op_type == "Conv" for n in graph.node) >= 10
    assert sum(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 for t in graph.initializer) >= 10
    a = ImageEncoder(random_model_dir).encode(heldout_images)
    b = ImageEncoder(md).encode(heldout_images)
    assert np.abs(a - b).max() > 1e-5
    assert float(np.sum(a * b, axis=1).min()) > MIN_COSINE


def test_quantize_again_in_place_from_the_kept_fp32_encoder(int8_dir, calibration_dir, tmp_path):
    copy = shutil.copytree(int8_dir, tmp_path / "copy")
    before = ModelDirectory(copy).manifest.quantization
    with pytest.raises(ModelError, match="already exists"):
        quantize_model_dir(copy, copy, calibration_dir)
    md = quantize_model_dir(copy, copy, calibration_dir, calibration_images=4, overwrite=True)
    q = md.manifest.quantization
    assert (q.source_file, q.source_sha256) == (before.source_file, before.source_sha256)
    assert q.calibration_images == 4 and q.calibration_sha256 != before.calibration_sha256
    assert md.manifest.image_encoder.file == QUANTIZED_IMAGE_ONNX
    assert _leftovers(tmp_path, "copy") == []


def test_cli_export_quantize_int8(tmp_path, vit_config, calibration_dir, capsys):
    out = tmp_path / "cli-int8"
    rc = main(["export", "--config", str(vit_config), "--seed", "0", "--quantize", "int8",
               "--calibration-dir", str(calibration_dir), "--calibration-images", "8", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["quantization"]["calibration_images"] == 8
    md = ModelDirectory(out)
    assert md.manifest.image_encoder.file == QUANTIZED_IMAGE_ONNX and md.manifest.quantization is not None
    assert printed["model_sha256"] == md.model_sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli-int8"]  # no temporary fp32 export left


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "holds no files"),
    ("only_subdirs", "subdirectories are not searched"),
    ("not_images", "none of its 2 files decodes"),
    ("none", "--calibration-dir"),
])
def test_unusable_calibration_dir(case, message, fp32_dir, tmp_path):
    d = tmp_path / "calib"
    if case != "missing":
        d.mkdir()
    if case == "only_subdirs":
        (d / "cats").mkdir()
        Image.new("RGB", (32, 32)).save(d / "cats" / "a.png")
    if case == "not_images":
        (d / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        (d / "b.txt").write_text("hello")
    out = tmp_path / "out"
    with pytest.raises(ModelError, match=message) as e:
        quantize_model_dir(fp32_dir, out, None if case == "none" else d)
    assert e.value.reason == CALIBRATION_INVALID
    assert not out.exists() and _leftovers(tmp_path, "out") == []


def test_zero_calibration_images_is_refused(fp32_dir, calibration_dir, tmp_path):
    with pytest.raises(ModelError, match="at least 1"):
        quantize_model_dir(fp32_dir, tmp_path / "out", calibration_dir, calibration_images=0)


def test_fp16_directory_is_refused(fp32_dir, calibration_dir, tmp_path):
    fake = shutil.copytree(fp32_dir, tmp_path / "fp16")
    manifest = json.loads((fake / "manifest.json").read_text())
    manifest["precision"] = "fp16"
    manifest["image_encoder"]["input_dtype"] = "float16"
    (fake / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="fp16 export"):
        quantize_model_dir(fake, tmp_path / "out", calibration_dir)
    with pytest.raises(ModelError, match="--precision fp16"):
        export_quantized(lambda: pytest.fail("the model must not be loaded"), tmp_path / "out",
                         calibration_dir, precision="fp16")


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int8"], "error [calibration_invalid]: int8 quantization needs calibration images: "
                             "pass --calibration-dir"),
    (["--quantize", "int8", "--precision", "fp16", "--calibration-dir", "{calib}"],
     "cannot be combined with --precision fp16"),
    (["--quantize", "int8", "--calibration-dir", "{tmp}/nowhere"], "nowhere does not exist"),
    (["--calibration-dir", "{calib}"], "--calibration-dir is only used with --quantize int8"),
])
def test_cli_argument_errors_are_named(args, message, tmp_path, calibration_dir, capsys):
    args = [a.format(calib=calibration_dir, tmp=tmp_path) for a in args]
    rc = main(["export", "--model", "moderator-tiny", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
