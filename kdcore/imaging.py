"""Image files to model input with numpy and Pillow only (no torch).

This is the one definition of how a picture becomes the square a model sees: kdcore's data loading uses it, and
an export bundle carries this file beside ``predict.py``, so the line-side runtime prepares images exactly as
training did. Keep it free of imports beyond the standard library, numpy and Pillow.
"""
from __future__ import annotations

import os
from os import PathLike
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

PathArg = Union[str, "PathLike[str]"]


class DataError(ValueError):
    """Bad dataset: the message always names the offending path."""


#: The largest image accepted, in pixels (width × height), checked from the header before decoding: a small
#: file can declare a huge picture (a 493 KB PNG of 13000×13000 pixels decodes to 500 MB). Raise it with the
#: environment variable ``KDCORE_MAX_IMAGE_PIXELS``.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


def max_image_pixels() -> int:
    value = os.environ.get("KDCORE_MAX_IMAGE_PIXELS", "")
    return int(value) if value.strip().isdigit() else DEFAULT_MAX_IMAGE_PIXELS


def check_pixel_count(img: Image.Image, name: object) -> None:
    """Refuse an opened (not yet decoded) image larger than ``max_image_pixels()``."""
    limit = max_image_pixels()
    if img.width * img.height > limit:
        raise DataError(f"{name} is {img.width}x{img.height} pixels ({img.width * img.height / 1e6:.0f} MP); at most "
                        f"{limit / 1e6:.0f} MP are accepted (raise KDCORE_MAX_IMAGE_PIXELS to allow more)")


#: How an image becomes a square: "stretch" squashes it (the aspect ratio is lost); "letterbox" scales its
#: longer side to the square and fills the rest by repeating the edge pixels, so shapes keep their proportions.
RESIZE_MODES = ("stretch", "letterbox")


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)


def open_upright(path: PathArg) -> Image.Image:
    """Open and decode ``path``, upright as displayed (EXIF orientation applied)."""
    path = Path(path)
    img = None
    try:
        img = Image.open(path)
        check_pixel_count(img, path)
        img.load()
    except DataError:
        img.close()
        raise
    except Exception as err:  # noqa: BLE001 - see probe_image
        if img is not None:
            img.close()  # don't leak the file handle of a half-read image
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    upright = ImageOps.exif_transpose(img)
    if upright is not img:
        img.close()
    return upright


def to_8bit(img: Image.Image) -> Image.Image:
    """Convert to mode 'L' or 'RGB' (8 bits per channel), keeping gray as gray.

    Gray stays single-channel until after resizing: three times less work, same result.
    """
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode.startswith("I;16") or mode == "I":
        # Pillow's own convert clips 16-bit values at 255 (a white image). "I" is how
        # Pillow has opened 16-bit grayscale, so it is scaled as 16-bit too.
        values = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8))
    if mode == "F":
        # No bit depth to go by: take values as 0-255 intensities, as Pillow does.
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        return Image.fromarray(np.round(np.clip(values, 0, 255)).astype(np.uint8))
    if mode in ("1", "LA", "La"):
        return img.convert("L")
    if mode in ("P", "PA"):
        # Via RGBA so palette transparency is resolved rather than warned about.
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")  # RGBA, RGBX, CMYK, YCbCr, ...


def content_box(width: int, height: int, size: int, resize: str) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a width×height picture inside the size×size square ``resize`` makes."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if resize == "stretch":
        return 0, 0, size, size
    scale = size / max(width, height)
    box_w = min(size, max(1, round(width * scale)))
    box_h = min(size, max(1, round(height * scale)))
    return (size - box_h) // 2, (size - box_w) // 2, box_h, box_w


def prepare_model_input(img: Image.Image, size: int, resize: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """An opened image as a model sees it: (size, size, 3) ``uint8`` RGB made by ``resize`` (``RESIZE_MODES``),
    and the picture's ``content_box`` in it. Letterbox margins repeat the edge pixels: a constant border
    would be an edge the networks respond to, at a place that moves with the aspect ratio."""
    size = _check_size(size)
    top, left, box_h, box_w = box = content_box(img.width, img.height, size, resize)
    small = np.asarray(to_8bit(img).resize((box_w, box_h), Image.Resampling.BILINEAR).convert("RGB"),
                       dtype=np.uint8)
    if (box_h, box_w) != (size, size):
        small = np.pad(small, ((top, size - top - box_h), (left, size - left - box_w), (0, 0)), mode="edge")
    return small, box


def read_model_input(path: PathArg, size: int, resize: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``prepare_model_input`` of the file at ``path``."""
    img = open_upright(path)
    try:
        return prepare_model_input(img, size, resize)
    finally:
        img.close()
