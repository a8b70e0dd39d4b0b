"""Turning whatever a user has (a path, bytes, a PIL image, a numpy array) into an RGB image.

Every failure is a ``ValueError`` whose message says what was wrong, so that the UI can show it
as is and the CLI can print it.
"""
from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[str, Path, bytes, Image.Image, np.ndarray]

MAX_PIXELS = 40_000_000          # larger images are refused (decompression-bomb guard)
MAX_FILE_BYTES = 50 * 1024 * 1024
MIN_SIDE = 8                     # smaller images carry no usable texture

_OTHER_HALF = ThreadPoolExecutor(1, thread_name_prefix="resize")   # see resize_image


def load_image(src: ImageLike, name: str | None = None) -> Image.Image:
    """Any supported input -> an RGB PIL image, EXIF-rotated, first frame of animations.

    Accepted: paths and bytes of any format Pillow reads; PIL images of modes 1, L, LA, P, PA,
    RGB, RGBA, I;16, I, F, CMYK, YCbCr; arrays (H, W), (H, W, 1|3|4) of uint8, uint16 or floats
    in [0, 1]. Alpha is composited over white. 16-bit and float images are scaled by their range.
    """
    label = name or (str(src) if isinstance(src, (str, Path)) else type(src).__name__)
    if isinstance(src, np.ndarray):
        image = _from_array(src, label)
    elif isinstance(src, Image.Image):
        image = src
    elif isinstance(src, (str, Path, bytes, bytearray)):
        image = _open(src, label)
    else:
        raise ValueError(f"{label}: expected a file path, bytes, a PIL image or a numpy array")
    return _to_rgb(image, label)


def _open(src: str | Path | bytes, label: str) -> Image.Image:
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise ValueError(f"{label}: no such file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{label}: file is {size / 2**20:.0f} MB, the limit is "
                             f"{MAX_FILE_BYTES / 2**20:.0f} MB")
        data = path.read_bytes()
    else:
        data = bytes(src)
    if not data:
        raise ValueError(f"{label}: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.size, label)
            image.seek(0)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{label}: image is too large ({err})") from err
    except UnidentifiedImageError as err:
        raise ValueError(f"{label}: not an image file (or a format Pillow cannot read)") from err
    except (OSError, SyntaxError, EOFError) as err:
        raise ValueError(f"{label}: the image file is corrupt or truncated ({err})") from err
    return ImageOps.exif_transpose(image)


def _check_size(size: tuple[int, int], label: str) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ValueError(f"{label}: image is {width}x{height} = {width * height / 1e6:.0f} MP, "
                         f"the limit is {MAX_PIXELS / 1e6:.0f} MP")
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"{label}: image is {width}x{height}, each side must be at least {MIN_SIDE} px")


def _from_array(array: np.ndarray, label: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"{label}: array of shape {array.shape}; expected (H, W) or (H, W, 1|3|4)")
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        array = _rescale(array.astype(np.float64))
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{label}: array contains NaN or infinity")
        lo, hi = float(array.min()), float(array.max())
        array = array * 255.0 if lo >= 0.0 and hi <= 1.0 else _rescale(array)
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"{label}: unsupported array dtype {array.dtype}")
    _check_size((array.shape[1], array.shape[0]), label)
    return Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))


def _rescale(array: np.ndarray) -> np.ndarray:
    """Stretch values linearly to 0..255 (16-bit sensors rarely use the full range)."""
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros_like(array, dtype=np.uint8)
    return np.round((array - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    _check_size(image.size, label)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_rescale(np.asarray(image, dtype=np.float64))).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"{label}: cannot convert image mode {image.mode} to RGB ({err})") from err


def resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Pillow's bilinear ``image.resize(size)`` (``size`` is (W, H)), its top and bottom halves
    on two threads (Pillow lets go of the GIL while it resamples): the same pixels, since each
    half's filter reads the rows it needs beyond its box, up to float rounding of the filter's
    positions."""
    (W, H), (w, h) = image.size, size
    half = h // 2
    if half == 0:
        return image.resize(size, Image.BILINEAR)
    top = _OTHER_HALF.submit(image.resize, (w, half), Image.BILINEAR, (0, 0, W, H * half / h))
    bottom = image.resize((w, h - half), Image.BILINEAR, (0, H * half / h, W, H))
    out = Image.new(image.mode, size)
    out.paste(top.result(), (0, 0))
    out.paste(bottom, (0, half))
    return out


def square_pixels(image: Image.Image, size: int, resize: str = "stretch") -> tuple[np.ndarray, tuple[int, int]]:
    """An RGB image -> (pixels (size, size, 3) uint8, content (h, w)) as the detector sees it:
    "stretch" resizes to size x size (content the whole square); "pad" keeps the aspect ratio
    (longer side = size), puts the image at the top left and fills the rest by mirroring it."""
    image = image.convert("RGB")
    if resize != "pad":
        return np.asarray(resize_image(image, (size, size))), (size, size)
    scale = size / max(image.width, image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    small = np.asarray(resize_image(image, (w, h)))
    return np.pad(small, ((0, size - h), (0, size - w), (0, 0)), mode="symmetric"), (h, w)

