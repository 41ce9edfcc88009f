"""The training loop: the one place with side effects (jit, device transfers, printing, files).

Two feeds run the same pure ``train_step``:

* ``device`` (default): the whole dataset lives on the device; each compiled call runs up to
  ``steps_per_call`` steps as a ``lax.scan``, cutting batches on the device;
* ``stream``: one compiled step per call, fed batch by batch from the host (the tfds/tf.data
  pipeline with ``--source tfds``, NumPy otherwise).

Both see the same batches in the same order and give the same parameters. Evaluations on
the full test set happen after step 0, every ``eval_every`` steps, and after the last step
(the seed's schedule: after steps 0, 500, ..., 4000 of 4001).
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import metrics as metrics_lib
from rnnjax import runtime, train
from rnnjax.config import Config, ConfigError, to_dict
from rnnjax.data.idx import Arrays
from rnnjax.data.pipeline import batch_indices, host_batches, to_device
from rnnjax.data.sources import load_arrays, resolve_dataset
from rnnjax.model import make_model
from rnnjax.optim import make_optimizer


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class RunResult:
    """What a finished run measured (all host values)."""

    state: train.TrainState
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def eval_steps(config: Config) -> list[int]:
    """The steps (0-based) after which the test set is evaluated."""
    points = list(range(0, config.steps, config.eval_every))
    if points[-1] != config.steps - 1:
        points.append(config.steps - 1)
    return points


def segments(config: Config, start: int = 0) -> Iterator[tuple[int, int, bool]]:
    """``(first step, number of steps, evaluate after)`` for each compiled call from ``start``."""
    first = start
    for point in eval_steps(config):
        if point < start:
            continue
        end = point + 1
        while first < end:
            count = min(config.steps_per_call, end - first)
            yield first, count, first + count == end
            first += count


def check_data(config: Config, data: Arrays) -> None:
    n = len(data.train_labels)
    if config.batch_size > n:
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the {n} training examples; "
            f"use at most {n}"
        )
    classes = int(max(data.train_labels.max(), data.test_labels.max())) + 1
    if classes > config.num_classes:
        raise ConfigError(
            f"the dataset has labels up to {classes - 1} but --num-classes is "
            f"{config.num_classes}; pass --num-classes {classes}"
        )


def _stream(config: Config, data: Arrays, start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    count = config.steps - start
    if config.source == "tfds":
        from rnnjax.data import tfds_mnist

        name, directory, checksums = resolve_dataset(config.dataset, config.data_dir)
        return tfds_mnist.train_batches(
            name, directory, checksums, config.tfds_dir, config.batch_size,
            start_step=start, shuffle=config.shuffle, seed=config.seed,
        )
    return host_batches(
        data.train_images, data.train_labels, config.batch_size, start, count,
        shuffle=config.shuffle, seed=config.seed,
    )


def train_and_evaluate(
    config: Config,
    workdir: Path | str | None = None,
    *,
    out: TextIO = sys.stdout,
    progress: bool | None = None,
) -> RunResult:
    """Train ``config`` end to end, printing the seed's evaluation lines to ``out``.

    With ``workdir``, writes ``config.json``, ``metrics.jsonl``/``.csv`` and
    ``summary.json`` there. Returns the final state, the evaluation history and a summary.
    """
    t_start = time.perf_counter()
    data = load_arrays(config)
    check_data(config, data)
    t_data = time.perf_counter() - t_start

    model = make_model(config)
    optimizer = make_optimizer(config)
    init_key = jax.random.split(jax.random.key(config.seed))[0]
    # One compiled initialisation instead of dozens of eagerly compiled small ops.
    t_init = time.perf_counter()
    state = jax.jit(functools.partial(train.create_state, model=model, optimizer=optimizer))(
        init_key
    )
    init_s = time.perf_counter() - t_init

    writer = None
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
        writer = metrics_lib.MetricWriter(workdir)

    on_device = to_device(data)
    test_images, test_labels = on_device.test_images, on_device.test_labels
    evaluate = jax.jit(
        functools.partial(train.evaluate, model=model, chunk=config.eval_batch_size)
    )
    evaluate, compile_s = runtime.compile_timed(evaluate, state.params, test_images, test_labels)

    compiled: dict[int, Any] = {}
    chunk = min(config.steps_per_call, config.steps)
    if config.feed == "device":
        images, labels = on_device.train_images, on_device.train_labels
        chunk_fn = jax.jit(
            functools.partial(train.train_steps, model=model, optimizer=optimizer),
            donate_argnums=0,
        )
    else:
        batches = _stream(config, data, 0)
        step_fn = jax.jit(
            functools.partial(train.train_step, model=model, optimizer=optimizer),
            donate_argnums=0,
        )

    history: list[dict[str, Any]] = []
    bar = metrics_lib.Progress(config.steps, enabled=progress)
    train_sums = None
    train_s = eval_s = 0.0
    t0 = None  # start of the training time not yet counted (compiles excluded)
    try:
        for first, count, evaluate_after in segments(config):
            if t0 is None:
                t0 = time.perf_counter()
            if config.feed == "device":
                # Indices padded to a fixed [chunk, B] with the count passed as data: one
                # compiled function serves every segment length, no recompiles.
                idx = np.zeros((chunk, config.batch_size), np.int32)
                idx[:count] = batch_indices(
                    len(data.train_labels), config.batch_size, first, count,
                    shuffle=config.shuffle, seed=config.seed,
                )
                n = np.int32(count)
                if not compiled:
                    compiled[chunk], seconds = runtime.compile_timed(
                        chunk_fn, state, images, labels, idx, n
                    )
                    compile_s += seconds
                    t0 += seconds
                state, sums = compiled[chunk](state, images, labels, idx, n)
            else:
                step_sums_list = []
                for _ in range(count):
                    x, y = next(batches)
                    if not compiled:
                        compiled[1], seconds = runtime.compile_timed(step_fn, state, x, y)
                        compile_s += seconds
                        t0 += seconds
                    state, step_sums = compiled[1](state, x, y)
                    step_sums_list.append(step_sums)
                sums = jax.tree.map(lambda *m: jnp.stack(m).sum(0), *step_sums_list)
            # Still on the device: summed asynchronously, read only at the log point.
            train_sums = sums if train_sums is None else jax.tree.map(jnp.add, train_sums, sums)
            if not evaluate_after:
                continue
            jax.block_until_ready(state)
            train_s += time.perf_counter() - t0
            t0 = None
            step = first + count - 1
            t1 = time.perf_counter()
            test = metrics_lib.summarize(evaluate(state.params, test_images, test_labels))
            eval_s += time.perf_counter() - t1
            trained = metrics_lib.summarize(train_sums)
            train_sums = None
            if not math.isfinite(trained["loss"]):
                raise TrainingDiverged(
                    f"training loss became {trained['loss']} by step {step}; lower "
                    "--learning-rate or set --clip-norm"
                )
            bar.close()
            out.write(f"step {step:>5}  {metrics_lib.seed_line(test['loss'], test['accuracy'])}\n")
            out.flush()
            bar.update(step + 1)
            wall = time.perf_counter() - t_start
            record = {"step": step, "wall_s": round(wall, 3)}
            history.append({**record, "train_loss": trained["loss"],
                            "train_accuracy": trained["accuracy"],
                            "test_loss": test["loss"], "test_accuracy": test["accuracy"]})
            if writer is not None:
                writer.write({**record, "split": "train", **trained})
                writer.write({**record, "split": "test", **test})
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    wall_s = time.perf_counter() - t_start
    last = history[-1]
    summary = {
        "final_test_accuracy": last["test_accuracy"],
        "final_test_loss": last["test_loss"],
        "steps": config.steps,
        "wall_s": wall_s,
        "data_s": t_data,
        "init_s": init_s,
        "compile_s": compile_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "steps_per_s": config.steps / train_s if train_s else math.nan,
        **runtime.device_info(),
        "versions": runtime.versions(),
    }
    out.write(format_summary(summary))
    out.flush()
    if workdir is not None:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return RunResult(state, history, summary)


def format_summary(s: dict[str, Any]) -> str:
    """The closing lines of a run."""
    versions = ", ".join(f"{k} {v}" for k, v in s["versions"].items())
    return (
        f"final test accuracy: {s['final_test_accuracy']:.4f} "
        f"(test cost {s['final_test_loss']:.4f}) after {s['steps']} steps\n"
        f"wall time {s['wall_s']:.2f} s: data {s['data_s']:.2f} s, init {s['init_s']:.2f} s, "
        f"compile {s['compile_s']:.2f} s, train {s['train_s']:.2f} s "
        f"({s['steps_per_s']:.0f} steps/s), eval {s['eval_s']:.2f} s\n"
        f"device: {s['backend']} {s['device_kind']} x{s['device_count']}; {versions}\n"
    )
