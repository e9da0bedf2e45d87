"""Decode stage: untrusted bytes -> an RGB PIL image, or a named failure.

Every input is hostile until parsed: a byte cap before anything else, an allow
list of formats sniffed from the bytes (not the file name or content type), a
pixel cap checked from the header *before* pixels are decoded (decompression
bombs), a full decode that surfaces truncation, EXIF orientation applied, the
first frame of animations, and any mode (CMYK, 16-bit, palette, alpha) converted
to 8-bit RGB (alpha composited on white).
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import struct
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


def _open_checked(data: bytes, limits: DecodeLimits) -> Image.Image:
    """The checks every path applies before a pixel is decoded: empty, byte cap, a format
    sniffed from the bytes and allowed, a size, the pixel cap (decompression bombs). Pillow's
    ``open`` only reads the header. Call with DecompressionBombWarning turned into an error."""
    if not data:
        raise EmptyImage("zero bytes")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{len(data)} bytes exceeds the {limits.max_bytes} byte cap")
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
    return img


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(), *, sha256: str | None = None,
                 draft: tuple[int, int] | None = None) -> DecodedImage:
    """Decode untrusted bytes. ``sha256``: the caller's digest of ``data`` (hashed here if not
    given, so a worker that hashed for its cache does not hash twice). ``draft``: the
    smallest (width, height) the caller will use; a JPEG at least twice that size on both
    sides is then decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's ``draft``),
    never below ``draft``. ``original_size`` always reports the full size."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open_checked(data, limits)
        digest = sha256 or hashlib.sha256(data).hexdigest()
        fmt = img.format or "unknown"
        w, h = img.size
        mode = img.mode
        try:
            frames = int(getattr(img, "n_frames", 1) or 1)  # walks every frame's header: can fail too
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
        except (ValueError, SyntaxError, IndexError, EOFError, ZeroDivisionError, MemoryError, TypeError,
                KeyError, struct.error) as e:  # struct.error: a cut frame header (GIF n_frames)
            raise ImageDecodeError(f"cannot decode {fmt}: {type(e).__name__}: {e}") from e
    return DecodedImage(rgb, digest, fmt, (w, h), mode, frames)


@functools.lru_cache(maxsize=16)
def _open_formats(allowed: frozenset[str]) -> tuple[str, ...]:
    """The formats ``Image.open`` may try, in Pillow's own order (``Image.ID``: JPEG and PNG
    early, plugins without a cheap signature check such as IM late). The order is the one a
    plain ``Image.open`` uses; sorted by name, a PNG was tried as IM first (~20 us more each)."""
    Image.init()
    return tuple(f for f in Image.ID if f in allowed | _ALL_KNOWN and f in Image.OPEN)


# Formats Pillow may identify; anything identified but not allowed is refused by name
# (clearer than "not an image" for, say, an SVG-less PSD upload).
_ALL_KNOWN = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM", "TGA", "PSD",
                        "JPEG2000", "PCX", "DDS", "SGI", "IM", "MPO", "AVIF", "HEIF", "QOI"})  # never EPS: it runs Ghostscript


# --- which JPEGs a batched device decoder (nvJPEG) may take ------------------------


@dataclass(frozen=True)
class JpegProbe:
    """What a JPEG's header says, for a caller that decodes JPEGs in batches on a device.

    The device path only gets plain JPEGs: 8-bit Huffman-coded (baseline, extended
    sequential or progressive), one (grey) or three (YCbCr) components, ending in an
    EOI marker. Anything else goes the CPU path (``decode_image``), which decodes it or
    names its failure.
    """

    sha256: str | None  # the caller's digest, passed through (never computed here)
    format: str  # "JPEG", or "MPO" (its first frame is a plain JPEG)
    size: tuple[int, int]  # (width, height) as stored, before EXIF orientation
    mode: str  # "RGB" or "L"
    orientation: int  # EXIF orientation as ImageOps.exif_transpose reads it; 1 = none
    progressive: bool
    frames: int

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) after the EXIF orientation, as ``decode_image`` returns it."""
        w, h = self.size
        return (h, w) if self.orientation in (5, 6, 7, 8) else (w, h)


def probe_jpeg(data: bytes, limits: DecodeLimits = DecodeLimits(), *,
               sha256: str | None = None) -> JpegProbe | None:
    """``decode_image``'s checks on the header, without decoding a pixel (Pillow's open is lazy).

    Raises what ``decode_image`` raises for the same input at the same checks (empty, byte
    cap, not an image, format not allowed, no pixels, pixel cap / decompression bomb), so
    a dead-letter reason does not depend on which path an image took. Returns ``None`` for
    an input that passes them but is not for the device decoder (another format, CMYK,
    12-bit, arithmetic or lossless coding, an RGB-coded Adobe JPEG, no EOI marker at the
    end -- truncated files must fail the way ``decode_image`` fails them -- or a header
    detail that Pillow cannot read). ``sha256``: the caller's digest of ``data``, carried
    in the probe for convenience; not computed here (the worker hashes once).

    The checks are ``decode_image``'s own (``_open_checked``); tests compare the two on hostile inputs.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open_checked(data, limits)
        fmt = img.format or "unknown"
        if fmt not in ("JPEG", "MPO") or img.mode not in ("RGB", "L"):
            return None
        sof = _jpeg_frame_header(data)
        if sof is None:
            return None
        marker, precision, components = sof
        if marker not in _DEVICE_SOF or precision != 8 or components not in (1, 3):
            return None
        if components == 3 and img.info.get("adobe_transform", 1) == 0:
            return None  # RGB-coded (no YCbCr transform): rare, and device decoders differ
        if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
            return None
        try:
            orientation = int(img.getexif().get(0x0112, 1))
            frames = int(getattr(img, "n_frames", 1) or 1)
        except Exception:  # odd EXIF/MPO data: the CPU path decides what it is
            return None
    return JpegProbe(sha256=sha256, format=fmt, size=img.size,
                     mode=img.mode, orientation=orientation if 1 <= orientation <= 8 else 1,
                     progressive=marker == 0xC2, frames=frames)


