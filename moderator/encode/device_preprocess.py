"""Batched JPEG decode and CLIP preprocessing on a torch device (nvJPEG on CUDA).

``DeviceJpegPreprocessor`` turns a batch of JPEG files into the encoder's normalised
NCHW tensor without the pixels ever visiting host memory: ``torchvision.io.decode_jpeg``
decodes the batch (nvJPEG on CUDA, libjpeg-turbo on the CPU), then orientation, resize,
centre crop, /255 and normalisation run on the device. It follows
``ImagePreprocessor`` (open_clip's eval transform) rule for rule:

- EXIF orientation as ``ImageOps.exif_transpose`` reads it (``JpegProbe.orientation``,
  from Pillow's header parse), applied on the device. torchvision's
  ``apply_exif_orientation`` is not used: CUDA decodes ignore it, and it reads only the
  EXIF tag where Pillow also honours an XMP orientation.
- Pillow's resize is separable -- one pass, an 8-bit intermediate image, the other
  pass -- and rounds to 8 bits after each. Two antialiased ``interpolate`` passes with
  the same rounding, in Pillow's order (bicubic a=-0.5 with ``antialias=True`` is
  Pillow's kernel), match Pillow's output on ~99.99% of pixels, the rest within one
  level; one float pass, or ``transforms.v2`` on floats, differs on ~11-18% of pixels
  by up to 2-4 levels, and the wrong pass order on ~30% by up to ~16 levels. A
  dimension that keeps its size is not resampled (as in Pillow). NEAREST is a gather
  with Pillow's source indices: exact.
- Resize geometry (floor of the long side), crop offsets (``int(round(...))``) and
  padding follow torchvision's ``Resize``/``CenterCrop``, as ``preprocess.py`` does.

What remains is the decoder: on the CPU torchvision's libjpeg-turbo gives the same
pixels as Pillow's; nvJPEG's IDCT and chroma upsampling differ by a few levels
(``deploy/bench/gpu_selfcheck.py`` measures it).

Inputs that do not decode are reported, never raised: the caller sends those through
the CPU path (``decode_image``), which decodes them or names the failure. Which JPEGs
to send here at all is ``moderator.decode.probe_jpeg``'s call.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from moderator.decode import DecodeLimits, JpegProbe, probe_jpeg
from moderator.encode.torch_backend import _torch, resolve_device
from moderator.errors import MissingDependency
from moderator.schemas import Preprocess

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; until that
# migration, one warning per batch is noise.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io\.image")

_MODES = {"bicubic": "bicubic", "bilinear": "bilinear"}


def _pillow_major() -> int:
    import PIL  # noqa: PLC0415

    try:
        return int(PIL.__version__.split(".")[0])
    except ValueError:  # pragma: no cover - a development build
        return 0


# Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice
# as many pixels as the width does (Resample.c, ImagingResampleInner); before, always
# the horizontal pass first. The order changes the 8-bit intermediate, so follow it.
_PILLOW_VERTICAL_FIRST_RULE = _pillow_major() >= 13


def pillow_vertical_first(h: int, w: int, out_h: int, out_w: int) -> bool:
    """Whether the installed Pillow resizes h x w to out_h x out_w vertical pass first."""
    return _PILLOW_VERTICAL_FIRST_RULE and h - out_h > 0 and h - out_h > 2 * (w - out_w)


def _decode_jpeg():
    try:
        from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the install
        raise MissingDependency("device JPEG decoding needs torchvision (`pip install moderator[train]`)") from e
    return decode_jpeg, ImageReadMode


@dataclass(frozen=True)
class Geometry:
    """How one (height, width) image becomes the model's input, in ``preprocess.py``'s terms."""

    resize_to: tuple[int, int]  # (height, width) after the resize; the input size when there is none
    pad: tuple[int, int]  # (top, left) where the resized image sits on a fill-colour canvas
    canvas: tuple[int, int]  # (height, width) of that canvas (= resize_to when no padding)
    crop: tuple[int, int]  # (top, left) of the output window in the canvas


def geometry(cfg: Preprocess, h: int, w: int) -> Geometry:
    """``ImagePreprocessor.resize_and_crop``'s sizes and offsets for an h x w image."""
    out_h, out_w = cfg.image_size
    if cfg.resize_mode == "squash":
        return Geometry((out_h, out_w), (0, 0), (out_h, out_w), (0, 0))
    size = min(out_h, out_w)
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        rh, rw = h, w
    else:
        new_long = int(size * long / short)  # torchvision floors the long side
        rw, rh = (size, new_long) if w <= h else (new_long, size)
    pad_t = (out_h - rh) // 2 if out_h > rh else 0
    pad_l = (out_w - rw) // 2 if out_w > rw else 0
    ch, cw = max(rh, out_h), max(rw, out_w)
    top, left = int(round((ch - out_h) / 2.0)), int(round((cw - out_w) / 2.0))
    return Geometry((rh, rw), (pad_t, pad_l), (ch, cw), (top, left))


