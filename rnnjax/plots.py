"""PNG figures: learning curves of a run, the confusion matrix of an evaluation (a leaf).

Drawn on matplotlib's Agg canvas through ``matplotlib.figure.Figure``: no pyplot, no
global backend switch, no display needed. matplotlib is imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    """Write atomically: a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)
    return path


def learning_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train/test loss and accuracy against the step, from the loop's history entries."""
    figure = _figure(10, 4)
    loss_ax, acc_ax = figure.subplots(1, 2)
    steps = [h["step"] for h in history]
    for split, style in (("train", "-o"), ("test", "-s")):
        for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            values = [h.get(f"{split}_{name}", np.nan) for h in history]
            ax.plot(steps, values, style, markersize=3, label=split)
    loss_ax.set(xlabel="step", ylabel="cross-entropy", title="loss")
    acc_ax.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def confusion_matrix(matrix: np.ndarray, path: Path, title: str = "") -> Path:
    """``matrix[true, predicted]`` counts as a heat map with each cell's count written."""
    matrix = np.asarray(matrix)
    classes = matrix.shape[0]
    figure = _figure(1.0 + 0.6 * classes, 0.6 + 0.6 * classes)
    ax = figure.subplots()
    # Row-normalised colours (recall per class), raw counts as text.
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for t in range(classes):
        for p in range(classes):
            ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=8,
                    color="white" if rates[t, p] > 0.5 else "black")
    ax.set(xticks=range(classes), yticks=range(classes), xlabel="predicted class",
           ylabel="true class", title=title or "confusion matrix")
    figure.colorbar(image, ax=ax, label="fraction of the true class")
    return _save(figure, path)
