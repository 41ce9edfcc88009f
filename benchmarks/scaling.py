"""Data-parallel scaling: train-step throughput against the number of devices.

    python -m benchmarks.scaling                                 # CPU 1,2,4,8 + accelerators
    python -m benchmarks.scaling --steps 20 --batch-size 64 --counts 1,2
    python -m benchmarks.scaling --weak --batch-size 64          # 64 per device

For every device count it runs ``train_steps`` (K steps per compiled call, MNIST resident
and replicated on every device, each batch split over the devices by ``rnnjax.parallel``)
in a fresh subprocess: the number of CPU devices is fixed when JAX starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), so each count needs its own
process. Then, for each accelerator backend JAX sees (GPU, TPU), the same for 1, 2, 4, ...
up to all of its devices. Timing is benchmarks.harness' ``time_compiled`` (compile apart,
one burn-in call, median of repeats). Reports steps/s, samples/s, the speedup over one
device and the efficiency (speedup / devices). Writes ``results/scaling.{json,md}`` after
each worker, complete so far; a worker that fails ends the run with its own error line.

Strong scaling (default) keeps the global batch fixed; ``--weak`` keeps the per-device
batch fixed. Forced CPU devices share this machine's cores: on CPU the table shows what
the partitioning costs, not the gain of independent hardware.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import at_least, ints_at_least, write_results
from rnnjax.config import Config
from rnnjax.data.sources import load_arrays

ROOT = Path(__file__).resolve().parents[1]
MARK = "SCALING_ROW "


def measure(backend: str, devices: int, batch: int, hidden: int, steps: int,
            repeats: int) -> dict:
    """Throughput of ``train_steps`` over the first ``devices`` devices of ``backend``."""
    import jax

    from benchmarks.harness import time_compiled
    from rnnjax import parallel, train
    from rnnjax.config import Config
    from rnnjax.data.pipeline import batch_indices
    from rnnjax.data.sources import load_arrays
    from rnnjax.loop import init_state
    from rnnjax.model import make_model
    from rnnjax.optim import make_optimizer

    available = jax.devices(backend)
    if devices > len(available):
        raise SystemExit(f"{backend} has {len(available)} devices, not {devices}")
    config = Config(batch_size=batch, hidden_size=hidden)
    model, optimizer = make_model(config), make_optimizer(config)
    dp = parallel.DataParallel(parallel.make_mesh(available[:devices]))
    parallel.check_batch(batch, devices)
    data = load_arrays(config)
    images, labels = dp.dataset(data)[:2]
    sequences = jax.jit(model.sequences, out_shardings=dp.replicated)(images)
    with jax.default_device(available[0]):
        state = dp.replicate(init_state(config, model, optimizer))
    idx = dp.shard_steps(batch_indices(len(data.train_labels), batch, 0, steps))
    fn = jax.jit(functools.partial(train.train_steps, model=model, optimizer=optimizer),
                 donate_argnums=0, out_shardings=dp.replicated)
    timing = time_compiled(fn, (state, sequences, labels, idx), repeats=repeats,
                           carry_first=True)
    step_s = timing["median_s"] / steps
    return {
        "backend": backend,
        "device_kind": available[0].device_kind,
        "devices": devices,
        "batch": batch,
        "per_device_batch": batch // devices,
        "steps_per_call": steps,
        "ms_per_step": step_s * 1e3,
        "steps_per_s": 1 / step_s,
        "samples_per_s": batch / step_s,
        "compile_s": timing["compile_s"],
        "first_call_s": timing["first_call_s"],
    }


class WorkerError(Exception):
    """A worker failed; the message is one line: which, and its own last error line."""


def worker_batch(devices: int, args: argparse.Namespace) -> int:
    """The global batch of a worker over ``devices`` (``--batch-size`` per device with
    ``--weak``)."""
    return args.batch_size * devices if args.weak else args.batch_size


def run_worker(backend: str, devices: int, args: argparse.Namespace) -> tuple[dict, dict]:
    """:func:`measure` in a fresh process (with ``devices`` forced CPU devices on CPU):
    its row and its environment. A worker that fails raises :class:`WorkerError` with its
    own ``error:`` line (its last line where it printed none: a traceback's exception)."""
    env = dict(os.environ)
    if backend == "cpu":
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={devices}")
        env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    batch = worker_batch(devices, args)
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--worker", backend, str(devices),
           "--batch-size", str(batch), "--hidden-size", str(args.hidden_size),
           "--steps", str(args.steps), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    rows = [line[len(MARK):] for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not rows:
        lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines()
                 if line.strip()]
        errors = [line.partition(": error: ")[2] for line in lines if ": error: " in line]
        said = (errors or lines or ["no output"])[-1]
        raise WorkerError(f"the worker of {backend} x{devices} failed (exit "
                          f"{proc.returncode}): {said}")
    row, env = json.loads(rows[-1])
    return row, env


def accelerators() -> dict[str, int]:
    """Accelerator backends this machine has and their device counts (a subprocess, so
    that this process never initialises JAX)."""
    code = ("import jax, json; print(json.dumps({d.platform: jax.device_count(d.platform) "
            "for d in jax.devices() if d.platform != 'cpu'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {}


def powers_of_two(limit: int) -> list[int]:
    counts = [1]
    while counts[-1] * 2 <= limit:
        counts.append(counts[-1] * 2)
    return counts + ([limit] if counts[-1] != limit else [])


def check_plan(parser: argparse.ArgumentParser, plan: list[tuple[str, int]],
               args: argparse.Namespace, examples: int) -> None:
    """Refuse (``parser.error``, exit 2), before any worker runs, a strong-scaling global
    batch that some device count of ``plan`` does not divide (weak scaling multiplies it),
    and a global batch larger than the training set's ``examples``."""
    counts = [devices for _, devices in plan]
    bad = [(backend, n) for backend, n in plan if not args.weak and args.batch_size % n]
    if bad:
        backend, n = bad[0]
        parser.error(f"--batch-size {args.batch_size} does not divide over {backend} x{n}; give "
                     f"a multiple of {math.lcm(*counts)} (every device count of the run), "
                     "other --counts (--no-accelerators: the CPU's alone), or --weak")
    harness.check_batches(parser, "--batch-size", (
        (f"{args.batch_size}" + (f" (--weak: {worker_batch(n, args)} over {backend} x{n})"
                                 if args.weak else ""), worker_batch(n, args))
        for backend, n in plan), examples)


def main(argv=None) -> None:
    parser = harness.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=ints_at_least(1), default="1,2,4,8",
                        help="forced CPU device counts")
    parser.add_argument("--batch-size", type=at_least(1), default=256,
                        help="global batch (per device with --weak); must divide by counts")
    parser.add_argument("--weak", action="store_true",
                        help="weak scaling: --batch-size per device")
    parser.add_argument("--hidden-size", type=at_least(1), default=50)
    parser.add_argument("--steps", type=at_least(1), default=100,
                        help="steps per compiled call")
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--no-accelerators", action="store_true",
                        help="CPU only, even where a GPU/TPU is present")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "DEVICES"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help="results directory")
    args = parser.parse_args(argv)

    if args.worker:
        import jax

        from benchmarks.harness import environment

        row = harness.checked(parser, lambda: measure(
            args.worker[0], int(args.worker[1]), args.batch_size, args.hidden_size,
            args.steps, args.repeats))
        print(MARK + json.dumps([row, environment(jax.devices(args.worker[0])[0])]),
              flush=True)
        return

    out = harness.results_dir(parser, args.out)
    examples = len(load_arrays(Config()).train_labels)
    plan = [("cpu", n) for n in args.counts]
    check_plan(parser, plan, args, examples)  # before asking for the accelerators (seconds)
    if not args.no_accelerators:
        for backend, count in sorted(accelerators().items()):
            plan += [(backend, n) for n in powers_of_two(count)]
        check_plan(parser, plan, args, examples)
    rows, envs = [], []
    for backend, devices in plan:
        try:
            row, worker_env = run_worker(backend, devices, args)
        except WorkerError as e:  # the rows so far are written
            parser.error(str(e))
        rows.append(row)
        envs.append(worker_env)
        print(f"{backend} x{devices}: batch {row['batch']}, {row['ms_per_step']:.3f} ms/step, "
              f"{row['samples_per_s']:.0f} samples/s", flush=True)
        report(rows, envs, args.weak, out)  # after every worker, complete so far


