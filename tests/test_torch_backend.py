"""Torch image encoder: bucketed batches, uint8 and on-device inputs, ONNX parity, CUDA guards.

Runs on the CPU (no pinning, no graphs; padding to buckets switched on by hand so the
pad-and-slice logic is the one CUDA graphs use). The CUDA-only parts -- graph capture and
replay, pinned staging -- are exercised by ``deploy/bench/gpu_selfcheck.py`` on a GPU.
"""

import numpy as np
import pytest
from PIL import Image

from moderator.encode import ImageEncoder, ModelDirectory
from moderator.errors import ModelError

torch = pytest.importorskip("torch")
from moderator.encode.torch_backend import TorchImageEncoder, batch_buckets, resolve_device  # noqa: E402

REL_TOL = 1e-4  # ONNX vs torch, fp32 (as in test_encoders)
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.fixture(scope="module")
def md(random_model_dir):
    return ModelDirectory(random_model_dir)


@pytest.fixture(scope="module")
def bucketed(md):
    """CPU encoder that pads like the CUDA-graph path: buckets 1, 2, 4, 8."""
    return TorchImageEncoder(md, device="cpu", max_batch=8, pad_batches=True)


@pytest.fixture(scope="module")
def plain(md):
    return TorchImageEncoder(md, device="cpu")


