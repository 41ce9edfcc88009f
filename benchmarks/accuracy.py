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

import io

from benchmarks import harness
from benchmarks.harness import (
    at_least,
    cell_names,
    environment,
    names,
    results_dir,
    write_results,
)
from rnnjax.config import ORDERS, Config
from rnnjax.loop import train_and_evaluate


def run_config(cell: str, order: str, row_steps: int, pixel_steps: int) -> Config:
    """The run of ``cell`` on ``order``: the seed recipe on rows, gradients clipped at norm 1
    on (permuted) pixels; four evaluations."""
    pixels = order != "rows"
    steps = pixel_steps if pixels else row_steps
    return Config(cell=cell, order=order, steps=steps, eval_every=max(1, steps // 4),
                  clip_norm=1.0 if pixels else 0.0, eval_batch_size=1000 if pixels else 10000)


def main(argv=None) -> None:
    parser = harness.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=cell_names, default="simple_rnn,irnn,lstm,gru")
    parser.add_argument("--orders", type=names(ORDERS), default="rows,pixels,permuted")
    parser.add_argument("--row-steps", type=at_least(1), default=4001)
    parser.add_argument("--pixel-steps", type=at_least(1), default=1000)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    out = results_dir(parser, args.out)
    rows = []
    for config in (run_config(cell, order, args.row_steps, args.pixel_steps)
                   for order in args.orders for cell in args.cells):
        s = train_and_evaluate(config, out=io.StringIO()).summary
        rows.append({
            "order": config.order, "cell": config.cell, "steps": config.steps,
            "batch": config.batch_size, "clip_norm": config.clip_norm,
            "test_accuracy": s["final_test_accuracy"], "test_loss": s["final_test_loss"],
            "train_s": s["train_s"], "ms_per_step": 1e3 * s["train_s"] / config.steps,
        })
        print(rows[-1], flush=True)
    write_results("accuracy", rows, ["order", "cell", "steps", "batch", "clip_norm",
                                     "test_accuracy", "test_loss", "train_s", "ms_per_step"],
                  env=environment(), out_dir=out)


if __name__ == "__main__":
    main()