def _orient(torch, x, orientation: int):
    """Pillow's transposes for EXIF orientations 2-8 on a (..., H, W) tensor."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))
    if orientation == 7:
        return x.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


def pillow_nearest_index(n_in: int, n_out: int) -> list[int]:
    """Source index of each output pixel in Pillow's NEAREST resize (``ImagingScaleAffine``:
    a double-precision position stepped by n_in / n_out from half a step)."""
    step = n_in / n_out
    pos, out = step * 0.5, []
    for _ in range(n_out):
        out.append(min(max(int(pos), 0), n_in - 1))
        pos += step
    return out


class DeviceJpegPreprocessor:
    """JPEG files -> normalised float32 (N, 3, H, W) on ``device``, as ``ImagePreprocessor``
    would make them from ``decode_image``'s output.

    Only inputs with a ``JpegProbe`` are decoded here: the caller's (it probed already),
    else ``probe_jpeg(data, limits)``'s -- the pixel cap and the other hostile-input
    checks hold on this path too. Device memory is bounded: one decode call holds at most
    ``max_decode_pixels`` full-size pixels (uint8; 2**28 ~ 0.8 GB), and same-size images
    are resized together in groups of at most ``max_group_pixels`` (float32; 2**26 ~ 0.8 GB).
    """

    def __init__(self, cfg: Preprocess, device: str | None = "cuda", *,
                 limits: DecodeLimits = DecodeLimits(), max_decode_pixels: int = 1 << 28,
                 max_group_pixels: int = 1 << 26) -> None:
        torch = _torch()
        self._decode, self._read_mode = _decode_jpeg()
        self.cfg = cfg
        self._device = resolve_device(device)
        self.device = str(self._device)
        self._mode = _MODES.get(cfg.interpolation, "nearest")
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        self.limits = limits
        self.max_decode_pixels = max_decode_pixels
        self.max_group_pixels = max_group_pixels
        # batched decode calls that failed and were redone one file at a time (each costs a
        # batch's worth of single decodes: worth a metric)
        self.retried_batches = 0

    def eligible(self, data: bytes, limits: DecodeLimits | None = None, *,
                 sha256: str | None = None) -> JpegProbe | None:
        """``probe_jpeg(data, limits)``: a probe (truthy) when this path should decode the
        file -- keep it and pass it to ``__call__`` so the header is not parsed twice --
        else ``None``. Raises what ``decode_image`` raises for a bad header."""
        return probe_jpeg(data, self.limits if limits is None else limits, sha256=sha256)

    def __call__(self, jpegs: Sequence[bytes], probes: Sequence[JpegProbe | None] | None = None):
        """Returns ``(pixels, failed)``: pixels (N_ok, 3, H, W) float32 on the device for the
        inputs that decoded, in input order; ``failed`` the indices of those that did not.

        ``probes``: ``probe_jpeg``'s answer for each input when the caller has them (an
        input whose probe is ``None`` counts as failed); probed here otherwise (a Pillow
        header parse per file, ~0.1 ms, on the calling thread).
        """
        torch = _torch()
        if probes is None:
            probes = [self._probe(data) for data in jpegs]
        elif len(probes) != len(jpegs):
            raise ValueError(f"{len(probes)} probes for {len(jpegs)} images")
        # a probe means probe_jpeg's checks held: SOI ... EOI, headers and scan data sound
        todo = [i for i in range(len(jpegs)) if probes[i] is not None]
        out_h, out_w = self.cfg.image_size
        out = torch.empty((len(todo), 3, out_h, out_w), dtype=torch.float32, device=self._device)
        done: list[int] = []  # rows of `out` (= positions in todo) that hold an image
        for chunk in self._chunks([probes[i] for i in todo]):
            images = self._decode_files([jpegs[todo[k]] for k in chunk], [probes[todo[k]] for k in chunk])
            groups: dict[tuple[int, int], list[int]] = defaultdict(list)  # (h, w) -> rows of `out`
            for k, img in zip(chunk, images):
                if img is not None:
                    groups[tuple(img.shape[-2:])].append(k)
            by_row = dict(zip(chunk, images))
            with torch.inference_mode():
                for (h, w), rows in groups.items():
                    step = max(1, self.max_group_pixels // (h * w))
                    for s in range(0, len(rows), step):
                        part = rows[s:s + step]
                        pixels = self._preprocess(torch.stack([by_row[k] for k in part]))
                        out[torch.tensor(part, device=self._device)] = pixels
            done.extend(k for k, img in zip(chunk, images) if img is not None)
            del images, by_row  # the full-size decodes: free before the next chunk
        done.sort()
        if len(done) < len(todo):
            out = out[torch.tensor(done, dtype=torch.long, device=self._device)]
        decoded = {todo[k] for k in done}
        return out, [i for i in range(len(jpegs)) if i not in decoded]

    def _chunks(self, probes: list[JpegProbe]) -> list[list[int]]:
        """Positions in ``probes``, cut so one decode call holds at most ``max_decode_pixels``
        full-size pixels on the device (a batch of large photos would not fit otherwise)."""
        chunks: list[list[int]] = [[]]
        pixels = 0
        for k, p in enumerate(probes):
            n = p.size[0] * p.size[1]
            if chunks[-1] and pixels + n > self.max_decode_pixels:
                chunks.append([])
                pixels = 0
            chunks[-1].append(k)
            pixels += n
        return [c for c in chunks if c]

    def _decode_files(self, files: list[bytes], probes: list[JpegProbe]) -> list:
        """Oriented uint8 (3, H, W) device tensors, ``None`` for a file that did not decode."""
        torch = _torch()
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
        try:
            decoded = self._decode_batch(encoded)
        except Exception:  # one bad file fails the whole call: find it
            self.retried_batches += 1
            decoded = []
            for t in encoded:
                try:
                    decoded.append(self._decode_batch([t])[0])
                except Exception:
                    decoded.append(None)
        out = []
        for probe, img in zip(probes, decoded):
            w, h = probe.size
            ok = img is not None and tuple(img.shape) == (3, h, w)  # what the header promised
            out.append(_orient(torch, img, probe.orientation) if ok else None)
        return out

    def _probe(self, data: bytes) -> JpegProbe | None:
        try:
            return probe_jpeg(data, self.limits)
        except Exception:  # refused by the checks: decode_image will name the reason
            return None

    def _decode_batch(self, encoded: list):
        return self._decode(encoded, mode=self._read_mode.RGB, device=self._device, apply_exif_orientation=False)

    def _preprocess(self, batch):
        """uint8 (n, 3, h, w) on the device, all one size -> normalised float32 (n, 3, H, W)."""
        torch = _torch()
        n, _, h, w = batch.shape
        g = geometry(self.cfg, h, w)
        x = batch.float()
        rh, rw = g.resize_to
        if self._mode == "nearest":
            if (rh, rw) != (h, w):  # one gather, no arithmetic: exactly Pillow's pixels
                rows = torch.tensor(pillow_nearest_index(h, rh), device=x.device)
                cols = torch.tensor(pillow_nearest_index(w, rw), device=x.device)
                x = x.index_select(2, rows).index_select(3, cols)
        elif pillow_vertical_first(h, w, rh, rw):
            if rh != h:
                x = self._resample(x, (rh, w))
            if rw != w:
                x = self._resample(x, (rh, rw))
        else:
            if rw != w:
                x = self._resample(x, (h, rw))
            if rh != h:
                x = self._resample(x, (rh, rw))
        if g.canvas != (rh, rw):  # never for the configs Preprocess accepts; kept in step anyway
            pt, pl = g.pad
            # ImagePreprocessor pads with Image.new("RGB", size, fill_color): an int colour
            # on an RGB canvas is (fill_color, 0, 0) in Pillow, so mirror that
            canvas = torch.zeros((n, 3, *g.canvas), device=x.device)
            canvas[:, 0] = float(self.cfg.fill_color)
            canvas[:, :, pt:pt + rh, pl:pl + rw] = x
            x = canvas
        out_h, out_w = self.cfg.image_size
        top, left = g.crop
        x = x[:, :, top:top + out_h, left:left + out_w]
        # the same float32 arithmetic as ImagePreprocessor.to_array
        return x.div(255.0).sub_(self._mean).div_(self._std)

    def _resample(self, x, size: tuple[int, int]):
        torch = _torch()
        y = torch.nn.functional.interpolate(x, size=size, mode=self._mode, antialias=True, align_corners=False)
        return y.add_(0.5).floor_().clamp_(0.0, 255.0)  # Pillow rounds half up and clips to 8 bits
