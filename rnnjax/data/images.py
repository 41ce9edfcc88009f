"""Any picture of a digit -> a 28x28 MNIST-style image, the way MNIST itself was made.

MNIST's digits are white ink on black; each was scaled, anti-aliased, to fit a 20x20 box
keeping its aspect ratio, then placed in a 28x28 field so that its centre of mass sits at
the centre. :func:`to_mnist` applies the same steps to an arbitrary image:

1. :func:`to_grayscale`: colour to luma (ITU-R 601-2, as Pillow's ``L``), alpha over white;
2. :func:`ink_on_black`: invert when the background is light (border mean > 127);
3. :func:`stretch_contrast`: background (border median) to 0, the brightest ink to 255;
4. :func:`ink_bbox` and crop to the ink;
5. :func:`fit_to_box`: longer side to 20 px, aspect kept (:func:`resize`, anti-aliased);
6. :func:`center_by_mass`: paste into 28x28 with the centre of mass at the centre.

Everything here is pure NumPy except :func:`read_image`, which reads a file with Pillow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 28  # the MNIST field
BOX = 20  # the box the digit is fitted into
LIGHT = 127.0  # a border mean above this is a light background


class ImageError(ValueError):
    """An image that cannot be read or holds no digit; the message says the fix."""


def read_image(path: Path | str) -> np.ndarray:
    """The pixels of an image file (PNG, JPEG, anything Pillow reads), as NumPy.

    Returns uint8 ``[H, W]`` (grey), ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA), or
    uint16 ``[H, W]`` for 16-bit greys (32-bit integer and float greys scaled to uint8:
    floats of at most 1 read as 0..1, others as 0..255, beyond that 0..65535). EXIF
    orientation is applied.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError as e:
        raise ImageError(f"image {path}: no such file; pass an existing image file") from e
    except IsADirectoryError as e:
        raise ImageError(f"image {path}: is a directory; pass an image file") from e
    except PermissionError as e:
        raise ImageError(f"image {path}: not readable (permission denied); "
                         "make it readable or pass another file") from e
    except Image.DecompressionBombError as e:  # Pillow's guard against decompression bombs
        raise ImageError(f"image {path}: too large, over {2 * Image.MAX_IMAGE_PIXELS:,} "
                         "pixels (Pillow refuses it as a possible decompression bomb); pass "
                         "the digit scaled down or cropped") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"image {path}: not an image file Pillow can read; "
                         "pass a PNG or JPEG (or another format Pillow reads)") from e
    except (OSError, ValueError, SyntaxError) as e:  # truncated or damaged data
        raise ImageError(f"image {path}: unreadable ({e}); pass an undamaged image file"
                         ) from e
    if image.mode in ("L", "RGB", "RGBA"):
        return np.asarray(image)
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if image.mode in ("I", "F"):  # 32-bit integers or floats: the range tells the scale
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise ImageError(f"image {path}: pixels that are not numbers (NaN or infinite); "
                             "pass an image of finite pixels")
        top = pixels.max(initial=0)
        scale = (65535.0 if top > 255 else
                 1.0 if image.mode == "F" and top <= 1 else 255.0)  # floats in [0, 1]
        return np.clip(np.round(pixels / scale * 255), 0, 255).astype(np.uint8)
    has_alpha = "A" in image.mode or "transparency" in image.info
    return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))


def to_paper(pixels: np.ndarray) -> np.ndarray:
    """Pixels ``[H, W]``, ``[H, W, 1|2|3|4]`` -> float64 ``[H, W]``, ``[H, W, 1]`` or
    ``[H, W, 3]`` in 0..255, an alpha channel composited over white (a transparent
    background is paper). uint8 is 0..255, uint16 0..65535, bool 0/1, floats 0..1."""
    pixels = np.asarray(pixels)
    if pixels.dtype == np.bool_:
        values = pixels.astype(np.float64) * 255.0
    elif pixels.dtype == np.uint16:
        values = pixels.astype(np.float64) / 257.0
    elif np.issubdtype(pixels.dtype, np.floating):
        values = pixels.astype(np.float64) * 255.0
    else:
        values = pixels.astype(np.float64)
    if values.ndim == 2:
        return values
    if values.ndim != 3 or values.shape[-1] not in (1, 2, 3, 4):
        raise ImageError(f"pixels of shape {pixels.shape} are not an image [H, W(, C)]")
    if values.shape[-1] in (2, 4):
        alpha = values[..., -1:] / 255.0
        values = values[..., :-1] * alpha + 255.0 * (1.0 - alpha)
    return values


def to_grayscale(pixels: np.ndarray) -> np.ndarray:
    """Pixels ``[H, W]``, ``[H, W, 1|2|3|4]`` -> float64 grey ``[H, W]`` in 0..255
    (:func:`to_paper`): colour becomes luma ``0.299 R + 0.587 G + 0.114 B`` (Pillow's
    ``L``)."""
    values = to_paper(pixels)
    if values.ndim == 2:
        return values
    if values.shape[-1] == 1:
        return values[..., 0]
    return values @ np.array([0.299, 0.587, 0.114])


