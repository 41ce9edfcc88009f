"""rnnjax against its peers, same data, same recipe, same run: Keras 3/JAX and PyTorch.

    pip install -e '.[peers]'          # keras, torch==2.13.0 (CPU)
    python -m benchmarks.peers [--batch-sizes 50,256,1024,4096] [--seed-run]

Per batch size, the median time of one SimpleRNN(50) -> Dense(10) Adam train step on
MNIST rows, walked in order:

* rnnjax as ``rnnjax train --batch-size B`` runs it: the tuner's choice for this machine
  and batch (cached, or measured now as the first ``rnnjax train`` would: ``--tune-budget``;
  printed in each row), on device-resident data, in a child process started with the
  choice's process settings (XLA flags, huge pages, CPUs) where it has some
  (``benchmarks.flax_peers``' runner); its step as a run of 500-step calls pays it, read as
  ``benchmarks.flax_peers`` reads every runner's: timed in compiled calls of 1 and K steps,
  the call's own cost (``rnnjax.measure.call_overhead``) off the K-step call and spread
  over 500 steps; and the same choice without them, one compiled step per call fed from
  the host (each step then pays its call, as the peers' steps do);
* Keras 3 ``SimpleRNN`` on its JAX backend with ``train_on_batch``, ``unroll=True`` (the
  seed's setting) and ``False``, TensorFlow not imported (as on rnnjax's side;
  ``benchmarks.harness.without_tensorflow``);
* PyTorch eager ``nn.RNN`` + ``nn.Linear`` + ``torch.optim.Adam``.

Each runner's compile seconds are apart from its step, in the notes and the JSON (Keras':
its first ``train_on_batch``, where it traces and compiles).

``--seed-run`` also times the whole seed experiment (4001 steps, 9 test evaluations) as
separate processes: ``rnnjax train`` against ``benchmarks.keras_seed`` (best of two runs
each, so the data files are in the page cache). Peers missing from the environment are
skipped and say so, and so does the figure without matplotlib. Writes
``results/peers.{json,md,png}``, then runs ``benchmarks.flax_peers`` (``--flax-cases``).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import numpy as np

from benchmarks import flax_peers, harness
from benchmarks.harness import environment, interleaved, write_results
from rnnjax import runtime, train
from rnnjax.config import Config
from rnnjax.data.idx import Arrays
from rnnjax.data.pipeline import batch_indices, host_batches, to_device
from rnnjax.data.sources import load_arrays
from rnnjax.loop import init_state
from rnnjax.model import make_model
from rnnjax.optim import make_optimizer

Runner = Callable[[], object]
RNNJAX = "rnnjax (as rnnjax train)"
PER_STEP = "rnnjax (1 step/call)"


def batches(data: Arrays, batch: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``count`` in-order batches: (float32 [B, 28, 28], int32 [B])."""
    return list(host_batches(data.train_images, data.train_labels, batch, 0, count))


def rnnjax_runners(data: Arrays, device_data: Arrays, batch: int, steps: int,
                   tune_budget_s: float | None
                   ) -> tuple[dict[str, Runner], dict[str, float], str]:
    """rnnjax as ``rnnjax train --batch-size B`` runs it (the tuner's choice for this machine,
    cached or measured now within ``tune_budget_s``, as in ``benchmarks.flax_peers``): up to
    K = ``steps`` train steps per compiled call on ``device_data`` (``run(count)``), in a
    child process started with the choice's process settings where it has some; and the
    same choice, without them, one compiled step per call fed from the host. Returns the
    runners (a child is closed by ``flax_peers.close_children``), their compile seconds and
    the choice in words."""
    config, chosen = flax_peers.user_config("simple_rnn", "rows", batch, tune_budget_s)
    idx = jax.device_put(batch_indices(len(data.train_labels), batch, 0, steps))
    fast, fast_compile_s = flax_peers.train_runner(device_data, idx, config)
    per_step, per_step_compile_s = rnnjax_per_step(data, batch, steps,
                                                   flax_peers.in_process(config))
    return ({RNNJAX: fast, PER_STEP: per_step},
            {RNNJAX: fast_compile_s, PER_STEP: per_step_compile_s}, chosen)


