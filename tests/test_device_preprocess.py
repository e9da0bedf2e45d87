"""Device JPEG path vs the CPU path, and probe_jpeg vs decode_image on hostile inputs.

``DeviceJpegPreprocessor(device="cpu")`` runs the same code as on CUDA except the
decoder (libjpeg-turbo here, nvJPEG there): these tests pin the geometry, orientation,
resampling and normalisation against ``ImagePreprocessor.to_array(decode_image(b).image)``.
nvJPEG's own differences are measured by ``deploy/bench/gpu_selfcheck.py`` on a GPU.
"""

import io

import numpy as np
import pytest
from PIL import Image

from moderator.worker.bench import gradient_photo

from moderator.decode import DecodeLimits, JpegProbe, decode_image, probe_jpeg
from moderator.encode import ImageEncoder, ModelDirectory
from moderator.encode.preprocess import ImagePreprocessor
from moderator.errors import ImageDecodeError, InputError
from moderator.schemas import Preprocess

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29
from moderator.encode.device_preprocess import (  # noqa: E402
    DeviceJpegPreprocessor,
    geometry,
    pillow_nearest_index,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Tolerances, in normalised units. One 8-bit level is 1 / (255 * std) <= 0.0151.
# Measured here (Pillow 13 / torchvision 0.29, both libjpeg-turbo): the decoders agree
# bit for bit; the resize differs on ~0.004% (bicubic) to ~0.2% (bilinear) of values, by
# exactly one level, where Pillow's 22-bit fixed-point filter taps and float taps round
# a tie differently. The bounds leave room for another libjpeg-turbo build (IDCT /
# upsampling rounding) while still catching real mistakes: a wrong pass order puts ~30%
# of values up to 16 levels off, a wrong crop offset or orientation far more.
LEVEL = 1.0 / (255.0 * min(OPENAI_STD))
MAX_ABS = 2 * LEVEL + 1e-6
MEAN_ABS = 2e-4
FRACTION_DIFFERENT = 0.01
COSINE_MIN = 0.9999


_photo = gradient_photo  # one generator for the tests and the GPU self-check


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


def _mpo() -> bytes:
    buf = io.BytesIO()
    _photo(300, 200, 9).save(buf, "MPO", quality=85, save_all=True, append_images=[_photo(300, 200, 10)])
    return buf.getvalue()


XMP_ORIENTATION_6 = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
CORPUS = {
    "1024x768": lambda: _jpeg(_photo(1024, 768)),
    "portrait": lambda: _jpeg(_photo(600, 900, 1)),
    "smaller-than-crop": lambda: _jpeg(_photo(100, 80, 2)),
    "grayscale": lambda: _jpeg(_photo(500, 400, 3).convert("L")),
    "progressive": lambda: _jpeg(_photo(640, 480, 4), progressive=True),
    "short-side-224": lambda: _jpeg(_photo(300, 224, 5)),
    "subsampling-444": lambda: _jpeg(_photo(333, 250, 6), subsampling=0),
    "xmp-rotated": lambda: _jpeg(_photo(320, 200, 8), xmp=XMP_ORIENTATION_6),
    "mpo": _mpo,
    **{f"exif-{o}": (lambda o=o: _jpeg(_photo(320, 200, 7), exif=_exif(o))) for o in range(2, 9)},
}


@pytest.fixture(scope="module")
def corpus() -> dict[str, bytes]:
    return {name: make() for name, make in CORPUS.items()}


def _cfg(**kw) -> Preprocess:
    return Preprocess(image_size=(224, 224), mean=OPENAI_MEAN, std=OPENAI_STD, **kw)


def _diffs(cfg: Preprocess, corpus: dict[str, bytes]) -> dict[str, np.ndarray]:
    out, failed = DeviceJpegPreprocessor(cfg, "cpu")(list(corpus.values()))
    assert failed == [] and out.dtype == torch.float32 and tuple(out.shape) == (len(corpus), 3, 224, 224)
    cpu = ImagePreprocessor(cfg)
    return {name: np.abs(out[i].numpy() - cpu.to_array(decode_image(data).image))
            for i, (name, data) in enumerate(corpus.items())}


@pytest.mark.parametrize("resize_mode, interpolation", [
    ("shortest", "bicubic"), ("squash", "bicubic"), ("shortest", "bilinear"), ("squash", "nearest")])
def test_pixels_match_the_cpu_path(corpus, resize_mode, interpolation):
    diffs = _diffs(_cfg(resize_mode=resize_mode, interpolation=interpolation), corpus)
    for name, d in diffs.items():
        assert d.max() <= MAX_ABS, (name, d.max())
        assert d.mean() <= MEAN_ABS, (name, d.mean())
        assert (d > 1e-6).mean() <= FRACTION_DIFFERENT, (name, (d > 1e-6).mean())
    everything = np.stack(list(diffs.values()))
    print(f"{resize_mode}/{interpolation}: max {everything.max():.5f} mean {everything.mean():.2e} "
          f"different {(everything > 1e-6).mean():.2e}")


def test_orientation_and_size_follow_decode_image(corpus):
    for name in ("exif-6", "exif-5", "xmp-rotated", "portrait"):
        d = decode_image(corpus[name])
        p = probe_jpeg(corpus[name])
        assert p is not None and p.oriented_size == d.image.size, name


def test_padding_geometry_matches_preprocess():
    # Preprocess refuses non-square 'shortest' targets, so padding never happens in
    # service; build one anyway to keep the pad rules (and Pillow's (fill, 0, 0) canvas) in step.
    cfg = Preprocess.model_construct(image_size=(224, 300), mean=OPENAI_MEAN, std=OPENAI_STD,
                                     interpolation="bicubic", resize_mode="shortest", fill_color=40)
    data = _jpeg(_photo(250, 250, 11))
    out, failed = DeviceJpegPreprocessor(cfg, "cpu")([data])
    ref = ImagePreprocessor(cfg).to_array(decode_image(data).image)
    assert failed == [] and tuple(out.shape[1:]) == ref.shape
    assert np.abs(out[0].numpy() - ref).max() <= MAX_ABS
    g = geometry(cfg, 250, 250)
    assert g.resize_to == (224, 224) and g.canvas == (224, 300) and g.pad == (0, 38)


def test_nearest_indices_are_pillows():
    for n_in, n_out in [(100, 37), (37, 100), (1024, 224), (7, 7)]:
        row = np.arange(n_in, dtype=np.uint8 if n_in < 256 else np.uint16)
        img = Image.fromarray(np.tile(row.astype(np.int32), (2, 1)).astype(np.int32), "I")
        expected = np.asarray(img.resize((n_out, 2), Image.Resampling.NEAREST))[0]
        assert pillow_nearest_index(n_in, n_out) == expected.tolist()


def test_embeddings_match_the_cpu_path(random_model_dir, corpus):
    pytest.importorskip("open_clip")
    from moderator.encode.torch_backend import TorchImageEncoder

    md = ModelDirectory(random_model_dir)
    cfg = md.manifest.preprocess
    jpegs = list(corpus.values())
    pixels, failed = DeviceJpegPreprocessor(cfg, "cpu")(jpegs)
    assert failed == []
    device_path = TorchImageEncoder(md, device="cpu", max_batch=8, pad_batches=True).encode_tensor(pixels)
    cpu_path = ImageEncoder(md).encode([decode_image(b).image for b in jpegs])
    cosine = np.sum(device_path * cpu_path, axis=1)
    print(f"cosine min {cosine.min():.7f} mean {cosine.mean():.7f}")
    assert cosine.min() >= COSINE_MIN


def _bad_scan(data: bytes) -> bytes:
    """A JPEG whose frame header and EOI are fine but whose scan header's length is garbage
    (Pillow stops at it; nvJPEG decoded it on an H100, so the probe must refuse it)."""
    i = data.index(b"\xff\xda")
    return data[:i + 2] + b"\x00\x01" + data[i + 4:]


def _bad_entropy(data: bytes) -> bytes:
    """A JPEG whose headers and EOI are fine but with a frame marker inside its entropy-coded
    data: libjpeg (Pillow, torchvision on the CPU) stops at it, nvJPEG decoded it on an H100."""
    i = data.index(b"\xff\xda")
    start = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return data[:start + 100] + b"\xff\xc0\x00\x02" + data[start + 104:]


def test_bad_files_are_reported_not_raised(corpus, monkeypatch):
    good = [corpus["1024x768"], corpus["grayscale"], corpus["exif-6"]]
    png = io.BytesIO()
    _photo(40, 30).save(png, "PNG")
    batch = [good[0], good[0][: len(good[0]) // 2], good[1], _bad_entropy(good[1]), good[2], png.getvalue(), b"",
             _bad_scan(good[0])]
    pre = DeviceJpegPreprocessor(_cfg(), "cpu")
    # the probe keeps 1, 3, 5, 6, 7 off the device; the decoder then refuses the greyscale
    # file (as a device decoder may): one bad file fails the whole batched call
    calls = []
    decode_batch = pre._decode_batch

    def refusing(ts):
        calls.append(len(ts))
        if any(t.numel() == len(good[1]) for t in ts):
            raise RuntimeError("the decoder refused a file")
        return decode_batch(ts)

    monkeypatch.setattr(pre, "_decode_batch", refusing)
    out, failed = pre(batch)
    assert failed == [1, 2, 3, 5, 6, 7]
    assert calls == [3, 1, 1, 1] and pre.retried_batches == 1  # failed on one file; redone one by one
    monkeypatch.undo()
    alone, _ = pre([good[0], good[2]])
    assert torch.equal(out, alone)
    # the CPU path then decodes what only the device path could not (the greyscale file, the
    # PNG), and names the failure of the rest
    decode_image(batch[2])
    decode_image(batch[5])
    for i in (1, 3, 6, 7):
        with pytest.raises(InputError):
            decode_image(batch[i])
    out, failed = pre([])
    assert failed == [] and tuple(out.shape) == (0, 3, 224, 224)


def test_device_memory_is_bounded(corpus, monkeypatch):
    files = [corpus[n] for n in ("1024x768", "grayscale", "portrait", "smaller-than-crop", "exif-6")]
    expected, _ = DeviceJpegPreprocessor(_cfg(), "cpu")(files)
    pre = DeviceJpegPreprocessor(_cfg(), "cpu", max_decode_pixels=1024 * 768, max_group_pixels=1)
    calls = []
    decode_batch = pre._decode_batch
    monkeypatch.setattr(pre, "_decode_batch", lambda ts: calls.append(len(ts)) or decode_batch(ts))
    out, failed = pre(files)
    assert calls == [1, 3, 1] and failed == []  # 786,432 | 200,000 + 540,000 + 8,000 | 64,000 pixels
    assert torch.equal(out, expected)


def test_callers_probes_are_used(corpus):
    data = corpus["exif-6"]
    pre = DeviceJpegPreprocessor(_cfg(), "cpu")
    probe = pre.eligible(data, sha256="f" * 64)
    assert probe == probe_jpeg(data, sha256="f" * 64) and probe.sha256 == "f" * 64 and probe.orientation == 6
    assert pre.eligible(_jpeg(_photo(64, 48).convert("CMYK"))) is None
    out, failed = pre([data, data], [probe, None])
    assert failed == [1] and out.shape[0] == 1
    with pytest.raises(ValueError):
        pre([data], [])


# --- probe_jpeg: eligibility, and the same named failures as decode_image --------------


def _patch_sof(data: bytes, *, marker: int | None = None, size: tuple[int, int] | None = None) -> bytes:
    i = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    b = bytearray(data)
    if marker is not None:
        b[i + 1] = marker
    if size is not None:
        w, h = size
        b[i + 5:i + 7], b[i + 7:i + 9] = h.to_bytes(2, "big"), w.to_bytes(2, "big")
    return bytes(b)


def _insert_in_scan(data: bytes, offset: int, what: bytes) -> bytes:
    i = data.index(b"\xff\xda")
    start = i + 2 + int.from_bytes(data[i + 2:i + 4], "big") + offset
    return data[:start] + what + data[start:]


def _patch_sof_length(data: bytes) -> bytes:
    i = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    return data[:i + 2] + (int.from_bytes(data[i + 2:i + 4], "big") + 3).to_bytes(2, "big") + data[i + 4:]


def test_probe_eligibility(corpus):
    p = probe_jpeg(corpus["1024x768"])
    assert isinstance(p, JpegProbe) and p.size == (1024, 768) and p.mode == "RGB" and not p.progressive
    assert p.sha256 is None and p.orientation == 1 and p.frames == 1
    assert probe_jpeg(corpus["progressive"]).progressive
    assert probe_jpeg(corpus["grayscale"]).mode == "L"
    assert probe_jpeg(corpus["xmp-rotated"]).orientation == 6
    mpo = probe_jpeg(corpus["mpo"])
    assert mpo.format == "MPO" and mpo.frames == 2
    cmyk = _jpeg(_photo(64, 48).convert("CMYK"))
    png = io.BytesIO()
    _photo(64, 48).save(png, "PNG")
    not_for_the_device = {
        "cmyk": cmyk,
        "png": png.getvalue(),
        "arithmetic-coded": _patch_sof(corpus["smaller-than-crop"], marker=0xC9),
        "no-eoi": corpus["smaller-than-crop"][:-2],
        "truncated": corpus["1024x768"][: len(corpus["1024x768"]) // 2],
        "scan-header-length": _bad_scan(corpus["1024x768"]),
        "frame-marker-in-scan-data": _bad_entropy(corpus["1024x768"]),
        "junk-marker-in-scan-data": _insert_in_scan(corpus["1024x768"], 50, b"\xff\xff\x12"),
        "frame-header-length": _patch_sof_length(corpus["smaller-than-crop"]),
    }
    for name, data in not_for_the_device.items():
        assert probe_jpeg(data) is None, name
    for name in ("cmyk", "png"):  # fine for the CPU path
        decode_image(not_for_the_device[name])


HOSTILE = {
    "empty": (b"", DecodeLimits()),
    "over-byte-cap": (None, DecodeLimits(max_bytes=1000)),
    "not-an-image": (b"hello, world" * 10, DecodeLimits()),
    "format-not-allowed": (None, DecodeLimits(formats=frozenset({"PNG"}))),
    "over-pixel-cap": ("bomb-9000", DecodeLimits()),
    "pillow-bomb-error": ("bomb-30000", DecodeLimits()),
    "small-pixel-cap": (None, DecodeLimits(max_pixels=1000)),
    "header-truncated": ("head", DecodeLimits()),
    "zero-height": ("zero", DecodeLimits()),
    "12-bit": ("12bit", DecodeLimits()),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_probe_fails_like_decode_image(name, corpus):
    data, limits = HOSTILE[name]
    base = corpus["smaller-than-crop"]
    data = {None: base, "bomb-9000": _patch_sof(base, size=(9000, 9000)),
            "bomb-30000": _patch_sof(base, size=(30000, 30000)), "head": base[:20],
            "zero": _patch_sof(base, size=(100, 0))}.get(data, data)
    if data == "12bit":
        i = base.index(b"\xff\xc0")
        data = base[:i + 4] + bytes([12]) + base[i + 5:]
    with pytest.raises(ImageDecodeError if name != "over-byte-cap" else InputError) as cpu:
        decode_image(data, limits)
    with pytest.raises(type(cpu.value)) as probe:
        probe_jpeg(data, limits)
    assert type(probe.value) is type(cpu.value) and probe.value.reason == cpu.value.reason
