"""Metric summaries and writers (a leaf: imports nothing of rnnjax).

Metrics travel as additive on-device sums ``{"loss_sum", "correct", "count"}``; only
:func:`summarize`, called at a log interval, brings them to the host.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from rnnjax import atomic


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


def steps_phrase(steps: int) -> str:
    """``"1 step"``, ``"300 steps"``: how many steps a run has taken, for its messages."""
    return f"{steps} step" if steps == 1 else f"{steps} steps"


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError of the writes to ``path`` in the block names it: a file object's write,
    flush and close raise theirs (a full disk's) without a file name."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


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
        with naming(Path(self._jsonl.name)):
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        with naming(Path(self._csv_file.name)):
            self._csv.writerow(record)
            self._csv_file.flush()

    def close(self) -> None:
        try:
            with naming(Path(self._jsonl.name)):
                self._jsonl.close()
        finally:
            with naming(Path(self._csv_file.name)):
                self._csv_file.close()


class MetricsFileError(ValueError):
    """A metrics file with a damaged line that is not a last line cut short by a kill."""


def _text(path: Path) -> str:
    """``path``'s text: a byte that is not is a :class:`MetricsFileError` (never a kill's
    doing: the records are ASCII)."""
    try:
        return path.read_text()
    except UnicodeDecodeError as e:
        raise MetricsFileError(
            f"{path}: byte {e.start} is not text (metrics records are ASCII); repair or "
            "delete the file, then run again"
        ) from None


def _parsed_lines(path: Path, parse: Callable[[int, str], Any]) -> list[tuple[str, Any]]:
    """``(line, parse(number, line))`` for each line of ``path`` (numbered from 1).

    ``parse`` returns None for a line that is not a record. Only the last line may be
    one, and only when it lacks its newline: a write cut short by a kill, dropped. Any
    other is a :class:`MetricsFileError` naming the file and the line.
    """
    text = _text(path)
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the file ends with a newline: no line was cut short
    out = []
    for number, line in enumerate(lines, 1):
        parsed = parse(number, line)
        if parsed is not None:
            out.append((line, parsed))
        elif number < len(lines) or text.endswith("\n"):
            raise MetricsFileError(
                f"{path}: line {number} is not a metrics record ({line[:60]!r}) and not a "
                f"last line cut short by a kill; repair or delete line {number}, then run "
                "again"
            )
    return out


def _jsonl_record(number: int, line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (a last line cut short by a kill is skipped;
    any other damaged line is a :class:`MetricsFileError`)."""
    return [record for _, record in _parsed_lines(path, _jsonl_record)]


def kept_metrics(directory: Path, last_step: int
                 ) -> tuple[list[dict[str, Any]], Callable[[], None]]:
    """The ``metrics.jsonl`` records with ``step <= last_step``, and the function that
    keeps only those in ``metrics.jsonl``/``.csv``.

    A resumed run truncates so before it appends its first line, so that lines logged
    after its checkpoint are not duplicated; a last line cut short by a kill goes too. A
    damaged line before the last is a :class:`MetricsFileError`, raised here, before
    anything is rewritten. Each file is rewritten whole into a temporary file, then renamed
    over the old one.
    """
    kept: list[dict[str, Any]] = []
    jsonl = directory / "metrics.jsonl"
    path = directory / "metrics.csv"
    pairs = _parsed_lines(jsonl, _jsonl_record) if jsonl.exists() else None
    rows = None
    text = _text(path) if path.exists() else ""
    if text:
        header = next(csv.reader([text.split("\n", 1)[0]]))
        index = header.index("step") if "step" in header else 0

        def csv_step(number: int, line: str) -> int | None:
            if number == 1:
                return -1  # the header: kept
            row = next(csv.reader([line]), [])
            try:
                return int(row[index]) if len(row) == len(header) else None
            except ValueError:
                return None

        rows = _parsed_lines(path, csv_step)
    if pairs is not None:
        pairs = [p for p in pairs if p[1]["step"] <= last_step]
        kept = [record for _, record in pairs]

    def truncate() -> None:
        if pairs is not None:
            atomic.write_text(jsonl, "".join(line + "\n" for line, _ in pairs))
        if rows is not None:
            # The csv module ends rows with \r\n (read_text gave them back as \n).
            atomic.write_text(path, "".join(line + "\r\n" for line, step in rows
                                          if step <= last_step))

    return kept, truncate


def history_from_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``metrics.jsonl`` records -> the loop's history entries, one per step.

    ``{"step", "wall_s", "split": "train", "loss", ...}`` and the ``test`` record of the
    same step become ``{"step", "wall_s", "train_loss", ..., "test_loss", ...}``.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for record in records:
        entry = by_step.setdefault(record["step"], {"step": record["step"]})
        entry.setdefault("wall_s", record.get("wall_s"))
        for key, value in record.items():
            if key not in ("step", "split", "wall_s"):
                entry[f"{record['split']}_{key}"] = value
    return [by_step[step] for step in sorted(by_step)]


class TensorBoardWriter:
    """Scalars ``SPLIT/NAME`` in a TensorBoard event file of its own in a directory.

    Written in this thread, each log point flushed, in tensorboardX's record format (a
    light dependency of rnnjax; :func:`open` returns None, with a note, without it): its
    ``SummaryWriter`` writes from a thread of its own and flushes again at exit, so a full
    disk printed its error twice more as tracebacks after the run's one line, naming no
    file. ``purge_step``: on resume, TensorBoard drops events at or after it that earlier
    event files hold (the steps the resumed run logs again).
    """

    def __init__(self, records: Any, path: Path) -> None:
        self._records = records  # tensorboardX's RecordWriter
        self.path = path

    @classmethod
    def open(
        cls, directory: Path, *, purge_step: int | None = None, note: TextIO | None = None
    ) -> TensorBoardWriter | None:
        try:
            from tensorboardX.proto.event_pb2 import Event, SessionLog
            from tensorboardX.record_writer import RecordWriter
        except ImportError:
            (note or sys.stderr).write(
                "rnnjax: note: no TensorBoard event files (pip install tensorboardX)\n")
            return None
        # A diverged run logs inf/NaN on purpose; the loop reports it in one line.
        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        path, n = directory / name, 0
        while path.exists():  # a run started in the same second as the last: a file apart
            n += 1
            path = directory / f"{name}.{n}"
        with naming(path):
            writer = cls(RecordWriter(str(path)), path)
            now = time.time()
            writer._add(Event(wall_time=now, step=purge_step or 0, file_version="brain.Event:2"))
            if purge_step is not None:
                writer._add(Event(wall_time=now, step=purge_step,
                                  session_log=SessionLog(status=SessionLog.START)))
            writer._records.flush()
        return writer

    def _add(self, event: Any) -> None:
        self._records.write(event.SerializeToString())

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        """One scalar per numeric entry of ``values`` (``step`` and ``wall_s`` excluded)."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        with naming(self.path):
            for key, value in values.items():
                if key not in ("step", "split", "wall_s") and isinstance(value, int | float):
                    self._add(Event(wall_time=now, step=step,
                                    summary=scalar(f"{split}/{key}", float(value))))
            self._records.flush()

    def close(self) -> None:
        with naming(self.path):
            self._records.close()


class Progress:
    """A one-line progress display with steps/s and ETA, on a terminal only."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None):
        """``stream``: where to draw (default: ``sys.stderr`` as it is when called, not as
        it was when this module was imported)."""
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty() if enabled is None else enabled
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