def rnnjax_per_step(data: Arrays, batch: int, steps: int,
                    config: Config) -> tuple[Runner, float]:
    """One compiled step of ``config``'s model per call, batches fed from the host; and its
    compile seconds (compiled ahead, ``rnnjax.runtime.compile_timed``)."""
    model, optimizer = make_model(config), make_optimizer(config)
    state = [init_state(config, model, optimizer)]
    step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer),
                   donate_argnums=0)
    feed = batches(data, batch, steps)
    compiled, compile_s = runtime.compile_timed(step, state[0], *feed[0])

    def run():
        for x, y in feed:
            state[0], _ = compiled(state[0], x, y)
        return state[0]

    return run, compile_s


def keras_step(data: Arrays, batch: int, steps: int, unroll: bool) -> tuple[Runner, float]:
    """Keras 3 on JAX, ``train_on_batch`` per step (the seed's loop); TensorFlow not imported
    (``harness.without_tensorflow``), as rnnjax's side imports none. Returns the runner and
    the seconds of a first ``train_on_batch``, untimed by the runner: where Keras traces and
    compiles its train function (and takes one step; its result read, so finished)."""
    with harness.without_tensorflow():
        import keras

        keras.utils.set_random_seed(1337)
    model = keras.Sequential([keras.Input((28, 28)), keras.layers.SimpleRNN(50, unroll=unroll),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    feed = [(x, keras.utils.to_categorical(y, 10)) for x, y in batches(data, batch, steps)]

    start = time.perf_counter()
    model.train_on_batch(*feed[0])
    first_call_s = time.perf_counter() - start

    def run():
        for x, y in feed:
            loss = model.train_on_batch(x, y)
        return loss

    return run, first_call_s


def torch_step(data: Arrays, batch: int, steps: int) -> tuple[Runner, float]:
    """PyTorch eager: nn.RNN + nn.Linear, cross-entropy, torch.optim.Adam; and its compile
    seconds, 0 (eager compiles nothing)."""
    import torch

    torch.manual_seed(1337)
    torch.set_num_threads(os.cpu_count() or 1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.RNN(28, 50, batch_first=True)
            self.head = torch.nn.Linear(50, 10)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    feed = [(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
            for x, y in batches(data, batch, steps)]

    def run():
        for x, y in feed:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
        return None

    return run, 0.0


def available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def seed_run(repeats: int = 2) -> list[dict]:
    """Whole-process wall time of the seed experiment, rnnjax vs Keras 3 (best of N); for
    Keras also whether it loaded TensorFlow (its last line says; rnnjax imports none)."""
    rows = []
    commands = {"rnnjax": [sys.executable, "-m", "rnnjax", "train"]}
    if available("keras"):
        commands["keras (unroll=True)"] = [sys.executable, "-m", "benchmarks.keras_seed"]
    for name, command in commands.items():
        walls, last = [], ""
        for _ in range(repeats):
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - start)
            last = proc.stdout
        accuracy = re.findall(r"step +4000 .*test accuracy:  ([0-9.]+)", last)
        tensorflow = re.findall(r"tensorflow loaded: (True|False)", last)
        rows.append({"peer": name, "wall_s": min(walls),
                     "final_accuracy": float(accuracy[-1]) if accuracy else float("nan"),
                     **({"tensorflow_loaded": tensorflow[-1] == "True"} if tensorflow else {})})
    return rows


def main(argv=None) -> None:
    parser = harness.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=harness.ints_at_least(1),
                        default="50,256,1024,4096")
    parser.add_argument("--repeats", type=harness.at_least(1), default=5,
                        help="rounds of turns")
    parser.add_argument("--seed-run", action="store_true")
    parser.add_argument("--flax-cases", type=harness.cases(empty=True),
                        default="rows:50,rows:1024,rows:4096,pixels:50",
                        help="cases of the Flax comparison (benchmarks.flax_peers); '' skips it")
    parser.add_argument("--tune-budget", type=harness.tune_budget, default=None,
                        help="seconds the tuner may spend on a batch size it has not cached "
                        "(default: as the first rnnjax train would; 0: the untuned defaults, "
                        "as with $RNNJAX_TUNE off)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    out = harness.results_dir(parser, args.out)
    data = load_arrays(Config())
    harness.check_batches(parser, "--batch-sizes", ((str(b), b) for b in args.batch_sizes),
                          len(data.train_labels))
    device_data = to_device(data)
    peers: dict[str, Callable[[Arrays, int, int], tuple[Runner, float]]] = {}
    if available("keras"):
        peers["keras3-jax unroll=True"] = functools.partial(keras_step, unroll=True)
        peers["keras3-jax unroll=False"] = functools.partial(keras_step, unroll=False)
    else:
        print("keras not installed: skipped (pip install -e '.[peers]')")
    if available("torch"):
        peers["pytorch eager"] = torch_step
    else:
        print("torch not installed: skipped (pip install torch==2.13.0)")

    rows, names = [], []
    run_steps = Config().steps_per_call  # what rnnjax train runs per call
    for batch in args.batch_sizes:
        steps = max(10, min(200, 20000 // batch))
        runners, compile_s, chosen = rnnjax_runners(data, device_data, batch, steps,
                                                    args.tune_budget)
        try:
            for name, make in peers.items():
                runners[name], compile_s[name] = make(data, batch, steps)
            # rnnjax's runner in calls of 1 and K steps; the others, K steps a call of
            # one step each, as their loops run.
            timed = {**flax_peers.calls_of({RNNJAX: (runners[RNNJAX], 0.0)}, steps),
                     **{name: run for name, run in runners.items() if name != RNNJAX}}
            seconds = interleaved(timed, args.repeats)
        finally:
            flax_peers.close_children(runners.values())
        names = list(runners)
        row = {"batch": batch, "steps_timed": steps, "rnnjax train runs": chosen}
        row.update(flax_peers.step_columns(RNNJAX, seconds[f"{RNNJAX} (1)"],
                                           seconds[f"{RNNJAX} ({steps})"], steps, run_steps))
        for name in names[1:]:
            row[f"{name} ms"] = seconds[name] / steps * 1e3
        for name in names:
            print(f"batch {batch:5d} {name:26s} {row[f'{name} ms']:8.3f} ms/step", flush=True)
        best = row[f"{RNNJAX} ms"]
        for name in names[1:]:
            row[f"{name} / rnnjax"] = row[f"{name} ms"] / best
        row.update((f"{name} compile s", value) for name, value in compile_s.items())
        rows.append(row)
    # The table: ms per step; the compile seconds and the calls' own ms: notes, JSON.
    columns = [c for c in rows[0] if not c.endswith((" compile s", *flax_peers.CALL_COLUMNS))]
    notes = "\n\n".join(
        flax_peers.per_runner_notes(rows, title, suffix, "{:.1f}",
                                    case=lambda r: f"batch {r['batch']}")
        for title, suffix in (
            ("Compile seconds of each runner, untimed in the table (Keras: its first "
             "train_on_batch, where it compiles, one step with it; PyTorch eager compiles "
             "nothing)", " compile s"),
            (f"rnnjax's call's own ms, spread over {run_steps} steps per call in its ms "
             "above (the medians of its 1- and K-step calls are in the JSON)", " call ms")))
    if args.seed_run:
        seed_rows = seed_run()
        base = seed_rows[0]["wall_s"]
        notes += "\n\nSeed run, whole process (best of 2):\n\n" + "\n".join(
            f"- {r['peer']}: {r['wall_s']:.2f} s, final accuracy {r['final_accuracy']:.4f}, "
            f"{r['wall_s'] / base:.2f}x rnnjax's time"
            + (f", tensorflow loaded: {r['tensorflow_loaded']}" if "tensorflow_loaded" in r
               else "") for r in seed_rows
        )
        print(notes)
    write_results("peers", rows, columns, env=environment(), notes=notes, out_dir=out)
    if available("matplotlib"):
        plot(rows, names, out / "peers.png")
    else:
        print("matplotlib not installed: no peers.png (pip install -e '.[peers]')")
    if args.flax_cases and available("flax"):
        flax_peers.main(["--cases", ",".join(f"{order}:{batch}"
                                             for order, batch in args.flax_cases),
                         "--rounds", str(args.repeats),
                         *(["--tune-budget", str(args.tune_budget)]
                           if args.tune_budget is not None else []),
                         *(["--out", args.out] if args.out else [])])


def plot(rows, names, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        ax.plot([r["batch"] for r in rows], [r["batch"] / r[f"{name} ms"] * 1e3 for r in rows],
                "o-", label=name)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="samples/s",
           title="SimpleRNN(50) train step, same machine, same run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
