"""Honest timing and result files for every benchmark (burn-in, block, median; no TF).

``time_compiled(fn, args)`` compiles ahead of time (compile seconds reported apart), runs
one burn-in call, then times ``repeats`` calls, each ended by ``jax.block_until_ready``.
``write_results(name, rows, ...)`` writes ``results/NAME.json`` (rows + environment) and
``results/NAME.md`` (a markdown table), and the caller may add ``results/NAME.png``.

The benchmarks' flags are checked before anything is timed or tuned, by the argparse
``type`` functions here (:func:`at_least`, :func:`ints_at_least`, :func:`names`,
:func:`cases`, :func:`cell_name`, :func:`cell_names`, :func:`tune_budget`), :func:`checked`,
:func:`results_dir` (the results' directory, written to once at the start) and
:func:`check_batches` (no batch larger than the training set): a bad value is refused as
argparse refuses one, one ``error:`` line naming the flag and the fix, exit 2.
:func:`without_tensorflow` keeps Keras from importing TensorFlow (its seeding imports it
where installed), and :func:`environment` records whether TensorFlow is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import jax

from rnnjax import atomic, cli, runtime
from rnnjax.config import ConfigError

RESULTS = Path(__file__).resolve().parent / "results"
OUT_VAR = "RNNJAX_BENCH_OUT"  # the results' directory where no --out is given


T = TypeVar("T")
Flag = argparse.ArgumentTypeError  # a bad flag value: argparse prints it, exit 2


class Parser(argparse.ArgumentParser):
    """A benchmark's argument parser: a bad flag is one ``error:`` line, exit 2, without
    argparse's usage (``--help`` shows it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of ``low`` or more."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise Flag(f"{text!r}: give an integer of {low} or more")
        return value
    return parse


def ints_at_least(low: int, example: str = "") -> Callable[[str], list[int]]:
    """An argparse ``type``: a comma list of one or more integers, each ``low`` or more;
    ``example``: a good value, for the message (default: two batch sizes)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(word) for word in text.split(",")]
        except ValueError:
            values = [low - 1]
        if min(values) < low:
            raise Flag(f"{text!r}: give integers of {low} or more, comma-separated "
                       f"(e.g. {example or f'{max(low, 50)},{max(low, 50) * 2}'})")
        return values
    return parse


def names(choices: Sequence[str], *, empty: bool = False) -> Callable[[str], list[str]]:
    """An argparse ``type``: a comma list of names among ``choices`` (with ``empty``, ``''``
    is none)."""
    def parse(text: str) -> list[str]:
        words = text.split(",") if text or not empty else []
        if not all(word in choices for word in words):
            raise Flag(f"{text!r}: give {'none or ' if empty else ''}some of "
                       f"{', '.join(choices)}, comma-separated")
        return words
    return parse


def cases(orders: Sequence[str] = ("rows", "pixels"), *,
          empty: bool = False) -> Callable[[str], list[tuple[str, int]]]:
    """An argparse ``type``: ``ORDER:BATCH,...`` as ``[(order, batch)]``, each order among
    ``orders`` and each batch 1 or more (with ``empty``, ``''`` is none)."""
    def parse(text: str) -> list[tuple[str, int]]:
        out = []
        for case in text.split(",") if text or not empty else []:
            order, _, batch = case.partition(":")
            if order not in orders or not batch.isdigit() or int(batch) < 1:
                raise Flag(f"{case!r}: give ORDER:BATCH,..., ORDER {' or '.join(orders)}, "
                           "BATCH a positive integer (e.g. rows:50)")
            out.append((order, int(batch)))
        return out
    return parse


def cell_name(text: str) -> str:
    """An argparse ``type``: a cell ``rnnjax train --cell`` takes (a built-in cell or a Flax
    cell class as MODULE:CLASS), built once to check it."""
    from rnnjax import cells

    try:
        cells.get_cell(text, 1)
    except ValueError as e:
        raise Flag(str(e)) from None
    return text


def cell_names(text: str) -> list[str]:
    """An argparse ``type``: a comma list of :func:`cell_name`'s cells."""
    return [cell_name(name) for name in text.split(",")]


def tune_budget(text: str) -> float:
    """An argparse ``type``: ``--tune-budget``'s seconds, as ``rnnjax train`` takes them
    (``rnnjax.cli.checked_budget``: positive and finite), or 0 (the untuned defaults)."""
    try:
        value = float(text)
        return value if value == 0 else cli.checked_budget(value)
    except (ValueError, cli.UsageError):
        raise Flag(f"{text!r}: give a positive number of seconds, as rnnjax train's "
                   "--tune-budget takes, or 0 (the untuned defaults)") from None


def results_path(out: str | Path | None = None) -> Path:
    """Where the results go: ``out``, else ``$RNNJAX_BENCH_OUT``, else benchmarks/results."""
    return Path(out or os.environ.get(OUT_VAR) or RESULTS)


def results_dir(parser: argparse.ArgumentParser, out: str) -> Path:
    """:func:`results_path` of ``out`` (``--out``), made and written to once now
    (``rnnjax.atomic.probe``); one that cannot be is refused as a bad flag
    (``parser.error``: one line, exit 2) before any work, not found by
    :func:`write_results` after all of it."""
    path = results_path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic.probe(path)
    except OSError as e:
        file = next((p for p in (path, *path.parents) if os.path.isfile(p)), None)
        reason = f"{file} is a file" if file is not None else e.strerror or str(e)
        if out:
            where, fix = f"argument --out: {out}", "give --out a directory you can write to"
        elif os.environ.get(OUT_VAR):
            where, fix = (f"${OUT_VAR} {path}", f"set ${OUT_VAR} to a directory you can "
                          "write to, or give --out one")
        else:
            where, fix = f"{path}", "give --out a directory you can write to"
        parser.error(f"{where}: cannot write the results there ({reason}); {fix}")
    return path


