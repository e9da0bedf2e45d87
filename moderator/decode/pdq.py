"""PDQ perceptual hashes of decoded images (Meta's PDQ, via the ``pdqhash`` package).

PDQ is what Hasher-Matcher-Actioner and ThreatExchange exchange: 256 bits whose
Hamming distance stays small under resizing and re-encoding. Why ``pdqhash``: it
wraps Meta's reference C++ implementation directly; the ``threatexchange`` package
hashes PDQ with that same binding but pulls FAISS, requests and a CLI framework in
with it. It ships as source only, so the ``pdq`` extra needs a C++ compiler to install.

The image is first shrunk (a box-filter reduce by a whole factor) so its longer side is at
most ``MAX_SIDE`` pixels: hashing a 1024x768 photo at full size took 28 ms on one core here,
at 512x384 4 ms, and the hash is built from a 64x64 downsample either way.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from moderator.errors import MissingDependency

MAX_SIDE = 512


def _pdqhash():
    try:
        import pdqhash  # noqa: PLC0415
    except ImportError as e:
        raise MissingDependency("PDQ banks need the pdqhash package: pip install 'moderator[pdq]' "
                                "(it builds from source: a C++ compiler is needed)") from e
    return pdqhash


def available() -> None:
    """Raise ``MissingDependency`` now (at policy load) rather than at the first image."""
    _pdqhash()


def pdq_hash(image: Image.Image) -> tuple[bytes, int]:
    """(the 256-bit hash as 32 bytes, PDQ quality 0-100) of an RGB image."""
    w, h = image.size
    factor = -(-max(w, h) // MAX_SIDE)  # ceil
    if factor >= 2:  # a box-filter reduce by a whole factor: ~10x cheaper than a resampling resize
        image = image.reduce(factor)
    bits, quality = _pdqhash().compute(np.asarray(image.convert("RGB")))
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes(), int(quality)
