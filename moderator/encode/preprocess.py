"""Image preprocessing that reproduces open_clip's eval transform exactly, without torch.

open_clip (``image_transform(..., is_train=False)``) does, in this order:
``Resize`` (shortest side to the target, PIL resample), ``CenterCrop``, convert to
RGB, ``ToTensor`` (/255, CHW) and ``Normalize(mean, std)``. torchvision computes
the resized long side with ``int()`` (floor) and the crop offsets with
``int(round(...))``; both are mirrored here so pixels match bit for bit.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image

from moderator.schemas import Preprocess

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def _resize_shortest(img: Image.Image, size: int, resample: int) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), resample)


def _center_crop(img: Image.Image, out_h: int, out_w: int, fill: int) -> Image.Image:
    w, h = img.size
    if out_w > w or out_h > h:  # torchvision pads symmetrically before cropping
        pad_l = (out_w - w) // 2 if out_w > w else 0
        pad_t = (out_h - h) // 2 if out_h > h else 0
        canvas = Image.new(img.mode, (max(w, out_w), max(h, out_h)), fill)
        canvas.paste(img, (pad_l, pad_t))
        img = canvas
        w, h = img.size
    top = int(round((h - out_h) / 2.0))
    left = int(round((w - out_w) / 2.0))
    return img.crop((left, top, left + out_w, top + out_h))


class ImagePreprocessor:
    """Turns PIL images into the float32 NCHW batch the image encoder expects."""

    def __init__(self, cfg: Preprocess) -> None:
        self.cfg = cfg
        self._resample = _RESAMPLE[cfg.interpolation]
        self._mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.cfg.image_size

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        h, w = self.cfg.image_size
        mode = self.cfg.resize_mode
        if mode == "squash":
            img = img.resize((w, h), self._resample)
        else:
            img = _resize_shortest(img, min(h, w), self._resample)
            img = _center_crop(img, h, w, self.cfg.fill_color)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return img

    def to_uint8(self, img: Image.Image) -> np.ndarray:
        """One image -> uint8 (H, W, 3), resized and cropped, not normalised: a quarter of the
        float32 bytes, and what a batch is normalised from in one step (``normalise``)."""
        return np.asarray(self.resize_and_crop(img), dtype=np.uint8)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) or (N, 3, H, W) -> float32 NCHW, normalised: the same float32
        operations, in the same order, as ``to_array`` per image (bit-identical), done once
        per batch instead of once per image (numpy runs each step without the GIL)."""
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8:
            raise ValueError(f"normalise takes uint8 pixels, not {pixels.dtype}")
        if uint8_layout(pixels.shape, self.image_size, "normalise") == "NHWC":
            pixels = pixels.transpose(0, 3, 1, 2)
        arr = pixels.astype(np.float32, order="C") / np.float32(255.0)
        arr -= self._mean
        arr /= self._std
        return arr

    def to_array(self, img: Image.Image) -> np.ndarray:
        """One image -> float32 CHW, normalised."""
        return self.normalise(self.to_uint8(img)[None])[0]

    def batch(self, images: Iterable[Image.Image]) -> np.ndarray:
        """Images -> float32 NCHW, normalised (``to_uint8`` each, ``normalise`` the batch)."""
        arrays = [self.to_uint8(im) for im in images]
        if not arrays:
            h, w = self.cfg.image_size
            return np.zeros((0, 3, h, w), dtype=np.float32)
        return self.normalise(np.stack(arrays))


def uint8_layout(shape: tuple[int, ...], image_size: tuple[int, int], what: str) -> str:
    """"NHWC" or "NCHW" for a batch of model-sized images; ``ValueError`` for any other shape."""
    h, w = image_size
    shape = tuple(shape)
    if len(shape) == 4 and shape[1:] == (h, w, 3):
        return "NHWC"
    if len(shape) == 4 and shape[1:] == (3, h, w):
        return "NCHW"
    raise ValueError(f"{what}: expected (N, {h}, {w}, 3) or (N, 3, {h}, {w}), got {shape}")