def report(rows: list[dict], envs: list[dict], weak: bool, out: Path) -> None:
    """Write the table of ``rows`` (the workers' so far, with ``envs``, their environments):
    each row's speedup and efficiency against the fewest-device row of its backend."""
    for backend in {r["backend"] for r in rows}:
        sel = [r for r in rows if r["backend"] == backend]
        base = min(sel, key=lambda r: r["devices"])
        for r in sel:
            r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
            r["efficiency"] = r["speedup"] * base["devices"] / r["devices"]

    columns = ["backend", "devices", "batch", "per_device_batch", "steps_per_call",
               "ms_per_step", "steps_per_s", "samples_per_s", "speedup", "efficiency",
               "compile_s", "first_call_s"]
    notes = (f"{'Weak' if weak else 'Strong'} scaling; speedup = samples/s over the "
             "fewest-device run of the same backend, efficiency = speedup x (its devices) / "
             f"devices. Forced CPU devices share this machine's {os.cpu_count()} cores, so "
             "CPU rows measure partitioning overhead, not independent hardware.")
    # The workers' environment (this process never starts JAX, so that it holds no
    # accelerator memory the workers need): what they share, each worker's device count and
    # XLA flags where they differ (the forced CPU devices), and every worker's whole.
    env = {**envs[-1], "per_row_environment": envs}
    for key in ("device_count", "xla_flags"):
        values = list(dict.fromkeys(str(e.get(key, "")) for e in envs))
        if len(values) > 1:
            env[key] = " / ".join(v or "none" for v in values) + " (per row)"
    write_results("scaling", rows, columns, env=env, notes=notes, out_dir=out)


if __name__ == "__main__":
    main()
