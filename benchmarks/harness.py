"""Honest timing and result files for every benchmark (burn-in, block, median; no TF).

``time_compiled(fn, args)`` compiles ahead of time (compile seconds reported apart), runs
one burn-in call, then times ``repeats`` calls, each ended by ``jax.block_until_ready``.
``write_results(name, rows, ...)`` writes ``results/NAME.json`` (rows + environment) and
``results/NAME.md`` (a markdown table), and the caller may add ``results/NAME.png``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from rnnjax import runtime

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: jax.Device | None = None) -> dict[str, Any]:
    """Device, backend, versions and the flags that change timings."""
    return {
        **runtime.device_info(device),
        "versions": runtime.versions(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv[1:],
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
    """Write ``NAME.json`` and ``NAME.md`` under ``out_dir`` (default benchmarks/results)."""
    out_dir = Path(out_dir or os.environ.get("RNNJAX_BENCH_OUT") or RESULTS)
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
