"""Hostile image inputs: each either decodes to RGB or fails with a named reason."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from moderator.decode import DecodeLimits, decode_image
from moderator.errors import ImageDecodeError, InputError


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w=64, h=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (the classic decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    return _save(img, "JPEG", exif=exif.tobytes())


GOOD = [
    ("jpeg", lambda: _save(_rgb(), "JPEG"), (64, 48)),
    ("png", lambda: _save(_rgb(), "PNG"), (64, 48)),
    ("webp", lambda: _save(_rgb(), "WEBP"), (64, 48)),
    ("cmyk-jpeg", lambda: _save(_rgb().convert("CMYK"), "JPEG"), (64, 48)),
    ("16-bit-png", lambda: _save(Image.fromarray(np.full((30, 20), 40000, dtype=np.uint16)), "PNG"), (20, 30)),
    ("rgba-png", lambda: _save(_rgb().convert("RGBA"), "PNG"), (64, 48)),
    ("palette-gif", lambda: _save(_rgb().convert("P"), "GIF"), (64, 48)),
    ("greyscale", lambda: _save(_rgb().convert("L"), "PNG"), (64, 48)),
    ("exif-rotated", _exif_rotated, (20, 40)),
    ("animated-gif", lambda: _save(_rgb(seed=1).convert("P"), "GIF", save_all=True,
                                   append_images=[_rgb(seed=2).convert("P")], duration=50), (64, 48)),
]


@pytest.mark.parametrize("name, make, size", GOOD, ids=[g[0] for g in GOOD])
def test_accepted_inputs_become_rgb(name, make, size):
    d = decode_image(make())
    assert d.image.mode == "RGB" and d.image.size == size
    assert len(d.sha256) == 64


def test_16_bit_is_scaled_not_clipped():
    d = decode_image(_save(Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)), "PNG"))
    assert 120 <= d.image.getpixel((0, 0))[0] <= 135


def test_animation_keeps_first_frame_and_counts_frames():
    frames = [Image.new("RGB", (16, 16), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    d = decode_image(_save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50))
    assert d.frames == 2
    r, g, b = d.image.getpixel((8, 8))
    assert r > 200 and b < 50


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6
    d = decode_image(_save(img, "PNG", exif=exif.tobytes()))
    assert d.image.size == (20, 40)
    assert d.image.getpixel((10, 2))[0] > 200  # the strip is now on top


BAD = [
    ("zero-bytes", lambda: b"", "empty_image"),
    ("text", lambda: b"hello, this is not an image at all", "not_an_image"),
    ("html", lambda: b"<html><body>nope</body></html>", "not_an_image"),
    ("truncated-jpeg", lambda: _save(_rgb(256, 256), "JPEG")[:600], "truncated_image"),
    ("truncated-png", lambda: _save(_rgb(256, 256), "PNG")[:400], "truncated_image"),
    ("bomb-header", lambda: _png_header_only(30000, 30000), "decompression_bomb"),
    ("disallowed-format", lambda: _save(_rgb(), "PPM"), "unsupported_format"),
    ("too-large", lambda: b"\xff" * (DecodeLimits().max_bytes + 1), "payload_too_large"),
]


@pytest.mark.parametrize("name, make, reason", BAD, ids=[b[0] for b in BAD])
def test_rejected_inputs_name_their_reason(name, make, reason):
    with pytest.raises(InputError) as e:
        decode_image(make())
    assert e.value.reason == reason, (e.value.reason, str(e.value))


def test_pixel_cap_is_configurable():
    data = _save(_rgb(100, 100), "PNG")
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data, DecodeLimits(max_pixels=5000))
    assert e.value.reason == "decompression_bomb"
    assert decode_image(data, DecodeLimits(max_pixels=10_000)).image.size == (100, 100)


def test_a_gif_cut_inside_a_later_frame_header_is_a_named_failure():
    """Pillow's GIF n_frames walks every frame header; one cut short raised struct.error, which
    escaped the decoder (found by tests/test_fuzz.py): it must be a named decode failure."""
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    data = buf.getvalue()
    cut_in_a_header = 0
    for n in range(len(data)):
        try:
            decode_image(data[:n], DecodeLimits())
        except InputError as e:
            assert e.reason in ("image_decode_failed", "truncated_image", "not_an_image", "empty_image"), e
            cut_in_a_header += "unpack_from" in str(e)
    assert cut_in_a_header, "no cut landed in a frame header: the case is not exercised"
