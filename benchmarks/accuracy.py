"""Test accuracy of every built-in cell on every sequence order, at stated budgets.

    python -m benchmarks.accuracy [--cells simple_rnn,lstm,gru,irnn] [--orders rows,pixels,permuted]
                                  [--row-steps 4001] [--pixel-steps 1000]

Rows: the seed recipe (hidden 50, Adam 1e-3, batch 50, in order) for ``--row-steps`` steps.
Pixels and permuted pixels (784 steps of one pixel, the sequential/permuted MNIST
benchmarks): the same with gradient clipping at norm 1 (plain Elman cells explode over 784
steps without it) for ``--pixel-steps`` steps, far short of the usual hundreds of epochs:
the numbers say what such a budget reaches, not what the cells can reach. Writes
``results/accuracy.{json,md}``.
"""

from __future__ import annotations

import argparse
import io

from benchmarks.harness import environment, write_results
from rnnjax.config import Config
from rnnjax.loop import train_and_evaluate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="simple_rnn,irnn,lstm,gru")
    parser.add_argument("--orders", default="rows,pixels,permuted")
    parser.add_argument("--row-steps", type=int, default=4001)
    parser.add_argument("--pixel-steps", type=int, default=1000)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    rows = []
    for order in args.orders.split(","):
        for cell in args.cells.split(","):
            pixels = order != "rows"
            steps = args.pixel_steps if pixels else args.row_steps
            config = Config(
                cell=cell, order=order, steps=steps, eval_every=max(1, steps // 4),
                clip_norm=1.0 if pixels else 0.0, eval_batch_size=1000 if pixels else 10000,
            )
            result = train_and_evaluate(config, out=io.StringIO())
            s = result.summary
            rows.append({
                "order": order, "cell": cell, "steps": steps, "batch": config.batch_size,
                "clip_norm": config.clip_norm, "test_accuracy": s["final_test_accuracy"],
                "test_loss": s["final_test_loss"], "train_s": s["train_s"],
                "ms_per_step": 1e3 * s["train_s"] / steps,
            })
            print(rows[-1], flush=True)
    write_results("accuracy", rows, ["order", "cell", "steps", "batch", "clip_norm",
                                     "test_accuracy", "test_loss", "train_s", "ms_per_step"],
                  env=environment(), out_dir=args.out or None)


if __name__ == "__main__":
    main()
