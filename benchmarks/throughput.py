"""Train-step throughput per backend, batch size and unroll; compile time apart; the limit.

    python -m benchmarks.throughput                      # every backend JAX sees
    python -m benchmarks.throughput --backends cpu --batch-sizes 50 --unrolls 0

For every backend (CPU, and each accelerator JAX sees) and every (batch, unroll) it
compiles ``train_steps`` (K steps per call on device-resident MNIST) ahead of time, runs
one burn-in call, and reports the median over repeats of ms/step, steps/s, samples/s,
compile time and first-call latency. It counts the FLOPs of one train step (analytic:
XLA's cost analysis counts a while-loop body once, so it cannot), measures the
backend's GEMM rate on float32 arrays with JAX, at JAX's default matmul precision as the
train step runs (:func:`gemm_kind`: TF32 on NVIDIA GPUs from Ampere, bfloat16 passes on
TPUs), and reports the fraction achieved. With two
backends it adds their ratio. Per backend it also reports each cell's ops per time step,
forward and backward, and the ops one whole train step launches at unroll 1 and fully
unrolled, read from the compiled train step (``rnnjax.hlo``; ``--ops-only``: just those,
into ``results/throughput_ops.{json,md}``). Writes ``results/throughput.{json,md}``, and
``throughput.png`` where matplotlib is installed (the ``peers`` extra). No TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks.harness import (
    at_least,
    cell_name,
    cell_names,
    check_batches,
    environment,
    ints_at_least,
    markdown_table,
    results_dir,
    time_calls,
    time_compiled,
    write_results,
)
from rnnjax import cells, hlo, train
from rnnjax.cells import Cell
from rnnjax.config import Config
from rnnjax.data.pipeline import batch_indices, to_device
from rnnjax.data.sources import load_arrays
from rnnjax.loop import init_state
from rnnjax.model import make_model
from rnnjax.optim import make_optimizer


def train_step_flops(batch: int, time_steps: int = 28, features: int = 28, hidden: int = 50,
                     classes: int = 10) -> int:
    """Multiply-add FLOPs (2 per MAC) of one SimpleRNN train step, matrix products only.

    Forward: input projection, recurrence, head. Backward: the recurrence twice (input and
    weight gradients), the projection once (weight gradient only: the pixels need none),
    the head twice. Elementwise work and the optimizer are under 1% and left out.
    """
    projection = 2 * batch * time_steps * features * hidden
    recurrence = 2 * batch * time_steps * hidden * hidden
    head = 2 * batch * hidden * classes
    return projection * 2 + recurrence * 3 + head * 3


def gemm_kind(platform: str) -> str:
    """What :func:`gemm_rate` measures on ``platform``: float32 arrays multiplied at JAX's
    default matmul precision, the train step's, which is float32 only on CPUs."""
    precision = jax.config.jax_default_matmul_precision
    if platform == "cpu" or precision in ("highest", "float32"):
        return "float32 GEMM"
    on = {"gpu": "TF32 on NVIDIA GPUs from Ampere", "tpu": "bfloat16 passes"}.get(
        platform, "the backend's")
    return f"GEMM of float32 arrays at {precision or 'default'} precision ({on})"


def gemm_rate(device: jax.Device, size: int, repeats: int = 5) -> float:
    """Measured matrix-product FLOP/s of float32 arrays on ``device`` (size x size x size),
    at JAX's default matmul precision (:func:`gemm_kind`)."""
    key = jax.random.key(0)
    a = jax.device_put(jax.random.normal(key, (size, size), jnp.float32), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), jnp.float32), device)
    matmul = jax.jit(lambda x, y: x @ y)
    median, _ = time_calls(lambda: matmul(a, b), repeats, burn_in=2)
    return 2 * size**3 / median


def chain_floor(device: jax.Device, batch: int, links: int = 56, repeats: int = 20) -> float:
    """Seconds for ``links`` dependent ``tanh(h @ U + u_t)`` links, [B, 50] @ [50, 50].

    One train step of the seed model must run 28 such links forward and 28 backward, one
    after another: with today's kernels this chain is a practical floor for a step.
    """
    key = jax.random.key(0)
    us = jax.device_put(jax.random.normal(key, (links, batch, 50)) * 0.1, device)
    u = jax.device_put(jax.random.normal(jax.random.key(1), (50, 50)) * 0.1, device)
    h0 = jax.device_put(jnp.zeros((batch, 50)), device)
    chain = jax.jit(lambda h, us, u: jax.lax.scan(
        lambda h, x: (jnp.tanh(h @ u + x), None), h, us)[0])
    return time_calls(lambda: chain(h0, us, u), repeats, burn_in=2)[0]


def step_ops(
    config: Config, device: jax.Device | None = None, cell: Cell | None = None
) -> dict[str, float]:
    """Ops per time step of one compiled train step of ``config``'s model (with ``cell``
    instead of the configured one, if given), forward and backward
    (``rnnjax.hlo.ops_per_step``), compiled at unroll 1 for ``device``, and the ops the
    whole step launches (``launched``: ``rnnjax.hlo.launched_ops``)."""
    config = config.replace(unroll=1)
    text = step_text(config, device, cell)
    counts = hlo.ops_per_step(text, 28 if config.order == "rows" else 784)
    return {**counts, "launched": float(hlo.launched_ops(text))}