def border(gray: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels of ``[H, W]``, flattened."""
    if min(gray.shape) <= 2:
        return gray.ravel()
    return np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])


def ink_on_black(gray: np.ndarray) -> np.ndarray:
    """Bright ink on a dark background: ``gray`` inverted when its border mean is light."""
    return 255.0 - gray if border(gray).mean() > LIGHT else gray


def stretch_contrast(ink: np.ndarray, min_range: float = 16.0) -> np.ndarray:
    """Map the background level (border median) to 0 and the brightest ink to 255.

    Paper grey, shadows and JPEG noise end at 0 as MNIST's background; a faint stroke
    becomes full-scale ink. Raises :class:`ImageError` when the brightest pixel is less
    than ``min_range`` above the background: there is no ink.
    """
    background = float(np.median(border(ink)))
    peak = float(ink.max())
    if peak - background < min_range:
        raise ImageError("no ink found (the image is blank or has too little contrast); "
                         "pass an image of a dark digit on light paper or a light one on dark")
    return np.clip((ink - background) / (peak - background), 0.0, 1.0) * 255.0


def ink_bbox(ink: np.ndarray, threshold: float = 0.1 * 255) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)``, end exclusive, of the pixels above ``threshold``."""
    rows = np.flatnonzero((ink > threshold).any(axis=1))
    cols = np.flatnonzero((ink > threshold).any(axis=0))
    if rows.size == 0:
        raise ImageError("no ink found (the image is blank); pass an image of a digit")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _resample_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Weights ``[size_out, size_in]`` of a triangle (linear) filter, widened when shrinking
    so that every input pixel contributes (anti-aliasing, as Pillow's BILINEAR)."""
    scale = size_in / size_out
    support = max(scale, 1.0)
    centres = (np.arange(size_out) + 0.5) * scale
    x = np.arange(size_in) + 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(x[None, :] - centres[:, None]) / support)
    return weights / weights.sum(axis=1, keepdims=True)


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` -> ``shape``, separable anti-aliased linear resampling (float64)."""
    rows = _resample_matrix(image.shape[0], shape[0])
    cols = _resample_matrix(image.shape[1], shape[1])
    return rows @ np.asarray(image, np.float64) @ cols.T


def fit_to_box(ink: np.ndarray, box: int = BOX) -> np.ndarray:
    """Scale so that the longer side is ``box`` pixels, keeping the aspect ratio."""
    height, width = ink.shape
    scale = box / max(height, width)
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    return resize(ink, shape)


def center_of_mass(image: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted mean ``(row, col)`` in pixel-index coordinates."""
    total = image.sum()
    if total <= 0:
        return (image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2
    rows = np.arange(image.shape[0]) @ image.sum(axis=1) / total
    cols = np.arange(image.shape[1]) @ image.sum(axis=0) / total
    return float(rows), float(cols)


def center_by_mass(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Paste ``image`` into a ``size`` x ``size`` black field, shifted by whole pixels so
    its centre of mass lands at ``(size/2, size/2)`` in pixel-index coordinates, where
    MNIST's digits have theirs (mean (13.99, 14.00) over its test set); whatever would
    fall outside the field is cut off."""
    field = np.zeros((size, size), np.float64)
    cy, cx = center_of_mass(image)
    top = round(size / 2 - cy)
    left = round(size / 2 - cx)
    height, width = image.shape
    # Intersection of the shifted image with the field.
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, size), min(left + width, size)
    if y0 < y1 and x0 < x1:
        field[y0:y1, x0:x1] = image[y0 - top:y1 - top, x0 - left:x1 - left]
    return field


def to_mnist(pixels: np.ndarray) -> np.ndarray:
    """Any image's pixels (see :func:`to_grayscale`) -> uint8 ``[28, 28]`` as in MNIST."""
    ink = stretch_contrast(ink_on_black(to_grayscale(pixels)))
    top, bottom, left, right = ink_bbox(ink)
    digit = fit_to_box(ink[top:bottom, left:right])
    return np.clip(np.round(center_by_mass(digit)), 0, 255).astype(np.uint8)


def load_as_is(path: Path | str, image_shape: tuple[int, int, int]) -> np.ndarray:
    """An image file as a model of ``image_shape`` ``(H, W, C)`` reads its dataset's
    images, its pixels as they are (``rnnjax predict --as-is``: Fashion-MNIST, a colour
    set; no digit's crop, fit or centring): uint8 ``[H, W]`` grey for C 1
    (:func:`to_grayscale`), ``[H, W, 3]`` for C 3 (:func:`to_paper`; a grey file's grey in
    each channel). ImageError, naming the file and the fix, for another size."""
    h, w, c = image_shape
    pixels = read_image(path)
    if c == 1:
        values = to_grayscale(pixels)
    else:
        values = to_paper(pixels)
        if values.ndim == 2 or values.shape[-1] == 1:  # a grey file: its grey in each
            values = np.repeat(values.reshape(*values.shape[:2], 1), 3, axis=-1)
    if values.shape[:2] != (h, w):
        raise ImageError(f"image {path}: {values.shape[1]}x{values.shape[0]} pixels; --as-is "
                         f"reads the model's own {w}x{h} images as they are: resize it to "
                         f"{w}x{h} first")
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def load_mnist_image(path: Path | str) -> np.ndarray:
    """:func:`read_image` then :func:`to_mnist`; errors name the file."""
    pixels = read_image(path)
    try:
        return to_mnist(pixels)
    except ImageError as e:
        raise ImageError(f"image {path}: {e}") from e
