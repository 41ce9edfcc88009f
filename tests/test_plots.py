"""The figures (rnnjax.plots): drawn with Pillow, what they show where it shows it."""

import concurrent.futures
import math
import os
import threading

import numpy as np
import pytest
from PIL import Image, ImageFont

from rnnjax import atomic, plots


def _history(n: int = 9) -> list[dict]:
    return [{"step": 500 * i, "train_loss": 2.0 / (i + 1), "test_loss": 2.2 / (i + 1),
             "train_accuracy": 0.9 - 0.8 / (i + 1), "test_accuracy": 0.91 - 0.8 / (i + 1)}
            for i in range(n)]


def _count(image: Image.Image, box: tuple[int, int, int, int], colour, tol: int = 40) -> int:
    """Pixels in ``box`` within ``tol`` of ``colour`` (each channel)."""
    pixels = np.asarray(image.convert("RGB").crop(box)).astype(int)
    return int((np.abs(pixels - np.array(colour)).max(axis=-1) <= tol).sum())


def test_ticks_are_round_and_cover_the_range():
    assert plots.ticks(0, 4000) == ([0, 1000, 2000, 3000, 4000], 1000)
    values, step = plots.ticks(0.0, 1.0)
    assert step == pytest.approx(0.2)
    assert [plots.tick_label(v, step) for v in values] == ["0.0", "0.2", "0.4", "0.6", "0.8",
                                                            "1.0"]
    values, step = plots.ticks(0.17, 2.09)
    assert values[0] >= 0.17 and values[-1] <= 2.09 and len(values) <= 7
    assert all(math.isclose(v / step, round(v / step)) for v in values)
    values, _ = plots.ticks(3.0, 3.0)  # a single value: a unit around it
    assert values and all(2.5 <= v <= 3.5 for v in values)


def test_blues_runs_from_white_to_dark_blue():
    assert plots.blues(0.0) == plots.BLUES[0]
    assert plots.blues(1.0) == plots.BLUES[-1]
    assert plots.blues(-1.0) == plots.BLUES[0] and plots.blues(2.0) == plots.BLUES[-1]
    lightness = [sum(plots.blues(r / 10)) for r in range(11)]
    assert lightness == sorted(lightness, reverse=True)


def _mean_row(image: Image.Image, box: tuple[int, int, int, int], colour, tol: int = 40
              ) -> float:
    """The mean row (0 at the image's top) of the pixels in ``box`` within ``tol`` of
    ``colour``."""
    pixels = np.asarray(image.convert("RGB").crop(box)).astype(int)
    rows, _ = np.nonzero(np.abs(pixels - np.array(colour)).max(axis=-1) <= tol)
    assert rows.size > 20, f"no curve of {colour} in {box}"
    return box[1] + float(rows.mean())


def test_learning_curves_draw_both_series_in_both_panels(tmp_path):
    """Each series in each panel, the right way up: the falling losses end lower in the
    image than they start and the rising accuracies higher (their colours' mean row in the
    panel's first tenth against a tenth before its right end, clear of the legend); the
    colours had been counted, not placed, and curves drawn upside down passed."""
    history = _history()
    history[3]["test_loss"] = float("nan")  # no point there, the rest still drawn
    path = plots.learning_curves(history, tmp_path / "sub" / "curves.png", "a title")
    assert path.read_bytes().startswith(b"\x89PNG")
    image = Image.open(path)
    assert image.size == (1000, 400)
    for panel in ((80, 70, 480, 340), (580, 70, 980, 340)):
        for colour, _ in plots.SERIES.values():
            assert _count(image, panel, colour) > 200
    for (left, top, right, bottom), rising in (((80, 70, 480, 340), False),
                                               ((580, 70, 980, 340), True)):
        start, end = (left + 2, top, left + 42, bottom), (right - 122, top, right - 82, bottom)
        for colour, _ in plots.SERIES.values():
            climb = _mean_row(image, start, colour) - _mean_row(image, end, colour)
            assert (climb if rising else -climb) > 100, (colour, climb)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["curves.png"]  # no temporary


