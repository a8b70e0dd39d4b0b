"""Fuzzing the image loader: any bytes give an RGB image or a ValueError, nothing else."""
import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from anomaly import load_image


def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(data: bytes) -> None:
    try:
        image = load_image(data)
    except ValueError as err:
        assert str(err)                      # a message for the user
    else:
        assert image.mode == "RGB" and min(image.size) >= 8


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    _check(data)


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=12),
       st.integers(0, 10**6))
def test_mutated_real_images(seed, flips, cut):
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    _check(bytes(data[: max(1, cut % (len(data) + 1))]))