def step_text(config: Config, device: jax.Device | None = None, cell: Cell | None = None
              ) -> str:
    """The compiled text of one train step of ``config``'s model (``cell`` instead of the
    configured one, if given) for ``device``, on a batch of zeros."""
    model, optimizer = make_model(config), make_optimizer(config)
    if cell is not None:
        model = dataclasses.replace(model, cell=cell)
    device = device or jax.devices()[0]
    with jax.default_device(device):
        state = train.create_state(jax.random.key(0), model, optimizer)
        images = jnp.zeros((config.batch_size, 28, 28), jnp.float32)
        labels = jnp.zeros((config.batch_size,), jnp.int32)
        fn = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer))
        return fn.lower(state, images, labels).compile().as_text()


def measure(device, data, batch: int, unroll: int, steps_per_call: int, repeats: int,
            cell: str = "simple_rnn") -> dict:
    config = Config(batch_size=batch, unroll=unroll, cell=cell)
    model, optimizer = make_model(config), make_optimizer(config)
    with jax.default_device(device):
        state = init_state(config, model, optimizer)
    images, labels = to_device(data, device)[:2]
    sequences = model.sequences(images)  # train_steps' form of the dataset, made once
    idx = jax.device_put(
        batch_indices(len(data.train_labels), batch, 0, steps_per_call), device
    )
    fn = jax.jit(functools.partial(train.train_steps, model=model, optimizer=optimizer),
                 donate_argnums=0)
    timing = time_compiled(fn, (state, sequences, labels, idx), repeats=repeats, carry_first=True)
    step_s = timing["median_s"] / steps_per_call
    return {
        "batch": batch,
        "unroll": "full" if unroll == 0 else unroll,
        "ms_per_step": step_s * 1e3,
        "steps_per_s": 1 / step_s,
        "samples_per_s": batch / step_s,
        "compile_s": timing["compile_s"],
        "first_call_s": timing["first_call_s"],
    }


def ops_table(names: list[str], device: jax.Device) -> dict[str, dict[str, float]]:
    """``{cell: {"forward": ops, "backward": ops, "launched": ops, "launched_full": ops}}``
    on ``device``, printed: per time step at unroll 1, and what one train step launches at
    unroll 1 and fully unrolled (where full unrolling wins, what the tuner runs); each cell
    in its default form, the GRU hand-written too, and each cell's native form where it runs
    on ``device`` (``cells.native_backends``: no loop, so 0 ops per time step, and the same
    count at every unroll): a device of the default backend, whose kernels a native layer
    runs (``rnnjax.native_gpu.runs_here``; a GPU machine's CPU has no native row). A native
    form that fails to compile (a GPU's Pallas kernels, which no GPU has run yet) is a line
    saying so, and no row: the timings go on."""
    table = {}
    print(f"{device.platform}: ops per time step (train step, batch 50, rows, unroll 1), "
          "forward / backward; ops one train step launches, unroll 1 / full", flush=True)
    hidden = Config().hidden_size
    variants = [(name, Config(cell=name), None) for name in names]
    if "gru" in names:
        variants.append(("gru, backward='hand_written'", Config(cell="gru"),
                         cells.gru(hidden, backward="hand_written")))
    variants += [(f"{name}, backward='native'", Config(cell=name, backward="native"), None)
                 for name in names
                 if device.platform == jax.default_backend()
                 and device.platform in cells.native_backends(cells.get_cell(name, hidden))]
    for label, config, cell in variants:
        try:
            counts = step_ops(config, device, cell)
            full = hlo.launched_ops(step_text(config.replace(unroll=0), device, cell))
        except Exception as e:  # the native kernels' compiler, untried there
            if config.backward != "native":
                raise
            # A row of its own: the timings after it (and every other backend's) go on.
            print(f"  {label}: not counted (failed: {type(e).__name__}: "
                  f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})", flush=True)
            continue
        table[label] = {**counts, "launched_full": float(full)}
        print(f"  {label}: {counts['forward']:g} / {counts['backward']:g}; "
              f"{counts['launched']:g} / {full:g}", flush=True)
    return table


OPS_COLUMNS = ["backend", "cell", "forward", "backward", "launched", "launched_full"]


def ops_rows(envs: dict[str, dict]) -> list[dict]:
    """One row per backend and cell of the :func:`ops_table` each backend's ``envs`` holds."""
    return [{"backend": backend, "cell": cell, **counts}
            for backend, env in envs.items() for cell, counts in env["ops_per_step"].items()]


