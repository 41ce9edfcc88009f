"""Feeds compared: how batches reach the compiled step, and what that costs per step.

    python -m benchmarks.feeds [--batch-size 50] [--steps 1000] [--rounds 3]

Rows (same model, the training set in order):

* ``tfds pipeline alone``: the tf.data pipeline by itself, per batch (needs tfds);
* ``1 step/call, tfds pipeline``: the per-step loop fed by tf.data (needs tfds), each in
  the first epoch and in later ones;
* ``1 step/call, host numpy``: the per-step loop fed from NumPy arrays;
* ``1 step/call, device-resident``: one compiled step per call, batch cut on the device;
* ``K steps/call, device-resident``: ``lax.scan`` over K steps in one call (the default).

Every feed is compiled first; then, after one untimed turn each, all of them run about
``--steps`` steps a turn (whole calls of K steps; at most one epoch for a first epoch), in
turns (``harness.interleaved``): ``--rounds`` rounds, the median turn per step. The
tf.data rows come twice: ``first epoch``, a new pipeline each turn reading the records
from the start (its start-up included: the IDX files checked, the builder made), and ``later
epochs``, one pipeline read on across turns from the second epoch, where tfds reads the
split from the memory it cached it in during the first. (Before 2026-12-02 the benchmark
timed only the first, and called it the per-step tf.data feed.) Compile seconds are
reported apart.
Writes ``results/feeds.{json,md}``.
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Callable, Iterator

import jax
import numpy as np

from benchmarks import harness
from benchmarks.flax_peers import rnnjax_runner
from benchmarks.harness import (
    at_least,
    check_batches,
    checked,
    environment,
    interleaved,
    results_dir,
    write_results,
)
from rnnjax import runtime, train
from rnnjax.config import Config
from rnnjax.data.pipeline import batch_indices, host_batches, to_device
from rnnjax.data.sources import load_arrays, resolve_dataset
from rnnjax.loop import init_state
from rnnjax.model import make_model
from rnnjax.optim import make_optimizer


def drain(batches: Iterator[object]) -> None:
    """Read every batch of ``batches``, keeping none (as a feed's loop drops each)."""
    collections.deque(batches, maxlen=0)


def main(argv: list[str] | None = None) -> None:
    parser = harness.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=at_least(1), default=1000, help="per feed and turn")
    parser.add_argument("--unroll", type=int, default=0)
    parser.add_argument("--rounds", type=at_least(1), default=3, help="turns of every feed")
    parser.add_argument("--tfds-dir", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    out = results_dir(parser, args.out)
    config = checked(parser, lambda: Config(batch_size=args.batch_size, unroll=args.unroll))
    data = load_arrays(config)
    check_batches(parser, "--batch-size", [(str(args.batch_size), args.batch_size)],
                  len(data.train_labels))
    epoch = len(data.train_labels) // args.batch_size
    try:
        from rnnjax.data import tfds_mnist
    except ImportError as e:
        tfds_mnist = None
        print(f"tfds rows skipped: {e} (pip install -e '.[tfds]')")
    if tfds_mnist is not None:  # its build made (or found) now: a bad --tfds-dir, one line
        resolved = resolve_dataset(config.dataset, config.data_dir)
        checked(parser, lambda: tfds_mnist.prepare(*resolved, args.tfds_dir))
    model, optimizer = make_model(config), make_optimizer(config)
    fresh = functools.partial(init_state, config, model, optimizer)
    step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer),
                   donate_argnums=0)
    device_data = to_device(data)
    runners: dict[str, Callable[[], object]] = {}
    compile_s: dict[str, float] = {}
    steps_per_turn: dict[str, int] = {}

    first = next(host_batches(data.train_images, data.train_labels, args.batch_size, 0, 1))
    compiled_step, step_compile_s = runtime.compile_timed(step, fresh(), *first)

    def per_step(name: str, batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
                 steps: int = args.steps) -> None:
        """One compiled step per call (one program for every such feed), ``steps`` batches
        a turn from ``batches()``: a new iterator each turn, or one read on across turns."""
        state, compiled = [fresh()], compiled_step
        compile_s[name], steps_per_turn[name] = step_compile_s, steps

        def run():
            for x, y in itertools.islice(batches(), steps):
                state[0], _ = compiled(state[0], x, y)
            return state[0]

        runners[name] = run

    def on_device(name: str, k: int) -> None:
        """``k`` steps per compiled call on the device-resident dataset, each call the first
        ``k`` batches (``flax_peers.rnnjax_runner``); a turn is ``--steps // k`` calls (the
        steps per turn rounded down to whole calls)."""
        calls = max(1, args.steps // k)
        idx = jax.device_put(batch_indices(len(data.train_labels), args.batch_size, 0, k))
        run, compile_s[name] = rnnjax_runner(device_data, idx, config)

        def turn():
            for _ in range(calls):
                state = run()
            return state

        runners[name] = turn
        steps_per_turn[name] = calls * k

    if tfds_mnist is not None:
        tf_batches = functools.partial(tfds_mnist.train_batches, *resolved, args.tfds_dir,
                                       args.batch_size)
        first_epoch = min(args.steps, epoch)  # steps of a turn that starts a new pipeline
        steps_per_turn["tfds pipeline alone, first epoch"] = first_epoch
        runners["tfds pipeline alone, first epoch"] = (
            lambda: drain(itertools.islice(tf_batches(), first_epoch)))
        read_on = tf_batches()  # tfds caches a small split in memory as its first epoch
        for _ in range(epoch):  # is read: later epochs read that cache, not the records
            next(read_on)
        runners["tfds pipeline alone, later epochs"] = (
            lambda: drain(itertools.islice(read_on, args.steps)))
        per_step("1 step/call, tfds pipeline, first epoch", tf_batches, first_epoch)
        later = tf_batches(start_step=epoch)
        per_step("1 step/call, tfds pipeline, later epochs", lambda: later)
    numpy_batches = host_batches(data.train_images, data.train_labels, args.batch_size, 0,
                                 2**62)  # read lazily, as many turns as are run
    per_step("1 step/call, host numpy", lambda: numpy_batches)
    for k in sorted({1, min(100, args.steps), args.steps}):  # a call runs at most --steps
        on_device(f"{k} step{'s' * (k > 1)}/call, device-resident", k)

    seconds = interleaved(runners, args.rounds)
    rows = []
    for name, turn_s in seconds.items():
        ms = turn_s / steps_per_turn.get(name, args.steps) * 1e3
        rows.append({"feed": name, "batch": args.batch_size, "ms_per_step": ms,
                     "steps_per_s": 1e3 / ms, "compile_s": compile_s.get(name, "")})
    write_results("feeds", rows, ["feed", "batch", "ms_per_step", "steps_per_s", "compile_s"],
                  env=environment(), out_dir=out,
                  notes=f"{args.rounds} rounds in turns of about {args.steps} steps per feed "
                        f"(whole calls; a first epoch at most an epoch); unroll {args.unroll}; "
                        "the median turn.")


if __name__ == "__main__":
    main()
