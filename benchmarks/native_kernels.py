"""Do the native kernels beat XLA's loops on this CPU? Measure it here.

A recurrent layer's train step is its two loops (forward: the step's gates from
``x_t W + b`` and ``h_{t-1} U``; backward: their gradients, and ``g = dz_t U^T``) and the
products around them (the input projection ``x_t W``, the weight gradients
``[x_t, h_{t-1}, 1]^T dz_t``), each loop step a few XLA ops. The backward 'native' of
simple_rnn, lstm and gru (``rnnjax.native``) runs each pass as one XLA:CPU custom call built
with the machine's C++ compiler for its own CPU, the batch in parts on the threads of XLA's
pool. This benchmark builds it for vectors of 8 and of 16 floats (``--native-lanes``, which
the tuner times where the CPU has 512-bit registers) and times rnnjax's own train step
(optax Adam, K steps per call on device-resident data, what ``rnnjax train`` compiles) with
the built-in cell in the forms the tuner times and with each native build, in turns in one
process.

Each native build's first step is checked against the built-in's (loss and gradients, to
the tuner's float32 tolerance): one that differs by more is still timed, named on stderr
and in its row (``NAME matches``: False), and the benchmark exits 1 once its results are
written (the tuner would not choose it). Compile seconds, the C++ build's included, are
reported apart. Float32.

On a GPU the native form is ``rnnjax.native_gpu``'s Pallas kernels (simple_rnn), one
"build" (the lanes mean nothing there), compiled with the program; ``--forms default``
times the built-in default form alone beside it (a short accelerator session's run).

    python -m benchmarks.native_kernels [--cells simple_rnn,lstm,gru]
        [--cases rows:50,pixels:50] [--rounds 10] [--forms all|default] [--out DIR]
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from benchmarks import harness
from benchmarks.flax_peers import compiled_runner, rnnjax_program, sequence_length, steps_per_call
from benchmarks.harness import environment, in_turns, write_results
from rnnjax import cells, measure, native, train, tune
from rnnjax.config import NATIVE_LANES, Config
from rnnjax.data.pipeline import batch_indices, to_device
from rnnjax.data.sources import load_arrays
from rnnjax.model import make_model

LANES = NATIVE_LANES  # floats per vector the kernels are built for (Config.native_lanes)
TOLERANCE = tune.TOLERANCE["float32"]  # the first step's loss and gradients: as the tuner's
NATIVE = tuple(name for name in ("simple_rnn", "lstm", "gru")
               if cells.CELLS[name](1).native is not None)  # the cells with native kernels


def native_cells(backend: str) -> tuple[str, ...]:
    """The cells of :data:`NATIVE` with native kernels on ``backend``."""
    return tuple(name for name in NATIVE
                 if backend in cells.native_backends(cells.CELLS[name](1)))

# The built-in forms timed, as the tuner times them: (name, fields); each at unroll 1 and
# full.
FORMS = (
    *((f"hand_written {projection}, {weight_grad}",
       {"backward": "hand_written", "projection": projection, "weight_grad": weight_grad})
      for projection in ("hoisted", "in_loop") for weight_grad in ("product", "per_step")),
    ("autodiff", {"backward": "autodiff", "projection": "in_loop"}),
)
MAX_FULL_UNROLL = 100  # steps: 784 unrolled pixel steps compile for tens of minutes


def register(lanes: int) -> float:
    """Build (or find in the cache) ``rnnjax.native``'s library for ``lanes`` and register its
    targets; the seconds it took (about 2 s to build; nothing once cached)."""
    start = time.perf_counter()
    native.register(lanes)
    return time.perf_counter() - start


def build_all() -> dict[int, float]:
    """Build and register the kernels for every :data:`LANES` (once per process): the
    seconds each took."""
    return {lanes: register(lanes) for lanes in LANES}


def configs(cell: str, order: str, batch: int, widths: tuple[int, ...] = LANES,
            forms: tuple[tuple[str, dict[str, str]], ...] = FORMS) -> dict[str, Config]:
    """The runs of a case by name: the built-in cell in each of ``forms`` at unroll 1
    and full (full only up to :data:`MAX_FULL_UNROLL` steps), then the native form at each
    of ``widths`` (its lanes)."""
    base = Config(cell=cell, order=order, batch_size=batch)
    unrolls = (("unroll 1", 1),) + ((("unroll full", 0),)
                                    if sequence_length(order) <= MAX_FULL_UNROLL else ())
    out = {f"{cell}, {name}, {label}": base.replace(unroll=unroll, **fields)
           for name, fields in forms for label, unroll in unrolls}
    for lanes in widths:
        out[f"native, {lanes} lanes"] = base.replace(backward="native", native_lanes=lanes)
    return out


def first_step_difference(config: Config, reference: Config, images: jax.Array,
                          labels: jax.Array) -> float:
    """The largest difference between ``config``'s and ``reference``'s first-step loss and
    gradients (the same initial parameters), each relative to the reference's largest
    magnitude, as the tuner compares its candidates (``rnnjax.measure.relative_difference``)."""
    results = []
    for c in (config, reference):
        model = make_model(c)
        loss = functools.partial(train.loss_fn, model=model, images=images, labels=labels)
        value = jax.jit(jax.value_and_grad(lambda p, f=loss: f(p)[0]))(
            model.init(jax.random.key(c.seed)))
        results.append({str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(value))})
    return measure.relative_difference(*results)


def time_case(device_data: Any, cell: str, order: str, batch: int, rounds: int,
              built: dict[int, float], forms: tuple[tuple[str, dict[str, str]], ...] = FORMS
              ) -> dict[str, Any]:
    """One case's row: ms per train step (median and best over ``rounds`` calls in turns)
    and compile seconds of each run (``built``: the native builds' seconds, by lanes), and
    each native cell's first-step difference."""
    steps = steps_per_call(order, batch)
    idx = jax.device_put(batch_indices(len(device_data.train_labels), batch, 0, steps))
    runs = configs(cell, order, batch, tuple(built), forms)
    reference = next(iter(runs.values()))
    row: dict[str, Any] = {"cell": cell, "order": order, "batch": batch, "steps/call": steps}
    images, labels = device_data.train_images[:batch], device_data.train_labels[:batch]
    runners = {}
    for name, config in runs.items():
        if config.backward == "native":
            difference = first_step_difference(config, reference, images, labels)
            row[f"{name} first-step difference"] = difference
            row[f"{name} matches"] = difference <= TOLERANCE
            if difference > TOLERANCE:
                print(f"{name}: its first step differs from {reference.cell}'s by "
                      f"{difference:.3g} (relative), more than {TOLERANCE:g}: timed anyway, "
                      "but the tuner would not choose it", file=sys.stderr, flush=True)
        run, compile_s = compiled_runner(*rnnjax_program(device_data, idx, config))
        runners[name] = run
        row[f"{name} compile s"] = compile_s + (built[config.native_lanes]
                                                if config.backward == "native" else 0.0)
    for name, values in in_turns(runners, rounds).items():
        row[f"{name} ms"] = statistics.median(values) / steps * 1e3
        row[f"{name} best ms"] = min(values) / steps * 1e3
    built_in = {name: row[f"{name} ms"] for name in runs if not name.startswith("native")}
    fastest = min(built_in, key=built_in.__getitem__)
    row["fastest built-in"] = fastest.removeprefix(f"{cell}, ")
    row["fastest built-in ms"] = built_in[fastest]
    for lanes in built:
        row[f"native, {lanes} lanes speed-up"] = (built_in[fastest]
                                                  / row[f"native, {lanes} lanes ms"])
    return row


def main(argv: list[str] | None = None) -> None:
    parser = harness.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(NATIVE),
                        help=f"cells with native kernels, of {', '.join(NATIVE)}")
    parser.add_argument("--cases", type=harness.cases(), default="rows:50,pixels:50",
                        help="ORDER:BATCH,... (order rows or pixels)")
    parser.add_argument("--rounds", type=harness.at_least(1), default=10)
    parser.add_argument("--forms", choices=("all", "default"), default="all",
                        help="the built-in forms timed: all the tuner times, or the default "
                             "(hand-written, hoisted, one product) alone")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    out = harness.results_dir(parser, args.out)
    backend = jax.default_backend()
    if backend not in ("cpu", "gpu"):
        raise SystemExit(f"benchmarks.native_kernels times the native kernels of a CPU or a "
                         f"GPU; this process's backend is {backend}: run it with "
                         "JAX_PLATFORMS=cpu")
    here = native_cells(backend)
    names = args.cells.split(",")
    if not names or any(name not in here for name in names):
        parser.error(f"--cells {args.cells!r}: give cells with native kernels on this "
                     f"{backend}, of {', '.join(here)}")
    data = load_arrays(Config())
    harness.check_batches(parser, "--cases", ((f"{order}:{batch}", batch)
                                              for order, batch in args.cases),
                          len(data.train_labels))
    built = build_all() if backend == "cpu" else {LANES[0]: 0.0}  # a GPU's: no build
    forms = FORMS if args.forms == "all" else FORMS[:1]
    device_data = to_device(data)
    rows = [time_case(device_data, cell, order, batch, args.rounds, built, forms)
            for cell in names for order, batch in args.cases]
    # The table: each case's fastest built-in form and the native builds; every form's ms in
    # the JSON and the notes.
    columns = ["cell", "order", "batch", "steps/call", "fastest built-in", "fastest built-in ms",
               *(f"native, {lanes} lanes {what}" for lanes in built
                 for what in ("ms", "speed-up", "matches"))]
    notes = "\n".join(
        f"- {r['cell']} {r['order']} {r['batch']}: " + "; ".join(
            f"{k} {v:.3g}" for k, v in r.items() if k.endswith((" ms", " compile s",
                                                               " difference"))
            and k not in columns)
        for r in rows)
    write_results("native_kernels", rows, columns, env=environment(), notes=notes,
                  out_dir=out)
    differing = [f"{r['cell']} {r['order']} {r['batch']}: {k.removesuffix(' matches')}"
                 for r in rows for k, v in r.items() if k.endswith(" matches") and not v]
    if differing:
        raise SystemExit(f"first steps differing from the built-in's by more than "
                         f"{TOLERANCE:g}: {'; '.join(differing)} (timed, in the results)")


if __name__ == "__main__":
    main()