def test_writers_of_one_path_share_no_temporary_and_touch_no_ones_tmp(tmp_path):
    # Two evals of one workdir write one PNG at once; a user's NAME.png.tmp is theirs.
    path = tmp_path / "m.png"
    theirs = tmp_path / "m.png.tmp"
    theirs.write_bytes(b"someone's")
    entered = threading.Barrier(2)

    def fill(f):
        entered.wait(timeout=30)  # both writers hold a temporary file at once
        f.write(b"\x89PNG whole")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = [pool.submit(atomic.write, path, fill) for _ in range(2)]
        assert [r.result(timeout=60) for r in results] == [path, path]
    assert path.read_bytes() == b"\x89PNG whole"
    assert theirs.read_bytes() == b"someone's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "m.png.tmp"]
    mode = path.stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()  # as open() makes files, not mkstemp's 0600


def _umask():
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def test_learning_curves_of_one_entry_or_none_still_draw(tmp_path):
    for history in (_history(1), []):
        image = Image.open(plots.learning_curves(history, tmp_path / "c.png"))
        assert image.size == (1000, 400)


def test_confusion_matrix_colours_each_cell_by_its_share_of_the_true_class(tmp_path):
    matrix = np.array([[90, 10, 0], [0, 50, 50], [0, 0, 7]])
    image = Image.open(plots.confusion_matrix(matrix, tmp_path / "cm.png", "after 3 steps"))
    cell = max(16, min(max(48, 240 // 3), 640 // 3))
    rates = matrix / matrix.sum(axis=1, keepdims=True)
    for t in range(3):
        for p in range(3):  # a corner of the cell, clear of its count
            x, y = 90 + p * cell + 4, 50 + t * cell + 4
            assert _count(image, (x, y, x + 3, y + 3), plots.blues(rates[t, p]), tol=3) == 9


def test_many_classes_get_smaller_cells(tmp_path):
    """Up to 40 classes each cell holds its count; more share 640 pixels, at least one each
    (cells of at least 16 made 1,000 classes a 16,000-pixel grid, minutes of drawing)."""
    image = Image.open(plots.confusion_matrix(np.eye(40, dtype=int), tmp_path / "cm.png"))
    assert image.size == (90 + 16 * 40 + 130, 50 + 16 * 40 + 70)
    image = Image.open(plots.confusion_matrix(np.eye(100, dtype=int), tmp_path / "cm.png"))
    assert image.size == (90 + 6 * 100 + 130, 50 + 6 * 100 + 70)
    for k in (0, 57, 99):  # the diagonal's share 1, the rest 0 (within the scaling's blur)
        x, y = 90 + 6 * k + 3, 50 + 6 * k + 3
        assert _count(image, (x, y, x + 1, y + 1), plots.blues(1.0), tol=6) == 1
        x = x + 6 if k < 99 else x - 6
        assert _count(image, (x, y, x + 1, y + 1), plots.blues(0.0), tol=6) == 1
    image = Image.open(plots.confusion_matrix(np.eye(1000, dtype=int), tmp_path / "cm.png"))
    assert image.size == (90 + 1000 + 130, 50 + 1000 + 70)


def test_the_heat_maps_colours_are_blues_own():
    """blues_of against the interpolation written out one share at a time."""
    def reference(rate):
        x = min(max(rate, 0.0), 1.0) * (len(plots.BLUES) - 1)
        i = min(int(x), len(plots.BLUES) - 2)
        a, b, f = plots.BLUES[i], plots.BLUES[i + 1], x - i
        return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))

    rates = np.linspace(-0.5, 1.5, 2001)
    assert [tuple(c) for c in plots.blues_of(rates)] == [reference(r) for r in rates]
    assert [plots.blues(r) for r in rates[::50]] == [reference(r) for r in rates[::50]]


def test_pillows_bitmap_font_draws_them_too(tmp_path, monkeypatch):
    """Without FreeType Pillow has only its bitmap font, which takes no anchor."""
    monkeypatch.setattr(plots, "_font", lambda size: ImageFont.load_default_imagefont())
    plots.learning_curves(_history(), tmp_path / "c.png", "title")
    plots.confusion_matrix(np.eye(3, dtype=int), tmp_path / "m.png")
    assert Image.open(tmp_path / "c.png").size == (1000, 400)