def main(argv=None) -> None:
    parser = harness.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=ints_at_least(1), default="50,256,1024,4096")
    parser.add_argument("--unrolls", type=ints_at_least(0, "1,4,0"), default="1,4,0",
                        help="0 = full")
    parser.add_argument("--backends", default="", help="comma list (default: all JAX sees)")
    parser.add_argument("--steps-per-call", type=at_least(0), default=0,
                        help="K (default: 200 at batch 50, fewer for larger batches)")
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--out", default="", help="results directory")
    parser.add_argument("--cell", type=cell_name, default="simple_rnn",
                        help="the cell of the timed rows: an rnnjax cell, or a Flax cell class "
                        "as MODULE:CLASS (e.g. flax.linen:GRUCell)")
    parser.add_argument("--cells", type=cell_names, default="simple_rnn,irnn,lstm,gru",
                        help="cells whose ops per time step are reported")
    parser.add_argument("--ops-only", action="store_true",
                        help="report the ops only, no timings (results/throughput_ops)")
    args = parser.parse_args(argv)
    out = results_dir(parser, args.out)

    batches, unrolls = args.batch_sizes, args.unrolls
    # Accelerators first: where a time limit cuts the run short, their rows are written.
    present = {d.platform for d in jax.devices()} | {"cpu"}
    backends = args.backends.split(",") if args.backends else sorted(
        present, key=lambda b: (b == "cpu", b)
    )
    for backend in backends:
        if backend not in present:
            parser.error(f"argument --backends: {backend!r} is not a backend JAX has here; "
                         f"give some of {', '.join(sorted(present))}")
    data = None if args.ops_only else load_arrays(Config())
    if data is not None:  # the ops are counted at batch 50
        check_batches(parser, "--batch-sizes", ((str(b), b) for b in batches),
                      len(data.train_labels))
    rows = []
    envs = {}
    for backend in backends:
        device = jax.devices(backend)[0]
        envs[backend] = environment(device)
        envs[backend]["ops_per_step"] = ops_table(args.cells, device)
    if args.ops_only:
        write_results("throughput_ops", ops_rows(envs), OPS_COLUMNS,
                      env=next(iter(envs.values())) | {"backends": envs}, out_dir=out)
        return
    for backend in backends:
        device = jax.devices(backend)[0]
        rate = gemm_rate(device, 2048 if backend == "cpu" else 8192)
        envs[backend]["gemm_kind"] = gemm_kind(device.platform)
        print(f"{backend}: {gemm_kind(device.platform)} {rate / 1e9:.0f} GFLOP/s", flush=True)
        for batch in batches:
            k = args.steps_per_call or max(10, min(200, 20000 // batch))
            for unroll in unrolls:
                t0 = time.perf_counter()
                row = measure(device, data, batch, unroll, k, args.repeats, args.cell)
                floor_s = chain_floor(device, batch)
                row.update(
                    backend=backend, cell=args.cell, steps_per_call=k,
                    floor_ms=floor_s * 1e3, x_floor=row["ms_per_step"] / (floor_s * 1e3),
                    gemm_gflops=rate / 1e9,
                )
                if args.cell in ("simple_rnn", "irnn"):  # the FLOP count is the Elman cell's
                    flops = train_step_flops(batch)
                    row.update(flops_per_step=flops,
                               fraction_of_gemm=flops * row["steps_per_s"] / rate)
                rows.append(row)
                print(f"  batch {batch} unroll {row['unroll']}: {row['ms_per_step']:.3f} ms/step "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        report(rows, envs, out)  # after every backend, complete so far


def report(rows: list[dict], envs: dict[str, dict], out: Path) -> None:
    """Write the table (with the accelerator / CPU ratio when both ran) and the plot."""
    base = {(r["batch"], r["unroll"]): r for r in rows if r["backend"] == "cpu"}
    for r in rows:
        cpu = base.get((r["batch"], r["unroll"]))
        if r["backend"] != "cpu" and cpu is not None:
            r["speedup_vs_cpu"] = cpu["ms_per_step"] / r["ms_per_step"]
    columns = ["backend", "cell", "batch", "unroll", "steps_per_call", "ms_per_step", "steps_per_s",
               "samples_per_s", "compile_s", "first_call_s", "floor_ms", "x_floor",
               "flops_per_step", "gemm_gflops", "fraction_of_gemm"]
    if any("speedup_vs_cpu" in r for r in rows):
        columns.append("speedup_vs_cpu")
    env = next(iter(envs.values())) | {"backends": envs}
    notes = "Ops of the compiled train step (batch 50, rows): per time step at unroll 1, " \
        "forward / backward, and launched by one whole step at unroll 1 and full:\n\n" + \
        markdown_table(ops_rows(envs), OPS_COLUMNS)
    directory = write_results("throughput", rows, columns, env=env, notes=notes, out_dir=out)
    plot(rows, directory / "throughput.png")


def plot(rows, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional where matplotlib is missing
        print(f"matplotlib not installed: no {path.name} (pip install -e '.[peers]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (backend, unroll) in sorted({(r["backend"], str(r["unroll"])) for r in rows}):
        sel = [r for r in rows if r["backend"] == backend and str(r["unroll"]) == unroll]
        ax.plot([r["batch"] for r in sel], [r["samples_per_s"] for r in sel], "o-",
                label=f"{backend} unroll {unroll}")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="samples/s",
           title="rnnjax train-step throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
