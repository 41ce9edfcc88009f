"""PNG figures: learning curves of a run, the confusion matrix of an evaluation (a leaf).

Drawn with Pillow (which ``rnnjax predict`` reads images with) at :data:`SCALE` times the
size and scaled down, which smooths lines and text. No plotting library: in a fresh
process matplotlib's import took 0.42-0.46 s and its learning curves 0.28-0.37 s, of a
seed run of 5-6 s; Pillow's import takes 0.02 s and these curves 0.08 s (AVX-512 EPYC,
2026-12-02).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rnnjax import atomic

SCALE = 2  # drawn at this many pixels per pixel written, then scaled down
WHITE, BLACK, GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)
SERIES = {"train": ((31, 119, 180), "circle"), "test": ((255, 127, 14), "square")}
# matplotlib's "Blues", from 0 to 1 in equal steps: a count's share of its true class.
BLUES = ((247, 251, 255), (222, 235, 247), (198, 219, 239), (158, 202, 225), (107, 174, 214),
         (66, 146, 198), (33, 113, 181), (8, 81, 156), (8, 48, 107))

Color = tuple[int, int, int]
Box = tuple[float, float, float, float]  # left, top, right, bottom, in drawn pixels


def _font(size: int) -> Any:
    """Pillow's own font at ``size`` pixels written (its bitmap font without FreeType)."""
    return ImageFont.load_default(size=size * SCALE)


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int,
          anchor: str = "mm", fill: Color = BLACK) -> None:
    """``text`` placed by its ink's box: ``anchor`` is left/middle/right, then
    top/middle/bottom (placed by hand: Pillow's bitmap font takes no anchor)."""
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - left - {"l": 0.0, "m": 0.5, "r": 1.0}[anchor[0]] * (right - left)
    y = xy[1] - top - {"t": 0.0, "m": 0.5, "b": 1.0}[anchor[1]] * (bottom - top)
    draw.text((x, y), text, fill=fill, font=font)


def _vertical_text(image: Image.Image, xy: tuple[float, float], text: str, size: int) -> None:
    """``text`` turned a quarter left, centred on ``xy`` (an axis label)."""
    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (int(right - left) + 2, int(bottom - top) + 2))
    ImageDraw.Draw(mask).text((1 - left, 1 - top), text, fill=255, font=font)
    mask = mask.rotate(90, expand=True)
    x, y = int(xy[0] - mask.width / 2), int(xy[1] - mask.height / 2)
    image.paste(BLACK, (x, y, x + mask.width, y + mask.height), mask)


def ticks(low: float, high: float, most: int = 6) -> tuple[list[float], float]:
    """Round values covering ``[low, high]`` (steps of 1, 2 or 5 times a power of ten, at
    most about ``most`` of them) and their step."""
    if not high > low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / most
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    count = math.floor((high - first) / step + 1e-9) + 1
    return [first + i * step for i in range(count)], step