# Start-of-frame markers a batched device decoder takes: baseline, extended sequential and
# progressive, all Huffman-coded (nvJPEG has no arithmetic, lossless or hierarchical modes).
_DEVICE_SOF = frozenset({0xC0, 0xC1, 0xC2})


def _jpeg_frame_header(data: bytes, max_segments: int = 4096) -> tuple[int, int, int] | None:
    """(SOF marker, sample precision, component count) of the first frame, walking the
    marker segments from SOI to the first start of scan; ``None`` when a segment runs past
    the end of the file, the frame or scan header's length does not fit its component
    count, or there is no frame before the scan. libjpeg stops at such a file while a device
    decoder may decode something from it: the CPU path must name it."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n, sof = 2, len(data), None
    for _ in range(max_segments):
        if i + 4 > n or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            i += 2
            continue
        if marker == 0xD9:  # EOI before any scan
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return None
        if marker == 0xDA:  # start of scan: its header, then entropy-coded data
            if sof is None or not _scan_header_ok(data, i, length):
                return None
            return sof if _entropy_coded_data_ok(data, i + 2 + length) else None
        if sof is None and 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if length < 8:
                return None
            sof = (marker, data[i + 4], data[i + 9])
            if length != 8 + 3 * sof[2]:
                return None
        i += 2 + length
    return None


def _scan_header_ok(data: bytes, i: int, length: int) -> bool:
    ns = data[i + 4] if length > 2 else 0
    return 1 <= ns <= 4 and length == 6 + 2 * ns


# In entropy-coded data a 0xFF is followed by a stuffed 0x00 or a restart marker (0xD0-0xD7),
# or by fill bytes (0xFF) and then a marker; this finds the markers (the pattern starts with a
# literal so the regex engine skips ahead at C speed: ~70 us on a 230 kB photo, a leading
# \xff+ made it 1.2 ms).
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# what may sit between two scans (progressive or non-interleaved files): tables, restart
# interval, comments, application data, the next scan
_BETWEEN_SCANS = frozenset({0xC4, 0xDB, 0xDD, 0xFE, 0xDA, *range(0xE0, 0xF0)})


def _entropy_coded_data_ok(data: bytes, pos: int, max_segments: int = 4096) -> bool:
    """From the end of the first scan header to the first EOI: only restart markers inside the
    scans, only tables / comments / scan headers between them.
    libjpeg stops at (or warns about and pads) anything else, while nvJPEG decoded a frame
    marker planted in the scan data without complaint on an H100: such a file goes the CPU
    path, which names it. One regex pass over the file at C speed (~70 us for 230 kB)."""
    end = len(data.rstrip(b"\0"))
    for _ in range(max_segments):
        m = _MARKER_IN_SCAN.search(data, pos)
        if m is None:
            return False  # no EOI
        at = m.start()  # the 0xFF just before the marker byte
        marker = data[at + 1]
        if marker == 0xD9:  # what follows (an MPO's next picture, trailing bytes) is not decoded
            return True
        if marker not in _BETWEEN_SCANS or at + 4 > end:
            return False
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if length < 2 or at + 2 + length > end or (marker == 0xDA and not _scan_header_ok(data, at, length)):
            return False
        pos = at + 2 + length
    return False
