"""One evaluation of the test set, each way a run can take it, against its products' bound.

    python -m benchmarks.evaluation                     # simple_rnn, lstm, gru
    python -m benchmarks.evaluation --cells lstm --rounds 9

For each cell (hidden 50, rows: the IDX layout's 28 steps of 28) it compiles
``train.evaluate_sequences`` over ``--examples`` random images in one chunk (as
``rnnjax train`` evaluates the 10,000 test images at its default ``--eval-batch-size``),
with NumPy-drawn parameters (``measure.synthetic_params``), each way ``rnnjax.tune`` can
choose for a run's evaluations (``measure.evaluation_fields``): XLA's loop (the
hand-written form) at unroll 1 and fully unrolled, and, on a CPU where the native library
builds, the native form writing the last step alone at 8 and at 16 lanes. One burn-in call
each, then ``--rounds`` calls each in turns; the fastest, median and slowest ms per
evaluation, compile seconds apart, and each way's mean loss and count correct (the ways
round apart, within the tuner's tolerance). ``bound ms`` is the evaluation's matrix
products alone at the backend's GEMM rate (``throughput.gemm_rate``: float32 arrays at
JAX's default precision, measured before and after: both are reported). Writes
``results/evaluation.{json,md}``. No TensorFlow.
"""

from __future__ import annotations

import functools
import statistics
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks.harness import (
    at_least,
    environment,
    in_turns,
    names,
    results_dir,
    write_results,
)
from benchmarks.throughput import gemm_rate
from rnnjax import measure, native, runtime, train
from rnnjax.config import Config
from rnnjax.data.pipeline import normalize_host
from rnnjax.model import evaluation_model, make_model

GATES = {"simple_rnn": 1, "irnn": 1, "lstm": 4, "gru": 3}


def product_flops(cell: str, examples: int, steps: int = 28, features: int = 28,
                  hidden: int = 50, classes: int = 10) -> int:
    """FLOPs (2 per multiply-add) of an evaluation's matrix products: each step's input and
    recurrent products for every gate, and the head once."""
    return 2 * examples * (steps * GATES[cell] * (features + hidden) * hidden + hidden * classes)


def ways(device: jax.Device) -> dict[str, dict[str, Any]]:
    """The ways to time on ``device``: name -> Config fields (XLA's unrolls; native widths
    where the native library builds for this CPU)."""
    out = {"XLA, unroll 1": {"backward": "hand_written", **measure.evaluation_fields(1)},
           "XLA, full unroll": {"backward": "hand_written", **measure.evaluation_fields(0)}}
    if device.platform == "cpu" and native.unavailable() is None:
        for lanes in (8, 16):
            out[f"native, {lanes} lanes"] = {"backward": "native", "native_lanes": lanes,
                                             **measure.evaluation_fields("native")}
    return out


def evaluations(cell: str, examples: int, device: jax.Device
                ) -> dict[str, tuple[Any, float]]:
    """Each way's compiled evaluation of ``examples`` random images on JAX's default
    device (``device``), as a call of no arguments (its metric sums), and its compile
    seconds."""
    base = Config(cell=cell, eval_batch_size=examples, unroll=1)
    data = measure.synthetic_data(base, examples)
    labels = jnp.asarray(data.train_labels)
    out = {}
    for name, fields in ways(device).items():
        config = base.replace(**fields)
        model = make_model(config)
        params = measure.synthetic_params(model)
        xs = jax.jit(model.sequences)(normalize_host(data.train_images))
        evaluate = jax.jit(functools.partial(
            train.evaluate_sequences, model=evaluation_model(config, model), chunk=examples))
        compiled, compile_s = runtime.compile_timed(evaluate, params, xs, labels)
        out[name] = (functools.partial(compiled, params, xs, labels), compile_s)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = harness.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=names(tuple(GATES)), default="simple_rnn,lstm,gru")
    parser.add_argument("--examples", type=at_least(1), default=10_000,
                        help="images in the evaluation (one chunk)")
    parser.add_argument("--rounds", type=at_least(1), default=5,
                        help="timed calls of each way, in turns, after one burn-in call")
    parser.add_argument("--out", default="", help="results directory")
    args = parser.parse_args(argv)
    out = results_dir(parser, args.out)
    device = jax.devices()[0]
    gemm = [gemm_rate(device, 2048)]
    rows = []
    for cell in args.cells:
        programs = evaluations(cell, args.examples, device)
        seconds = in_turns({name: call for name, (call, _) in programs.items()}, args.rounds)
        for name, (call, compile_s) in programs.items():
            ms = sorted(s * 1e3 for s in seconds[name])
            sums = jax.device_get(call())  # each way's, to compare: the same evaluation
            rows.append({"cell": cell, "way": name, "fastest ms": ms[0],
                         "median ms": statistics.median(ms), "slowest ms": ms[-1],
                         "compile s": compile_s,
                         "loss": float(sums["loss_sum"]) / int(sums["count"]),
                         "correct": int(sums["correct"])})
            print(f"{cell:10s} {name:18s} {ms[0]:8.2f} {statistics.median(ms):8.2f} "
                  f"{ms[-1]:8.2f} ms  compile {compile_s:.2f} s", flush=True)
    gemm.append(gemm_rate(device, 2048))
    for row in rows:
        row["bound ms"] = product_flops(row["cell"], args.examples) / min(gemm) * 1e3
    notes = (f"{args.examples} random images in one chunk, {args.rounds} calls of each way "
             f"in turns after one burn-in call each; GEMM {gemm[0] / 1e9:.0f} and "
             f"{gemm[1] / 1e9:.0f} GFLOP/s (before, after); bound ms: the products alone "
             "at the slower.")
    path = write_results("evaluation", rows, ["cell", "way", "fastest ms", "median ms",
                                              "slowest ms", "compile s", "bound ms",
                                              "loss", "correct"],
                         env={**environment(device), "gemm_gflops": [g / 1e9 for g in gemm]},
                         notes=notes, out_dir=out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
