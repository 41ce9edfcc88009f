"""Metric summaries and writers (a leaf: imports nothing of rnnjax).

Metrics travel as additive on-device sums ``{"loss_sum", "correct", "count"}``; only
:func:`summarize`, called at a log interval, brings them to the host.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """``{"loss", "accuracy"}`` means from additive sums (one device-to-host transfer)."""
    host = jax.device_get(sums)
    count = int(host["count"])
    if count == 0:
        return {"loss": math.nan, "accuracy": math.nan}
    return {
        "loss": float(host["loss_sum"]) / count,
        "accuracy": int(host["correct"]) / count,
    }


def seed_line(loss: float, accuracy: float) -> str:
    """The Keras tutorial's evaluation line, e.g. ``test cost:  0.2329 test accuracy:  0.9337``."""
    return f"test cost:  {loss:.4f} test accuracy:  {accuracy:.4f}"


class MetricWriter:
    """Appends one record per log point to ``metrics.jsonl`` and ``metrics.csv``.

    Each record is flushed as written, so a killed run keeps every line logged before it.
    """

    FIELDS = ("step", "split", "loss", "accuracy", "wall_s")

    def __init__(self, directory: Path, *, append: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        mode = "a" if append else "w"
        self._jsonl = open(directory / "metrics.jsonl", mode)  # noqa: SIM115 (closed in close)
        new_csv = not append or not (directory / "metrics.csv").exists()
        self._csv_file = open(directory / "metrics.csv", mode, newline="")  # noqa: SIM115
        self._csv = csv.DictWriter(self._csv_file, self.FIELDS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._csv.writerow(record)
        self._csv_file.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """A one-line progress display with steps/s and ETA, on a terminal only."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, enabled: bool | None = None):
        self.total = total
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self._start = time.perf_counter()
        self._first_step: int | None = None

    def update(self, step: int) -> None:
        """Report that ``step`` steps are done."""
        now = time.perf_counter()
        if self._first_step is None:
            self._first_step, self._start = step, now
            rate = math.nan
        else:
            done = step - self._first_step
            rate = done / max(now - self._start, 1e-9)
        if not self.enabled:
            return
        eta = (self.total - step) / rate if rate and np.isfinite(rate) else math.nan
        width = 30
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        eta_text = "?" if math.isnan(eta) else f"{eta:.0f}s"
        rate_text = "?" if math.isnan(rate) else f"{rate:.0f}"
        self.stream.write(
            f"\r[{bar}] {step}/{self.total} {rate_text} steps/s ETA {eta_text}   "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()
