"""Export + runtime: ONNX vs torch parity, dynamic batch, manifest integrity, providers."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from moderator.encode import ImageEncoder, ModelDirectory, TextEncoder, choose_providers, ensemble_embeddings
from moderator.errors import ChecksumMismatch, ModelError

pytest.importorskip("torch")
from moderator.encode.torch_backend import TorchImageEncoder, TorchTextEncoder  # noqa: E402

REL_TOL = 1e-4


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def _decoded_images(n: int) -> list[Image.Image]:
    """Real encoded files (JPEG and PNG) decoded by Pillow, of assorted sizes and modes."""
    from moderator.model.synth import draw_sample

    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        s = draw_sample(rng, size=80 + 7 * (i % 5))
        buf = io.BytesIO()
        s.image.save(buf, format="JPEG" if i % 2 else "PNG", quality=85)
        buf.seek(0)
        out.append(Image.open(buf).convert("RGB"))
    return out


@pytest.fixture(scope="module")
def encoders(random_model_dir):
    md = ModelDirectory(random_model_dir)
    return ImageEncoder(md), TextEncoder(md), TorchImageEncoder(md), TorchTextEncoder(md)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_image_parity_random_pixels(encoders, batch):
    onnx_img, _, torch_img, _ = encoders
    h, w = onnx_img.preprocessor.image_size
    x = np.random.default_rng(batch).standard_normal((batch, 3, h, w)).astype(np.float32)
    a, b = onnx_img.encode_pixels(x), torch_img.encode_pixels(x)
    assert a.shape == (batch, onnx_img.model_dir.manifest.embed_dim) and a.dtype == np.float32
    assert _rel_err(a, b) < REL_TOL
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_onnx_encode_uint8_equals_encode_pixels(encoders):
    """The worker's path (uint8 per image, normalised per batch) gives the same embeddings,
    bit for bit, as normalised float32 pixels."""
    onnx_img = encoders[0]
    h, w = onnx_img.preprocessor.image_size
    u8 = np.random.default_rng(3).integers(0, 256, (5, h, w, 3), dtype=np.uint8)
    expected = onnx_img.encode_pixels(onnx_img.preprocessor.batch([Image.fromarray(a) for a in u8]))
    np.testing.assert_array_equal(onnx_img.encode_uint8(u8), expected)
    np.testing.assert_array_equal(onnx_img.encode_uint8(np.ascontiguousarray(u8.transpose(0, 3, 1, 2))), expected)
    with pytest.raises(ValueError, match="uint8"):
        onnx_img.encode_uint8(u8.astype(np.float32))


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_image_parity_decoded_files(encoders, batch):
    onnx_img, _, torch_img, _ = encoders
    imgs = _decoded_images(batch)
    assert _rel_err(onnx_img.encode(imgs), torch_img.encode(imgs)) < REL_TOL


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_text_parity(encoders, batch):
    _, onnx_txt, _, torch_txt = encoders
    texts = [f"a photo of item {i} 😀 Ünïcödé" + " long" * (i * 5) for i in range(batch)]
    a, b = onnx_txt.encode(texts), torch_txt.encode(texts)
    assert a.shape == (batch, onnx_txt.model_dir.manifest.embed_dim)
    assert _rel_err(a, b) < REL_TOL
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_empty_batch(encoders):
    onnx_img, onnx_txt, _, _ = encoders
    assert onnx_img.encode([]).shape == (0, onnx_img.model_dir.manifest.embed_dim)
    assert onnx_txt.encode([]).shape == (0, onnx_txt.model_dir.manifest.embed_dim)


def test_template_ensemble_is_renormalised_mean(encoders):
    _, onnx_txt, _, _ = encoders
    templates = ("a photo of {}.", "a drawing of {}.", "{}")
    ens = ensemble_embeddings(onnx_txt, ["a red star", "a blue circle"], templates)
    single = onnx_txt.encode([t.format("a red star") for t in templates])
    expected = single.mean(0) / np.linalg.norm(single.mean(0))
    np.testing.assert_allclose(ens[0], expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ens, axis=1), 1.0, atol=1e-6)


def test_manifest_describes_the_export(random_model_dir):
    import hashlib
    import json

    import onnx

    md = ModelDirectory(random_model_dir)
    m = md.manifest
    assert m.weights.kind == "random" and m.architecture == "moderator-tiny"
    # what the manifest says is what the files are: digests, and the graphs' own inputs/outputs
    for name, digest in m.files.items():
        assert hashlib.sha256((random_model_dir / name).read_bytes()).hexdigest() == digest, name
    assert set(m.files) == {"image_encoder.onnx", "text_encoder.onnx", "tokenizer.json", "open_clip_model.safetensors"}

    def io(file):
        g = onnx.load(str(random_model_dir / file), load_external_data=False).graph
        dims = lambda v: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]  # noqa: E731
        return {i.name: dims(i) for i in g.input}, {o.name: dims(o) for o in g.output}

    ins, outs = io(m.image_encoder.file)
    h, w = m.preprocess.image_size
    assert list(ins) == [m.image_encoder.input_name] and ins[m.image_encoder.input_name][1:] == [3, h, w]
    assert outs[m.image_encoder.output_name][-1] == m.embed_dim
    ins, outs = io(m.text_encoder.file)
    assert ins[m.text_encoder.input_name][-1] == m.tokenizer.context_length
    assert outs[m.text_encoder.output_name][-1] == m.embed_dim
    cfg = json.loads(json.dumps(m.model_config_json)) if not isinstance(m.model_config_json, str) else json.loads(
        m.model_config_json)
    assert cfg["embed_dim"] == m.embed_dim and cfg["vision_cfg"]["image_size"] == h
    assert cfg["text_cfg"]["context_length"] == m.tokenizer.context_length
    assert {"torch", "open_clip", "onnx", "opset", "moderator"} <= set(m.exporter)
    assert m.logit_scale > 0 and len(md.model_sha256) == 64


def test_tampered_file_is_refused(random_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(random_model_dir, copy)
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(ChecksumMismatch):
        ModelDirectory(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="manifest"):
        ModelDirectory(copy)


def test_provider_choice(random_model_dir):
    import onnxruntime as ort

    chosen = choose_providers()
    available = ort.get_available_providers()
    # the preferred order, restricted to what this build has, CPU last
    assert chosen == [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
                      if p in available]
    assert chosen[-1] == "CPUExecutionProvider"
    # and the sessions really run with them, in that order (what ONNX Runtime reports back)
    assert ImageEncoder(random_model_dir).runtime_info()["providers"] == chosen
    assert TextEncoder(random_model_dir).runtime_info()["providers"] == chosen
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        with pytest.raises(ModelError, match=r"not available.*moderator\[gpu\]"):
            choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ModelError, match="not available"):
        choose_providers(["NoSuchExecutionProvider"])


def test_runtime_serves_without_torch(random_model_dir):
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('torch', 'open_clip'): raise ImportError('torch is banned here')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from moderator.encode import ImageEncoder, TextEncoder\n"
        "from PIL import Image\n"
        f"d = {str(random_model_dir)!r}\n"
        "e = ImageEncoder(d).encode([Image.new('RGB', (50, 40), 'red')])\n"
        "t = TextEncoder(d).encode(['a red square'])\n"
        "print(e.shape, t.shape, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"


@pytest.mark.slow
def test_fp16_export_runs(tmp_path):
    from moderator.model.export import export_model, load_model

    md = export_model(load_model("moderator-tiny", seed=3), tmp_path / "fp16", precision="fp16")
    assert md.manifest.precision == "fp16" and md.manifest.image_encoder.input_dtype == "float16"
    fp32 = export_model(load_model("moderator-tiny", seed=3), tmp_path / "fp32")
    imgs = _decoded_images(3)
    a, b = ImageEncoder(md).encode(imgs), ImageEncoder(fp32).encode(imgs)
    assert a.dtype == np.float32
    assert _rel_err(a, b) < 2e-2  # half precision: close, not exact
    t16 = TextEncoder(md).encode(["a red star"])
    t32 = TextEncoder(fp32).encode(["a red star"])
    assert _rel_err(t16, t32) < 2e-2


def test_export_refuses_to_clobber(random_model_dir):
    from moderator.model.export import export_model, load_model

    with pytest.raises(ModelError, match="already exists"):
        export_model(load_model("moderator-tiny", seed=0), random_model_dir)


def test_pretrained_tag_offline_fails_clearly(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "moderator.cli", "export", "--model", "ViT-B-32", "--pretrained", "openai",
         "--out", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HOME": str(tmp_path / "hf")},
    )
    assert out.returncode == 2, out.stderr
    assert "weights_unavailable" in out.stderr and "--checkpoint" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_tag_lists_known_ones(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "moderator.cli", "export", "--model", "ViT-B-32", "--pretrained", "nope",
         "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "openai" in out.stderr and "Traceback" not in out.stderr


def test_manifest_json_is_valid_json(random_model_dir):
    data = json.loads((random_model_dir / "manifest.json").read_text())
    assert data["format"] == 1
