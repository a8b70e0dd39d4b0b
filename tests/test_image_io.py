"""load_image turns every kind of image a user has into RGB, and refuses the rest clearly."""
import io

import numpy as np
import pytest
from PIL import Image

from anomaly import load_image
from anomaly import image_io
from anomaly.image_io import resize_image


def _png(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


GRADIENT = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))                 # (48, 64)

ACCEPTED = [
    ("L", Image.fromarray(GRADIENT)),
    ("LA", Image.fromarray(GRADIENT).convert("LA")),
    ("P", Image.fromarray(GRADIENT).convert("P")),
    ("RGB", Image.fromarray(GRADIENT).convert("RGB")),
    ("RGBA", Image.fromarray(GRADIENT).convert("RGBA")),
    ("CMYK", Image.fromarray(GRADIENT).convert("RGB").convert("CMYK")),
    ("I;16", Image.fromarray(GRADIENT.astype(np.uint16) * 257)),
    ("1", Image.fromarray(GRADIENT > 128)),
    ("F", Image.fromarray(GRADIENT.astype(np.float32))),
]


@pytest.mark.parametrize("mode,image", ACCEPTED, ids=[m for m, _ in ACCEPTED])
def test_every_mode_becomes_rgb_of_the_same_size(mode, image):
    out = load_image(image)
    assert out.mode == "RGB" and out.size == (64, 48)
    grey = np.asarray(out)[:, :, 0].astype(int)
    if mode not in ("1",):
        assert grey[:, -1].mean() > grey[:, 0].mean() + 100      # the gradient survived


def test_sixteen_bit_png_file_keeps_its_contrast(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray((GRADIENT.astype(np.uint16) * 64)).save(path)    # uses a fraction of 16 bits
    out = np.asarray(load_image(path))
    assert out.min() == 0 and out.max() == 255


def test_transparent_pixels_become_white():
    rgba = np.zeros((16, 16, 4), np.uint8)
    out = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert (out == 255).all()


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), "red")
    exif = image.getexif()
    exif[0x0112] = 6                                               # rotate 90 degrees on display
    out = load_image(_png(image, "JPEG", exif=exif))
    assert out.size == (20, 40)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("P", (16, 16), i) for i in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).size == (16, 16)


@pytest.mark.parametrize("array", [
    GRADIENT, GRADIENT[:, :, None], np.dstack([GRADIENT] * 3), np.dstack([GRADIENT] * 4),
    GRADIENT.astype(np.uint16) * 100, GRADIENT.astype(np.float32) / 255.0, GRADIENT.astype(np.float64) * 10,
])
def test_numpy_arrays(array):
    out = load_image(array)
    assert out.size == (64, 48) and out.mode == "RGB"


BAD_BYTES = [
    ("empty", b"", "empty"),
    ("text", b"hello, this is not an image at all", "not an image"),
    ("pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n", "not an image"),
    ("truncated png", _png(Image.fromarray(GRADIENT))[:60], "corrupt or truncated"),
    ("truncated jpeg", _png(Image.new("RGB", (64, 64), "red"), "JPEG")[:200], "corrupt or truncated"),
    ("tiny", _png(Image.new("RGB", (4, 4))), "at least"),
]


@pytest.mark.parametrize("name,data,message", BAD_BYTES, ids=[b[0] for b in BAD_BYTES])
def test_bad_files_give_a_clear_value_error(name, data, message):
    with pytest.raises(ValueError, match=message):
        load_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _png(Image.new("1", (30000, 30000)))                    # a few KB, 900 MP
    assert len(bomb) < 200_000
    with pytest.raises(ValueError, match="limit"):
        load_image(bomb)


def test_missing_file_and_wrong_types(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="expected"):
        load_image(42)
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        load_image(np.full((16, 16), np.nan))


def test_limits_are_stated_constants():
    assert image_io.MAX_PIXELS >= 4096 * 4096 and image_io.MIN_SIDE == 8


@pytest.mark.parametrize("mode", ["RGB", "L", "F"])
@pytest.mark.parametrize("source, size", [((1024, 768), (320, 320)), ((384, 384), (320, 320)),
                                          ((80, 80), (513, 385)), ((7, 300), (5, 1)), ((640, 480), (320, 3))])
def test_resize_in_two_halves_gives_pillows_pixels(mode, source, size):
    rng = np.random.default_rng(0)
    pixels = rng.random(source[::-1], dtype=np.float32) if mode == "F" else \
        rng.integers(0, 256, (*source[::-1], 3) if mode == "RGB" else source[::-1], dtype=np.uint8)
    image = Image.fromarray(pixels)
    ours, pillows = np.asarray(resize_image(image, size), dtype=np.float64), \
        np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float64)
    assert ours.shape == pillows.shape
    if mode == "F":
        assert np.abs(ours - pillows).max() <= 1e-5
    else:   # where a half's box ends between two rows, the filter's positions round differently
        assert np.abs(ours - pillows).max() <= 1 and np.mean(ours != pillows) < 0.02
        if source[1] * (size[1] // 2) % size[1] == 0:                     # ... else the same pixels
            assert np.array_equal(ours, pillows)
