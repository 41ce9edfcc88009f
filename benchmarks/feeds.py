"""Feeds compared: how batches reach the compiled step, and what that costs per step.

    python -m benchmarks.feeds [--batch-size 50] [--steps 1000]

Rows (same model, same in-order batches):

* ``tfds pipeline alone``: batches/s of the tf.data pipeline by itself (needs tfds);
* ``1 step/call, tfds pipeline``: the per-step loop fed by tf.data (needs tfds);
* ``1 step/call, host numpy``: the per-step loop fed from NumPy arrays;
* ``1 step/call, device-resident``: one compiled step per call, batch cut on the device;
* ``K steps/call, device-resident``: ``lax.scan`` over K steps in one call (the default).

Writes ``results/feeds.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax

from benchmarks.harness import environment, time_calls, time_compiled, write_results
from rnnjax import train
from rnnjax.config import Config
from rnnjax.data.pipeline import batch_indices, host_batches, to_device
from rnnjax.data.sources import load_arrays, resolve_dataset
from rnnjax.loop import init_state
from rnnjax.model import make_model
from rnnjax.optim import make_optimizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--unroll", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tfds-dir", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    config = Config(batch_size=args.batch_size, unroll=args.unroll)
    data = load_arrays(config)
    n = len(data.train_labels)
    model, optimizer = make_model(config), make_optimizer(config)
    fresh = functools.partial(init_state, config, model, optimizer)
    step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer),
                   donate_argnums=0)
    chunk = jax.jit(functools.partial(train.train_steps, model=model, optimizer=optimizer),
                    donate_argnums=0)
    images, labels = to_device(data)[:2]
    sequences = model.sequences(images)  # train_steps' form of the dataset, made once
    idx = batch_indices(n, args.batch_size, 0, args.steps)
    rows = []

    def per_step(make_batches):
        state = [fresh()]
        x, y = next(iter(make_batches()))
        compiled = step.lower(state[0], x, y).compile()

        def run():
            for x, y in itertools.islice(make_batches(), args.steps):
                state[0], _ = compiled(state[0], x, y)
            return state[0]

        return time_calls(run, args.repeats)[0] / args.steps

    try:
        from rnnjax.data import tfds_mnist

        name, directory, checksums = resolve_dataset(config.dataset, config.data_dir)

        def tf_batches():
            return tfds_mnist.train_batches(name, directory, checksums, args.tfds_dir,
                                            args.batch_size)

        pipeline = tf_batches()
        next(pipeline)
        alone = time_calls(lambda: [next(pipeline) for _ in range(args.steps)], args.repeats)[0]
        rows.append({"feed": "tfds pipeline alone", "ms_per_step": alone / args.steps * 1e3})
        rows.append({"feed": "1 step/call, tfds pipeline",
                     "ms_per_step": per_step(tf_batches) * 1e3})
    except ImportError as e:
        print(f"tfds rows skipped: {e} (pip install -e '.[tfds]')")

    rows.append({"feed": "1 step/call, host numpy", "ms_per_step": per_step(
        lambda: host_batches(data.train_images, data.train_labels, args.batch_size, 0,
                             args.steps)) * 1e3})
    one = time_compiled(chunk, (fresh(), sequences, labels, idx[:1]), repeats=args.repeats * 50,
                        carry_first=True)
    rows.append({"feed": "1 step/call, device-resident", "ms_per_step": one["median_s"] * 1e3})
    for k in sorted({min(100, args.steps), args.steps}):  # a call runs at most --steps
        many = time_compiled(chunk, (fresh(), sequences, labels, idx[:k]), repeats=args.repeats,
                             carry_first=True)
        rows.append({"feed": f"{k} steps/call, device-resident",
                     "ms_per_step": many["median_s"] / k * 1e3})
    for row in rows:
        row["steps_per_s"] = 1e3 / row["ms_per_step"]
        row["batch"] = args.batch_size
    write_results("feeds", rows, ["feed", "batch", "ms_per_step", "steps_per_s"],
                  env=environment(), out_dir=args.out or None)


if __name__ == "__main__":
    main()