def tick_label(value: float, step: float) -> str:
    """``value`` with as many decimals as ``step`` needs."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


def _panel(image: Image.Image, box: Box, steps: Sequence[float],
           series: dict[str, list[float]], title: str, ylabel: str,
           ylim: tuple[float, float] | None = None, legend: str = "top") -> None:
    """One chart in ``box``: each series against ``steps`` (NaN: no point), with a grid,
    ticks, a title, axis labels and a legend."""
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    values = [v for vs in series.values() for v in vs if math.isfinite(v)]
    x0, x1 = (min(steps), max(steps)) if steps else (0.0, 1.0)
    pad = 0.05 * ((x1 - x0) or 1.0)
    x0, x1 = x0 - pad, x1 + pad
    if ylim is None:
        y0, y1 = (min(values), max(values)) if values else (0.0, 1.0)
        pad = 0.05 * ((y1 - y0) or 1.0)
        y0, y1 = y0 - pad, y1 + pad
    else:
        y0, y1 = ylim

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (y - y0) / (y1 - y0) * (bottom - top))

    s = SCALE
    xticks, xstep = ticks(x0, x1)
    yticks, ystep = ticks(y0, y1)
    for x in xticks:
        px = at(x, y0)[0]
        draw.line([(px, top), (px, bottom)], fill=GRID, width=s)
        _text(draw, (px, bottom + 6 * s), tick_label(x, xstep), 11, "mt")
    for y in yticks:
        py = at(x0, y)[1]
        draw.line([(left, py), (right, py)], fill=GRID, width=s)
        _text(draw, (left - 6 * s, py), tick_label(y, ystep), 11, "rm")
    draw.rectangle(box, outline=BLACK, width=s)
    for name, vs in series.items():
        color, marker = SERIES[name]
        points = [at(x, y) if math.isfinite(y) else None for x, y in zip(steps, vs, strict=True)]
        for a, b in itertools.pairwise(points):
            if a and b:
                draw.line([a, b], fill=color, width=2 * s)
        for p in points:
            if p:
                _marker(draw, p, color, marker)
    _text(draw, ((left + right) / 2, top - 8 * s), title, 14, "mb")
    _text(draw, ((left + right) / 2, bottom + 26 * s), "step", 12, "mt")
    _vertical_text(image, (left - 50 * s, (top + bottom) / 2), ylabel, 12)
    # The legend, in the right corner the curves leave free (``legend``: "top" or "bottom").
    rows = len(series)
    first = top + 14 * s if legend == "top" else bottom - (14 + 18 * (rows - 1)) * s
    draw.rectangle((right - 78 * s, first - 10 * s, right - 8 * s, first + (18 * rows - 8) * s),
                   fill=WHITE, outline=GRID, width=s)
    for i, name in enumerate(series):
        color, marker = SERIES[name]
        y = first + 18 * i * s
        draw.line([(right - 70 * s, y), (right - 46 * s, y)], fill=color, width=2 * s)
        _marker(draw, (right - 58 * s, y), color, marker)
        _text(draw, (right - 40 * s, y), name, 12, "lm")


def _marker(draw: ImageDraw.ImageDraw, p: tuple[float, float], color: Color,
            shape: str) -> None:
    r = 3 * SCALE
    box = (p[0] - r, p[1] - r, p[0] + r, p[1] + r)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)


def _save(image: Image.Image, path: Path) -> Path:
    """Scaled down to the size written; written atomically: a reader never sees half a
    PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (image.width // SCALE, image.height // SCALE)
    return atomic.write(path, lambda f: image.resize(size, Image.Resampling.LANCZOS)
                        .save(f, format="PNG"))


def learning_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train/test loss and accuracy against the step, from the loop's history entries: a
    1000 x 400 PNG."""
    s = SCALE
    image = Image.new("RGB", (1000 * s, 400 * s), WHITE)
    steps = [h["step"] for h in history]
    top = 70 if title else 40
    for i, (name, label, ylim, legend) in enumerate((
            ("loss", "cross-entropy", None, "top"),
            ("accuracy", "accuracy", (0.0, 1.0), "bottom"))):
        series = {split: [float(h.get(f"{split}_{name}", np.nan)) for h in history]
                  for split in SERIES}
        box = ((500 * i + 80) * s, top * s, (500 * i + 480) * s, 340 * s)
        _panel(image, box, steps, series, name, label, ylim, legend)
    if title:
        _text(ImageDraw.Draw(image), (500 * s, 12 * s), title, 15, "mt")
    return _save(image, path)


def blues(rate: float) -> Color:
    """The colour of a share ``rate`` in [0, 1] (:data:`BLUES`, linearly between)."""
    return tuple(int(c) for c in blues_of(np.asarray(rate)))  # type: ignore[return-value]


def blues_of(rates: np.ndarray) -> np.ndarray:
    """The colours of every share in ``rates`` (each clipped to [0, 1]; :data:`BLUES`,
    linearly between, rounded half to even): uint8 ``[..., 3]``."""
    table = np.asarray(BLUES, np.float64)
    x = np.clip(rates, 0.0, 1.0) * (len(BLUES) - 1)
    i = np.minimum(x.astype(int), len(BLUES) - 2)
    f = (x - i)[..., None]
    return np.rint(table[i] + (table[i + 1] - table[i]) * f).astype(np.uint8)


def confusion_matrix(matrix: np.ndarray, path: Path, title: str = "") -> Path:
    """``matrix[true, predicted]`` counts as a heat map, each cell coloured by its share of
    its true class (recall per class) with its count written, and a colour bar."""
    matrix = np.asarray(matrix)
    classes = matrix.shape[0]
    s = SCALE
    # 48 pixels a class from 5 to 13 classes; fewer, larger ones fill 240, more share 640
    # (at least 1 pixel each: 16 had made 1,000 classes a 16,000-pixel grid, minutes to draw).
    cell = max(1, min(max(48, 240 // classes), 640 // classes))
    size = max(6, min(11, cell // 4))  # of the counts, written where a cell holds them
    every = -(-16 // cell)  # a class's number on the axes every this many classes
    left, top = 90, 50
    grid = cell * classes
    width, height = left + grid + 130, top + grid + 70
    image = Image.new("RGB", (width * s, height * s), WHITE)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    cells = blues_of(rates).repeat(cell * s, axis=0).repeat(cell * s, axis=1)
    image.paste(Image.fromarray(cells, "RGB"), (left * s, top * s))
    draw = ImageDraw.Draw(image)
    if cell >= 16:
        for t in range(classes):
            for p in range(classes):
                x, y = (left + p * cell + cell / 2) * s, (top + t * cell + cell / 2) * s
                _text(draw, (x, y), str(matrix[t, p]), size,
                      fill=WHITE if rates[t, p] > 0.5 else BLACK)
    draw.rectangle((left * s, top * s, (left + grid) * s, (top + grid) * s), outline=BLACK,
                   width=s)
    for k in range(0, classes, every):
        centre = (left + k * cell + cell / 2) * s
        _text(draw, (centre, (top + grid + 6) * s), str(k), max(size, 8), "mt")
        _text(draw, ((left - 6) * s, (top + k * cell + cell / 2) * s), str(k), max(size, 8),
              "rm")
    _text(draw, ((left + grid / 2) * s, (top + grid + 28) * s), "predicted class", 12, "mt")
    _vertical_text(image, ((left - 45) * s, (top + grid / 2) * s), "true class", 12)
    _text(draw, ((left + grid / 2) * s, (top - 12) * s), title or "confusion matrix", 14, "mb")
    # The colour bar: the share from 0 (bottom) to 1 (top).
    bar = left + grid + 25
    shades = blues_of(1 - np.arange(grid * s) / (grid * s))[:, None]
    image.paste(Image.fromarray(shades.repeat(18 * s, axis=1), "RGB"), (bar * s, top * s))
    draw.rectangle((bar * s, top * s, (bar + 18) * s, (top + grid) * s), outline=BLACK, width=s)
    for share in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        y = (top + grid * (1 - share)) * s
        draw.line([((bar + 18) * s, y), ((bar + 22) * s, y)], fill=BLACK, width=s)
        _text(draw, ((bar + 26) * s, y), f"{share:.1f}", 11, "lm")
    _vertical_text(image, ((bar + 75) * s, (top + grid / 2) * s), "fraction of the true class",
                   12)
    return _save(image, path)
