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

    def to_array(self, img: Image.Image) -> np.ndarray:
        """One image -> float32 CHW, normalised."""
        arr = np.asarray(self.resize_and_crop(img), dtype=np.float32)
        arr = arr.transpose(2, 0, 1) / np.float32(255.0)
        return (arr - self._mean) / self._std

    def batch(self, images: Iterable[Image.Image]) -> np.ndarray:
        arrays = [self.to_array(im) for im in images]
        if not arrays:
            h, w = self.cfg.image_size
            return np.zeros((0, 3, h, w), dtype=np.float32)
        return np.ascontiguousarray(np.stack(arrays))
