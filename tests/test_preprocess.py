"""ImagePreprocessor must reproduce open_clip's eval transform pixel for pixel."""

import numpy as np
import pytest
from PIL import Image

from moderator.encode import ImagePreprocessor
from moderator.schemas import Preprocess

open_clip = pytest.importorskip("open_clip")

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _images():
    rng = np.random.default_rng(7)
    rgb = lambda h, w: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))  # noqa: E731
    yield "landscape", rgb(480, 640)
    yield "portrait", rgb(641, 333)
    yield "square", rgb(224, 224)
    yield "tiny-upscaled", rgb(17, 23)
    yield "odd-crop", rgb(301, 227)
    yield "rgba", Image.fromarray(rng.integers(0, 255, (200, 260, 4), dtype=np.uint8), "RGBA")
    yield "grey", Image.fromarray(rng.integers(0, 255, (150, 100), dtype=np.uint8), "L")
    yield "palette", rgb(120, 90).convert("P")


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_pixel_exact(size, interpolation, resize_mode):
    cfg = Preprocess(image_size=(size, size), mean=MEAN, std=STD, interpolation=interpolation,
                     resize_mode=resize_mode)
    ours = ImagePreprocessor(cfg)
    theirs = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD,
                                       interpolation=interpolation, resize_mode=resize_mode)
    for name, img in _images():
        a = ours.to_array(img)
        b = theirs(img).numpy()
        assert a.shape == b.shape == (3, size, size), name
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_batch_normalises_uint8_once_and_matches_open_clip_per_image():
    """The worker keeps uint8 pixels per image and normalises the batch in one step: the
    same float32 operations as open_clip per image, so the same bits, in either layout."""
    cfg = Preprocess(image_size=(64, 64), mean=MEAN, std=STD)
    ours = ImagePreprocessor(cfg)
    theirs = open_clip.image_transform(64, is_train=False, mean=MEAN, std=STD)
    imgs = [img for _, img in _images()]
    expected = np.stack([theirs(img).numpy() for img in imgs])
    u8 = np.stack([ours.to_uint8(img) for img in imgs])
    assert u8.dtype == np.uint8 and u8.shape == (len(imgs), 64, 64, 3)
    batch = ours.batch(imgs)
    assert batch.dtype == np.float32 and batch.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(batch, expected)
    np.testing.assert_array_equal(ours.normalise(u8), expected)
    np.testing.assert_array_equal(ours.normalise(np.ascontiguousarray(u8.transpose(0, 3, 1, 2))), expected)
    with pytest.raises(ValueError, match="uint8"):
        ours.normalise(u8.astype(np.float32))
    with pytest.raises(ValueError, match=r"expected \(N, 64, 64, 3\)"):
        ours.normalise(u8[:, :10])


def test_batch_shape_and_empty():
    cfg = Preprocess(image_size=(32, 32), mean=MEAN, std=STD)
    pre = ImagePreprocessor(cfg)
    imgs = [img for _, img in _images()]
    assert pre.batch(imgs).shape == (len(imgs), 3, 32, 32)
    assert pre.batch([]).shape == (0, 3, 32, 32)


def test_non_square_shortest_is_refused():
    with pytest.raises(ValueError, match="square"):
        Preprocess(image_size=(224, 256), mean=MEAN, std=STD)