def check_batches(parser: argparse.ArgumentParser, flag: str,
                  batches: Iterable[tuple[str, int]], examples: int) -> None:
    """Refuse (``parser.error``, exit 2) a batch larger than the training set's
    ``examples``, as ``rnnjax train`` refuses it (its batches would wrap around, each
    holding examples twice). ``batches``: ``(the flag's value as given, its batch)``."""
    for given, batch in batches:
        if batch > examples:
            parser.error(f"{flag} {given}: larger than the training set ({examples} "
                         f"examples); give a batch of at most {examples}")


def checked(parser: argparse.ArgumentParser, build: Callable[[], T]) -> T:
    """``build()``, a :class:`rnnjax.config.ConfigError` it raises refused as a bad flag
    (``parser.error``: its one line, exit 2)."""
    try:
        return build()
    except ConfigError as e:
        parser.error(str(e))


def tensorflow_loaded() -> bool:
    """Whether this process has imported TensorFlow."""
    return sys.modules.get("tensorflow") is not None


@contextlib.contextmanager
def without_tensorflow() -> Iterator[None]:
    """Inside, ``import tensorflow`` fails as where it is not installed (unless this process
    already imported it): Keras on JAX then leaves it alone (``keras.utils.set_random_seed``
    imports it where installed to seed it, seconds of import; what Keras finds absent
    inside, it takes as absent for the rest of the process). Afterwards ``import
    tensorflow`` works again."""
    if "tensorflow" in sys.modules:
        yield
        return
    sys.modules["tensorflow"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]


# Packages that shape a result besides ``rnnjax.runtime.PACKAGES``, recorded where installed:
# the peers timed, TensorFlow and tfds (the tfds feed; Keras' imports) and JAX's accelerator
# plugins.
OTHER_PACKAGES = ("flax", "keras", "torch", "tensorflow", "tensorflow-cpu", "tensorflow-datasets",
                  *runtime.GPU_PLUGINS, *runtime.TPU_PLUGINS)


def environment(device: jax.Device | None = None) -> dict[str, Any]:
    """Device, backend, versions (the installed peers and accelerator plugins among them),
    JAX's default matmul precision and the flags that change timings, and whether TensorFlow
    was loaded."""
    versions = runtime.versions(OTHER_PACKAGES)
    return {
        **runtime.device_info(device),
        "versions": {name: version for name, version in versions.items()
                     if name not in OTHER_PACKAGES or version != "absent"},
        # float32 products run at this precision: TF32 on NVIDIA GPUs from Ampere at "default"
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv[1:],
        "tensorflow_loaded": tensorflow_loaded(),
    }


def time_calls(
    call: Callable[[], Any], repeats: int, burn_in: int = 1
) -> tuple[float, list[float]]:
    """Median seconds of ``call()`` (its result blocked on) and all samples."""
    for _ in range(burn_in):
        jax.block_until_ready(call())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def time_compiled(
    jitted: Callable,
    args: Sequence[Any],
    *,
    repeats: int = 5,
    carry_first: bool = False,
) -> dict[str, float]:
    """Compile ``jitted`` for ``args``, then time it.

    With ``carry_first`` the first output replaces the first argument between calls (a
    donated train state); other arguments are reused. Returns seconds: ``compile_s``,
    ``first_call_s`` (the first execution after compiling) and ``median_s``.
    """
    compiled, compile_s = runtime.compile_timed(jitted, *args)
    args = list(args)

    def call():
        out = compiled(*args)
        if carry_first:
            args[0] = out[0]
        return out

    start = time.perf_counter()
    jax.block_until_ready(call())
    first_call_s = time.perf_counter() - start
    median_s, _ = time_calls(call, repeats, burn_in=1)
    return {"compile_s": compile_s, "first_call_s": first_call_s, "median_s": median_s}


def in_turns(runners: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each call of each runner, timed in turns (one call each per round, after
    one burn-in call each).

    Turns spread any drift of the machine (other load, clocks) over every peer alike.
    """
    for run in runners.values():  # burn-in
        jax.block_until_ready(run())
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            samples[name].append(time.perf_counter() - start)
    return samples


def interleaved(runners: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each runner, timed in turns (:func:`in_turns`)."""
    return {name: statistics.median(values)
            for name, values in in_turns(runners, rounds).items()}


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    columns: Sequence[str],
    *,
    env: dict[str, Any] | None = None,
    notes: str = "",
    out_dir: Path | None = None,
) -> Path:
    """Write ``NAME.json`` and ``NAME.md`` under ``out_dir`` (:func:`results_path`; a benchmark
    checks it at its start, :func:`results_dir`)."""
    out_dir = results_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = env or environment()
    payload = {"benchmark": name, "environment": env, "rows": rows, "notes": notes}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = (
        f"# {name}\n\n{env['backend']} {env['device_kind']} x{env['device_count']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + (f"; XLA_FLAGS={env['xla_flags']}" if env.get("xla_flags") else "")
        + "\n\n"
    )
    (out_dir / f"{name}.md").write_text(header + markdown_table(rows, columns)
                                        + (f"\n{notes}\n" if notes else ""))
    print(header + markdown_table(rows, columns), flush=True)
    return out_dir
