"""Decode stage: untrusted bytes -> an RGB PIL image, or a named failure.

Every input is hostile until parsed: a byte cap before anything else, an allow
list of formats sniffed from the bytes (not the file name or content type), a
pixel cap checked from the header *before* pixels are decoded (decompression
bombs), a full decode that surfaces truncation, EXIF orientation applied, the
first frame of animations, and any mode (CMYK, 16-bit, palette, alpha) converted
to 8-bit RGB (alpha composited on white).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from moderator.errors import (
    DecompressionBomb,
    EmptyImage,
    ImageDecodeError,
    NotAnImage,
    PayloadTooLarge,
    TruncatedImage,
    UnsupportedFormat,
)

DEFAULT_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    formats: frozenset[str] = DEFAULT_FORMATS


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image
    sha256: str
    format: str
    original_size: tuple[int, int]
    original_mode: str
    frames: int


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping to white.
        import numpy as np  # noqa: PLC0415

        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype("uint8"), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")  # CMYK (with Pillow's profile-less conversion), L, P, YCbCr, F, 1


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(), *, sha256: str | None = None,
                 draft: tuple[int, int] | None = None) -> DecodedImage:
    """Decode untrusted bytes. ``sha256``: the caller's digest of ``data`` (hashed here if not
    given, so a worker that hashed for its cache does not hash twice). ``draft``: the
    smallest (width, height) the caller will use; a JPEG at least twice that size on both
    sides is then decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's ``draft``),
    never below ``draft``. ``original_size`` always reports the full size."""
    if not data:
        raise EmptyImage("zero bytes")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{len(data)} bytes exceeds the {limits.max_bytes} byte cap")
    digest = sha256 or hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=_open_formats(limits.formats))
        except UnidentifiedImageError as e:
            raise NotAnImage("bytes are not a recognised image format") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DecompressionBomb(str(e)) from e
        except Exception as e:  # malformed headers raise many types
            if isinstance(e, OSError) and "truncat" in str(e).lower():
                raise TruncatedImage(f"image header is truncated: {e}") from e
            raise NotAnImage(f"unreadable image header: {type(e).__name__}: {e}") from e
        fmt = img.format or "unknown"
        if fmt not in limits.formats:
            raise UnsupportedFormat(f"format {fmt} is not allowed (allowed: {sorted(limits.formats)})")
        w, h = img.size
        if w <= 0 or h <= 0:
            raise NotAnImage(f"image has no pixels ({w}x{h})")
        if w * h > limits.max_pixels:
            raise DecompressionBomb(f"{w}x{h} = {w * h} pixels exceeds the {limits.max_pixels} pixel cap")
        frames = int(getattr(img, "n_frames", 1) or 1)
        mode = img.mode
        try:
            img.seek(0)
            if draft is not None and fmt in ("JPEG", "MPO") and w >= 2 * draft[0] and h >= 2 * draft[1]:
                img.draft("RGB" if mode in ("RGB", "YCbCr") else None, draft)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
            rgb = _to_rgb(img)
            rgb.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DecompressionBomb(str(e)) from e
        except OSError as e:
            msg = str(e)
            if "truncated" in msg.lower() or "broken data stream" in msg.lower() or "premature" in msg.lower():
                raise TruncatedImage(msg) from e
            raise ImageDecodeError(f"cannot decode {fmt}: {msg}") from e
        except (ValueError, SyntaxError, IndexError, EOFError, ZeroDivisionError, MemoryError) as e:
            raise ImageDecodeError(f"cannot decode {fmt}: {type(e).__name__}: {e}") from e
    return DecodedImage(rgb, digest, fmt, (w, h), mode, frames)


def _open_formats(allowed: frozenset[str]) -> list[str]:
    Image.init()
    return sorted(f for f in allowed | _ALL_KNOWN if f in Image.OPEN)


# Formats Pillow may identify; anything identified but not allowed is refused by name
# (clearer than "not an image" for, say, an SVG-less PSD upload).
_ALL_KNOWN = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM", "TGA", "PSD",
                        "JPEG2000", "PCX", "DDS", "SGI", "IM", "MPO", "AVIF", "HEIF", "QOI"})  # never EPS: it runs Ghostscript