def _uint8_images(md, n: int, seed: int = 0) -> np.ndarray:
    h, w = md.manifest.preprocess.image_size
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_bucket_lists():
    assert batch_buckets(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(1) == (1,)
    with pytest.raises(ModelError):
        batch_buckets(0)


def test_defaults_on_cpu(plain, bucketed, md):
    info = plain.runtime_info()
    assert info["device"] == "cpu" and info["fp16"] is False and info["cuda_graphs"] is False
    assert info["pad_batches"] is False and info["pinned_staging"] is False
    assert info["batch_buckets"] == list(batch_buckets(256)) and info["graphs_captured"] == []
    assert bucketed.runtime_info()["batch_buckets"] == [1, 2, 4, 8]
    assert [bucketed.bucket_for(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert plain.bucket_for(5) == 5
    assert bucketed.warmup() == [1, 2, 4, 8]  # nothing to capture on the CPU
    custom = TorchImageEncoder(md, device="cpu", batch_buckets=[6, 2, 2], pad_batches=True)
    assert custom.batch_buckets == (2, 6) and custom.max_batch == 6


def test_padding_to_buckets_is_sliced_off(bucketed, monkeypatch):
    h, w = bucketed.image_size
    x = np.random.default_rng(1).standard_normal((11, 3, h, w)).astype(np.float32)
    alone = np.concatenate([bucketed.encode_pixels(x[i:i + 1]) for i in range(len(x))])
    seen = []
    forward = bucketed._forward
    monkeypatch.setattr(bucketed, "_forward", lambda t: seen.append(t.shape[0]) or forward(t))
    five = bucketed.encode_pixels(x[:5])
    eleven = bucketed.encode_pixels(x)
    assert seen == [8, 8, 4]  # 5 -> bucket 8; 11 -> a chunk of 8, then 3 -> bucket 4
    assert five.shape == (5, alone.shape[1]) and eleven.shape == (11, alone.shape[1])
    np.testing.assert_allclose(five, alone[:5], atol=1e-5)
    np.testing.assert_allclose(eleven, alone, atol=1e-5)
    assert bucketed.encode_pixels(x[:0]).shape == (0, alone.shape[1])


def test_encode_uint8_equals_encode_pixels(bucketed, md):
    imgs = _uint8_images(md, 5)
    pixels = bucketed.preprocessor.batch([Image.fromarray(a) for a in imgs])  # already model-sized
    expected = bucketed.encode_pixels(pixels)
    # the same float32 arithmetic on the same pixels: equal, not merely close
    np.testing.assert_array_equal(bucketed.encode_uint8(imgs), expected)
    np.testing.assert_array_equal(bucketed.encode_uint8(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2))), expected)
    assert bucketed.encode_uint8(imgs[:0]).shape == (0, expected.shape[1])
    with pytest.raises(ValueError, match="uint8"):
        bucketed.encode_uint8(pixels)
    with pytest.raises(ValueError, match="expected"):
        bucketed.encode_uint8(imgs[:, :10])


def test_encode_tensor_equals_encode_pixels(bucketed):
    h, w = bucketed.image_size
    x = np.random.default_rng(2).standard_normal((3, 3, h, w)).astype(np.float32)
    np.testing.assert_array_equal(bucketed.encode_tensor(torch.from_numpy(x)), bucketed.encode_pixels(x))
    with pytest.raises(TypeError):
        bucketed.encode_tensor(x)
    with pytest.raises(ValueError, match="float"):
        bucketed.encode_tensor(torch.zeros((1, 3, h, w), dtype=torch.uint8))
    with pytest.raises(ValueError, match="NCHW"):
        bucketed.encode_tensor(torch.zeros((1, h, w, 3)))


def test_encode_mixed_keeps_the_order(bucketed):
    h, w = bucketed.image_size
    x = np.random.default_rng(3).standard_normal((6, 3, h, w)).astype(np.float32)
    expected = bucketed.encode_pixels(x)
    on_device = torch.from_numpy(x[[4, 0, 2]])  # rows 0, 2, 4 came from the device path
    got = bucketed.encode_mixed(on_device, [1, None, 2, None, 0, None], [x[1], x[3], x[5]])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(bucketed.encode_mixed(on_device, [1, 2, 0], []), expected[[0, 2, 4]], atol=1e-6)
    with pytest.raises(ValueError):
        bucketed.encode_mixed(on_device, [0, None], [])


def test_encode_mixed_takes_the_cpu_paths_uint8_images(bucketed):
    """The worker's CPU-decoded images arrive as uint8 (H, W, 3) and are normalised on the device."""
    h, w = bucketed.image_size
    u8 = np.random.default_rng(4).integers(0, 256, (4, h, w, 3), dtype=np.uint8)
    expected = bucketed.encode_uint8(u8)
    normalised = bucketed.preprocessor.batch([Image.fromarray(a) for a in u8])
    on_device = torch.from_numpy(normalised[[3, 1]])
    got = bucketed.encode_mixed(on_device, [None, 1, None, 0], [u8[0], u8[2]])
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_gpu_decode_only_on_cuda_by_default(plain, md):
    assert plain.device_jpeg is None and plain.runtime_info()["gpu_decode"] is False
    forced = TorchImageEncoder(md, device="cpu", gpu_decode=True)  # libjpeg-turbo: tests only
    assert forced.device_jpeg is not None and forced.device_jpeg.cfg == md.manifest.preprocess


@pytest.mark.parametrize("batch", [1, 5, 11])
def test_parity_with_onnx(md, bucketed, plain, batch):
    onnx = ImageEncoder(md)
    imgs = _uint8_images(md, batch, seed=batch)
    pixels = onnx.preprocessor.batch([Image.fromarray(a) for a in imgs])
    ref = onnx.encode_pixels(pixels)
    for enc in (bucketed, plain):
        assert _rel_err(enc.encode_pixels(pixels), ref) < REL_TOL
        assert _rel_err(enc.encode_uint8(imgs), ref) < REL_TOL


@needs_no_cuda
def test_cuda_paths_refused_without_cuda(md):
    with pytest.raises(ModelError, match="needs CUDA"):
        resolve_device("cuda")
    with pytest.raises(ModelError, match="needs CUDA"):
        TorchImageEncoder(md, device="cuda:0")
    with pytest.raises(ModelError, match="cuda_graphs=True needs a CUDA device"):
        TorchImageEncoder(md, device="cpu", cuda_graphs=True)
    with pytest.raises(ModelError, match="invalid torch device"):
        resolve_device("not-a-device")


def test_device_jpeg_preprocessor_refused_without_cuda(md):
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a host without CUDA")
    from moderator.encode.device_preprocess import DeviceJpegPreprocessor

    with pytest.raises(ModelError, match="needs CUDA"):
        DeviceJpegPreprocessor(md.manifest.preprocess, "cuda")
