"""The training loop: the one place with side effects (jit, device transfers, printing, files).

Two feeds run the same pure ``train_step``:

* ``device`` (default, :func:`device_feed`): the whole dataset lives on the device; each
  compiled call runs up to ``steps_per_call`` steps in a loop, cutting batches on the device;
* ``stream`` (:func:`stream_feed`): one compiled step per call, fed batch by batch from the
  host (the tfds/tf.data pipeline with ``--source tfds``, NumPy otherwise).

Both see the same batches in the same order and give the same parameters. Evaluations on
the full test set happen after step 0, every ``eval_every`` steps, and after the last step
(the seed's schedule: after steps 0, 500, ..., 4000 of 4001).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnnjax import atomic, memory, parallel, probes, process, runtime, train
from rnnjax import checkpoint as checkpoint_lib
from rnnjax import metrics as metrics_lib
from rnnjax.config import TUNED, Config, ConfigError, to_dict
from rnnjax.data.idx import Arrays
from rnnjax.data.pipeline import batch_indices, host_batches
from rnnjax.data.sources import Loader, load_dataset, tfds_train_batches
from rnnjax.data.spec import DataSpec
from rnnjax.model import Model, evaluation_model, make_model
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
    """``(first step, number of steps, evaluate after)`` for each compiled call from ``start``.

    Calls also end where a checkpoint is due (after every ``checkpoint_every`` steps). Where
    a run's calls are cut does not change its metrics: each call adds its steps' to the
    sums so far, one step at a time (:class:`SegmentFn`).
    """
    first = start
    every = config.checkpoint_every
    for point in eval_steps(config):
        if point < start:
            continue
        end = point + 1
        while first < end:
            count = min(config.steps_per_call, end - first)
            if every:
                count = min(count, every - first % every)
            yield first, count, first + count == end
            first += count


def last_regular_eval(config: Config, steps_done: int) -> int:
    """The last evaluation on the ``eval_every`` grid among steps ``0 .. steps_done-1``.

    A checkpoint after ``steps_done`` steps holds the train sums of the steps after it;
    the run resumed from it logs every evaluation after it again.
    """
    return (steps_done - 1) // config.eval_every * config.eval_every


def device_sequences(model: Model, dp: parallel.DataParallel, images: jax.Array
                     ) -> jax.Array:
    """``model.sequences`` of images on the device ([N, H, W(, C)] -> [T, N, F]), computed
    there and replicated over the run's devices, as the feeds and evaluations read them."""
    return jax.jit(model.sequences, out_shardings=dp.replicated)(images)


def initial_state(model: Model, optimizer: optax.GradientTransformation, seed: jax.Array
                  ) -> train.TrainState:
    """The state a run starts from, drawn from the integer ``seed`` (int32 []): the
    parameters from one half of its key's split, the optimizer's random keys (``noisy_sgd``)
    from the other. A pure function, traced by :func:`init_state` (and, for shapes alone,
    by ``inference.state_shapes``)."""
    model_key, optimizer_key = jax.random.split(jax.random.key(seed))
    return train.create_state(model_key, model, optimizer, optimizer_key)


def init_state(
    config: Config, model: Model, optimizer: optax.GradientTransformation
) -> train.TrainState:
    """The run's initial state from ``config.seed``, in one compiled call.

    Run eagerly, initialisation would compile dozens of small ops one by one (seconds on
    XLA:CPU); jitted it is one program, which the persistent compilation cache keeps, and
    which runs once, so it is compiled for that (``runtime.run_once``: a third of the
    compile time on a CPU, the same bits). The key is made from the seed inside it too
    (eagerly, the key, its split and the slice were four more programs to trace and load:
    about 0.1 s of every run); the seed goes in as the integer ``jax.random.key`` would
    convert it to, so the key's bits are its.
    """
    init = functools.partial(initial_state, model, optimizer)
    return runtime.run_once(jax.jit(init), np.int64(config.seed))


def check_data(config: Config, data: Arrays, spec: DataSpec) -> None:
    """The dataset fits the flags: batch size, --num-classes (a check of the dataset's
    number of classes when given), an image not too long a sequence for --order."""
    n = len(data.train_labels)
    if config.batch_size > n:
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the {n} training examples; "
            f"use at most {n}"
        )
    if config.num_classes and config.num_classes != spec.num_classes:
        raise ConfigError(
            f"--num-classes {config.num_classes} but the dataset has {spec.num_classes} "
            f"classes; pass --num-classes {spec.num_classes}, or 0 to take the dataset's"
        )
    spec.check_order(config.order)


def check_memory(config: Config, model: Model, optimizer: optax.GradientTransformation,
                 spec: DataSpec, data: Arrays, dp: parallel.DataParallel) -> None:
    """:class:`memory.OutOfMemory` before anything is allocated or written when the state,
    a batch's activations and the dataset (on every device) would not fit."""
    devices = parallel.num_shards(dp.mesh)
    need = memory.estimate(config, model, optimizer, spec, devices=devices,
                           examples=len(data.train_labels) + len(data.test_labels),
                           test_examples=len(data.test_labels))
    memory.check_fits(need, devices=len(dp.mesh.local_devices))


@dataclass(frozen=True)
class SegmentFn:
    """One compiled call's work: ``(state, first step, count, metric sums so far) -> (state,
    the sums with each of its steps' added in turn, seconds spent compiling in this
    call)``; the sums stay on the device (None: from zero). ``program``: the
    compiled train step(s) it calls (``program.compiled`` after the first call: its text,
    ``as_text()``, is what ``rnnjax.hlo`` reads)."""

    run: Callable[[train.TrainState, int, int, Any], tuple[train.TrainState, Any, float]]
    program: runtime.CompileOnFirstCall
    zeros: Any  # the sums' starting point, laid out as the calls return them

    def __call__(self, state: train.TrainState, first: int, count: int, sums: Any = None
                 ) -> tuple[train.TrainState, Any, float]:
        return self.run(state, first, count, self.zeros if sums is None else sums)


def _compiled_train(
    fn: Callable, model: Model, optimizer: optax.GradientTransformation,
    dp: parallel.DataParallel, xla_flags: str = "",
) -> runtime.CompileOnFirstCall:
    """``train.train_step`` or ``train.train_steps`` jitted with the state donated and the
    results replicated over the mesh; compiled (and timed) on its first call, under
    ``xla_flags`` besides the process's (``runtime.compile_options``); each call finished
    before the next where several processes share the CPU backend
    (``parallel.calls_must_finish``)."""
    return runtime.CompileOnFirstCall(jax.jit(
        functools.partial(fn, model=model, optimizer=optimizer),
        donate_argnums=0, out_shardings=dp.replicated,
    ), xla_flags, wait=parallel.calls_must_finish())


def device_feed(
    config: Config, model: Model, optimizer: optax.GradientTransformation,
    dp: parallel.DataParallel, on_device: Arrays, xla_flags: str = "",
) -> SegmentFn:
    """Segments run by one compiled ``train.train_steps`` on the device-resident dataset
    (compiled under ``xla_flags`` besides the process's: the tuner's in-process flags).

    Batch indices are padded to a fixed ``[steps_per_call, B]`` with the count passed as
    data: one compiled function serves every segment length, no recompiles. The training
    images are made into the model's time-major sequences once, here (``Model.sequences``:
    the same bytes, [T, N, F]); the caller may drop its own ``on_device.train_images``.
    """
    chunk = min(config.steps_per_call, config.steps)
    labels = on_device.train_labels
    n_train = len(labels)
    steps = _compiled_train(train.train_steps, model, optimizer, dp, xla_flags)
    sequences = device_sequences(model, dp, on_device.train_images)

    def run(state: train.TrainState, first: int, count: int, sums: train.Metrics):
        idx = np.zeros((chunk, config.batch_size), np.int32)
        idx[:count] = batch_indices(n_train, config.batch_size, first, count,
                                    shuffle=config.shuffle, seed=config.seed)
        (state, sums), seconds = steps(
            state, sequences, labels,
            dp.shard_steps(idx), dp.replicate(np.int32(count)),  # every device: its rows
            sums,
        )
        return state, sums, seconds

    return SegmentFn(run, steps, dp.replicate(train.zero_metrics()))


def stream_feed(
    config: Config, model: Model, optimizer: optax.GradientTransformation,
    dp: parallel.DataParallel, data: Arrays, start: int, xla_flags: str = "",
) -> SegmentFn:
    """Segments run one compiled ``train.train_step`` per batch streamed from the host
    (compiled under ``xla_flags`` besides the process's, as :func:`device_feed`).

    The batches of steps ``start, start + 1, ...`` in order: the tf.data pipeline with
    ``--source tfds``, NumPy otherwise; each process reads only its rows of each batch.
    """
    rows = dp.rows(config.batch_size)
    if config.source == "tfds":
        batches = tfds_train_batches(config, len(data.train_labels), start_step=start,
                                     rows=rows)
    else:
        batches = host_batches(
            data.train_images, data.train_labels, config.batch_size, start,
            config.steps - start, shuffle=config.shuffle, seed=config.seed, rows=rows,
        )
    step = _compiled_train(train.train_step, model, optimizer, dp, xla_flags)
    next_step = start

    def run(state: train.TrainState, first: int, count: int, sums: train.Metrics):
        nonlocal next_step
        if first != next_step:  # the stream only goes forward, one batch per step
            raise ValueError(f"stream_feed: segment from step {first}, the stream is at "
                             f"step {next_step}; run segments in order")
        next_step += count
        compile_s = 0.0
        for _ in range(count):  # each step's metrics added to the sums in its program
            (state, sums), seconds = step(state, *dp.global_batch(next(batches),
                                                                  config.batch_size), sums)
            compile_s += seconds
        return state, sums, compile_s

    return SegmentFn(run, step, dp.replicate(train.zero_metrics()))


@dataclass
class RunFiles:
    """Where a run's records go: metric files and TensorBoard (process 0's workdir only)
    and checkpoints (every process, written together by orbax). Any may be None."""

    metrics: metrics_lib.MetricWriter | None = None
    tensorboard: metrics_lib.TensorBoardWriter | None = None
    checkpoints: checkpoint_lib.CheckpointWriter | None = None
    # The metric writers, opened at the run's first log, config.json written then too: the
    # records an earlier run left (one resumed, or one stopped before its first checkpoint
    # and started over) stay in the files until then, and a run stopped before it leaves
    # them as they were.
    opening: Callable[[], tuple[metrics_lib.MetricWriter,
                                metrics_lib.TensorBoardWriter | None]] | None = None

    @classmethod
    def open(
        cls, config: Config, workdir: Path | str | None,
        resume_from: checkpoint_lib.ResumePoint | None, writes: bool,
    ) -> tuple[RunFiles, list[dict[str, Any]]]:
        """The run's writers, and the evaluation history already logged when resuming.

        ``writes``: this process writes the workdir's files (process 0). A resumed run
        drops the records logged after the last regular evaluation before its checkpoint:
        their train sums were saved with the checkpoint, and this run logs them again.
        """
        if workdir is None:
            return cls(), []
        workdir = Path(workdir)
        checkpoints = functools.partial(checkpoint_lib.CheckpointWriter,
                                        checkpoint_lib.checkpoints_dir(workdir),
                                        config.keep_checkpoints)
        if resume_from is not None:  # checked by every process: a refusal is every one's
            # A run trained to its end (finished by this one, which trains nothing) keeps
            # its final evaluation, logged before its final checkpoint.
            logged = (config.steps - 1 if resume_from.step == config.steps
                      else last_regular_eval(config, resume_from.step))
            kept, truncate = metrics_lib.kept_metrics(workdir, logged)  # nothing written
        if not writes:  # the history all the same: a run finished here reads its end
            return cls(checkpoints=checkpoints()), (
                [] if resume_from is None else metrics_lib.history_from_records(kept))
        if resume_from is None:
            workdir.mkdir(parents=True, exist_ok=True)

            def starting() -> tuple[metrics_lib.MetricWriter,
                                    metrics_lib.TensorBoardWriter | None]:
                # Over the records of an earlier, identical run stopped before its first
                # checkpoint (checkpoint.check_fresh_workdir let it start over): the files
                # start again, config.json too, and TensorBoard drops that run's events.
                write_config(workdir, config)
                return (metrics_lib.MetricWriter(workdir),
                        metrics_lib.TensorBoardWriter.open(workdir, purge_step=0))

            return cls(checkpoints=checkpoints(), opening=starting), []

        def opening() -> tuple[metrics_lib.MetricWriter, metrics_lib.TensorBoardWriter | None]:
            write_config(workdir, config)
            truncate()
            return (metrics_lib.MetricWriter(workdir, append=True),
                    metrics_lib.TensorBoardWriter.open(workdir, purge_step=logged + 1))

        return (cls(checkpoints=checkpoints(), opening=opening),
                metrics_lib.history_from_records(kept))

    def log(self, record: dict[str, Any], trained: dict[str, float],
            test: dict[str, float]) -> None:
        """One evaluation's train and test metrics; ``record``: its step and wall time."""
        if self.opening is not None:
            self.metrics, self.tensorboard = self.opening()
            self.opening = None
        if self.metrics is not None:
            self.metrics.write({**record, "split": "train", **trained})
            self.metrics.write({**record, "split": "test", **test})
        if self.tensorboard is not None:
            self.tensorboard.write(record["step"], "train", trained)
            self.tensorboard.write(record["step"], "test", test)

    def close(self) -> None:
        """Close every writer, each whatever the others did (a full disk that stopped the
        TensorBoard writer fails its close too, and the checkpoints' async saves must still
        finish); then raise the first error, if any."""
        errors = []
        for writer in (self.metrics, self.tensorboard, self.checkpoints):
            if writer is not None:
                try:
                    writer.close()
                except Exception as e:  # raised below, after the others
                    errors.append(e)
        if errors:
            raise errors[0]


def write_config(workdir: Path, config: Config) -> None:
    """The run's ``config.json``."""
    atomic.write_text(workdir / "config.json", json.dumps(to_dict(config), indent=2) + "\n")


def diverged(reason: str, checkpoints: checkpoint_lib.CheckpointWriter | None) -> TrainingDiverged:
    """The error that stops a diverged run: what happened, what is kept, what to do."""
    kept = ""
    if checkpoints is not None:
        last = checkpoint_lib.latest_step(checkpoints.directory)
        kept = ("; no checkpoint was saved before it" if last is None else
                f"; the last good checkpoint, after {metrics_lib.steps_phrase(last)}, is kept "
                f"in {checkpoints.directory / str(last)}")
    where = ", into another --workdir" if checkpoints is not None else ""
    return TrainingDiverged(f"{reason}{kept}; train again with a lower --learning-rate or "
                            f"with --clip-norm{where}")


def check_finite(trained: dict[str, float], step: int, files: RunFiles) -> None:
    """Stop the run (:class:`TrainingDiverged`) when the logged train loss is not finite."""
    if not math.isfinite(trained["loss"]):
        raise diverged(f"training loss became {trained['loss']} by step {step} (the loss "
                       "logged at that step)", files.checkpoints)


def layout_note(meta: dict[str, Any], devices: int, processes: int) -> str:
    """The note a resume prints where its checkpoint (``meta``) trained on other devices
    than this run's ``devices`` in ``processes``: allowed (a run moved to another machine
    goes on), but the gradients' sums round apart; '' where the same or not recorded (the
    devices are recorded since 2026-12-05, the processes since that evening)."""
    trained_on, trained_in = meta.get("mesh_devices"), meta.get("mesh_processes")
    if trained_on is None or (trained_on, trained_in or processes) == (devices, processes):
        return ""
    if (trained_in or 1) == 1 and processes == 1:
        where, here, advice = "", "", f"--num-devices {trained_on}"
    elif trained_in is None:  # its layout not recorded: the devices in all
        where, here, advice = "", f" in {processes}", f"{trained_on} devices in all"
    else:
        where, here = f" in {trained_in} process(es)", f" in {processes}"
        advice = f"{trained_in} process(es) of --num-devices {trained_on // trained_in}"
    return (f"note: the checkpoint trained on {trained_on} devices{where}, this run on "
            f"{devices}{here}: the gradients' sums round differently from a run never "
            f"stopped ({advice} resumes bitwise)\n")


def _holding_workdir(run: Callable[..., RunResult]) -> Callable[..., RunResult]:
    """``run`` in a process set up for it (its XLA flags and CPUs, then ``jax.distributed``
    where the run has several processes: before anything touches JAX), its workdir held
    for it (``checkpoint.workdir_lock``, by process 0, which writes the records; a refusal
    there is every process's, :func:`rnnjax.parallel.agree`)."""
    @functools.wraps(run)
    def held(config: Config, workdir: Path | str | None = None, **kwargs: Any) -> RunResult:
        try:
            runtime.apply_process_settings(config.xla_flags, config.cpus)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        parallel.initialize(config)
        with contextlib.ExitStack() as stack:
            refusal = None
            try:  # jax.process_index(), not --process-id: 0 in every process under auto
                stack.enter_context(checkpoint_lib.workdir_lock(
                    workdir if jax.process_index() == 0 else None))
            except checkpoint_lib.CheckpointError as e:
                refusal = e
            parallel.agree(refusal)
            return run(config, workdir, **kwargs)

    return held


@_holding_workdir
def train_and_evaluate(
    config: Config,
    workdir: Path | str | None = None,
    *,
    out: TextIO | None = None,
    progress: bool | None = None,
    resume: bool = False,
    tuning: dict[str, Any] | None = None,
    load: Loader = load_dataset,
) -> RunResult:
    """Train ``config`` end to end, printing the seed's evaluation lines to ``out``
    (default: ``sys.stdout`` as it is when called).

    With ``workdir``, writes ``config.json``, ``metrics.jsonl``/``.csv``, TensorBoard
    event files, ``summary.json`` and ``learning_curves.png`` there, and checkpoints in
    ``workdir/checkpoints/`` (every ``checkpoint_every`` steps and at the end; the latest
    ``keep_checkpoints`` kept). A workdir that holds checkpoints is refused unless
    ``resume``: then training continues from the latest one and ends with the parameters
    and metrics of a run never stopped. Returns the final state, the evaluation history
    (of the whole run when resumed) and a summary; ``tuning`` (how ``rnnjax.tune`` chose
    the run's settings) goes into the summary; ``load`` reads the dataset
    (``data.sources.prefetch``'s loader: one already being read). ``config.xla_flags``
    and ``config.cpus`` must be set before JAX's backend starts in this process
    (``rnnjax.runtime.apply_process_settings``).
    """
    out = sys.stdout if out is None else out
    resume_from = checkpoint_lib.prepare(config, workdir, resume)  # writes nothing
    t_start = time.perf_counter()
    cache_dir = runtime.enable_compile_cache(config.compile_cache)
    dp = parallel.DataParallel.from_config(config)
    dataset = load(config)
    data, spec = dataset.arrays, dataset.spec
    check_data(config, data, spec)
    t_data = time.perf_counter() - t_start

    model = dp.model(make_model(config, spec))
    optimizer = make_optimizer(config, model.param_shapes())
    check_memory(config, model, optimizer, spec, data, dp)
    # The data's fingerprints: a resume's check and every checkpoint read them, once.
    fingerprints = functools.cache(lambda: checkpoint_lib.fingerprints(data))
    if resume_from is not None:
        saved = checkpoint_lib.data_spec(resume_from.meta, config)
        checkpoint_lib.check_data_spec(saved, spec, resume_from.step_dir)
        checkpoint_lib.check_same_data(resume_from.meta, fingerprints(), config,
                                       resume_from.step_dir)
    # The dataset replicated on every device (MNIST is small); each batch is split over
    # them, so every device trains on its rows and XLA all-reduces the gradients of the
    # global-batch mean loss. Put first: its images become float32 on the device while
    # the state below is traced and compiled (on XLA:CPU, while it runs too).
    on_device = dp.dataset(data)
    t_init = time.perf_counter()
    # Blocked on: an allocation that fails does so here, before any file is written.
    state = jax.block_until_ready(init_state(config, model, optimizer))
    init_s = time.perf_counter() - t_init
    state = dp.replicate(state)  # parameters and optimizer state on every device
    start, wall_offset = 0, 0.0
    if resume_from is not None:
        # The fresh state is the abstract target: the optimizer's NamedTuples come back.
        state = checkpoint_lib.restore(resume_from.step_dir, state, resume_from.meta)
        start, wall_offset = resume_from.step, resume_from.wall_s
        out.write(f"resuming from {resume_from.step_dir} after "
                  f"{metrics_lib.steps_phrase(start)}\n")
        note = layout_note(resume_from.meta, dp.mesh.size, jax.process_count())
        if note:
            out.write(note)
    # What the run's own cell, order and optimizer compute, with each checkpoint; on a
    # resume, compared with what the checkpoint's computed (after its restore, which names
    # parameters of another layout first).
    probed = probes.record(config, spec, model.param_shapes()) if resume_from is None else \
        probes.check(resume_from.meta, config, spec, model.param_shapes(), resume_from.step_dir)

    evaluate = jax.jit(
        functools.partial(train.evaluate_sequences, model=evaluation_model(config, model),
                          chunk=config.eval_batch_size, batch_sharding=dp.batch),
        out_shardings=dp.replicated,
    )
    # The test set as the model reads it, made once for every evaluation of the run.
    test_data = device_sequences(model, dp, on_device.test_images), on_device.test_labels
    evaluate, compile_s = runtime.compile_timed(evaluate, state.params, *test_data)
    if config.feed == "device":
        run_segment = device_feed(config, model, optimizer, dp, on_device)
    else:
        run_segment = stream_feed(config, model, optimizer, dp, data, start)
    del on_device  # its float32 images: the feed and test_data hold them as sequences
    finite = jax.jit(lambda tree: jnp.all(jnp.stack(
        [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)])))

    files, history = RunFiles.open(config, workdir, resume_from,
                                   writes=jax.process_index() == 0)
    if start == config.steps and (not history or history[-1]["step"] != start - 1):
        files.close()
        raise checkpoint_lib.CheckpointError(
            f"--resume: {resume_from.step_dir} has trained all "
            f"{metrics_lib.steps_phrase(config.steps)}, but "
            f"{Path(workdir) / 'metrics.jsonl'} lacks their final evaluation (step "
            f"{start - 1}), which the summary reads; put the run's metrics.jsonl back, or "
            "train into another --workdir")
    bar = metrics_lib.Progress(config.steps, enabled=progress)
    # Train metrics since the last evaluation (those of a resumed checkpoint included, laid
    # out as the calls return them: their program is compiled once), None after one.
    train_sums = None if resume_from is None or resume_from.train_sums is None \
        else dp.replicate(resume_from.train_sums)
    train_s = eval_s = checkpoint_s = 0.0
    t0 = None  # start of the training time not yet counted (compiles excluded)

    def save_checkpoint(step: int) -> float:
        """Save the state after this call (and the train sums not logged yet); seconds.

        A state that has diverged is never saved: the last good checkpoint stays the latest.
        """
        jax.block_until_ready(state)  # the training in flight is not checkpoint time
        t = time.perf_counter()
        if not bool(finite((state.params, train_sums))):
            raise diverged(f"loss or parameters became NaN or infinite by step {step}",
                           files.checkpoints)
        files.checkpoints.save(state, config, train_sums=train_sums,
                               wall_s=wall_offset + t - t_start,
                               data={**spec.to_json(), **fingerprints()},
                               mesh_devices=dp.mesh.size, mesh_processes=jax.process_count(),
                               probes=probed)
        return time.perf_counter() - t

    try:
        for first, count, evaluate_after in segments(config, start):
            if t0 is None:
                t0 = time.perf_counter()
            # Still on the device: summed asynchronously, read only at the log point.
            state, train_sums, seconds = run_segment(state, first, count, train_sums)
            compile_s += seconds
            t0 += seconds
            step = first + count - 1
            save_after = files.checkpoints is not None and (
                step + 1 == config.steps
                or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)
            )
            if not evaluate_after:
                if save_after:
                    seconds = save_checkpoint(step)
                    checkpoint_s += seconds
                    t0 += seconds
                continue
            jax.block_until_ready(state)
            train_s += time.perf_counter() - t0
            t0 = None
            t1 = time.perf_counter()
            test = metrics_lib.summarize(evaluate(state.params, *test_data))
            eval_s += time.perf_counter() - t1
            trained = metrics_lib.summarize(train_sums)
            if step % config.eval_every == 0:
                train_sums = None
            # else this is the run's last step, off the eval_every grid: its sums stay for
            # the checkpoint, so that a run resumed with more --steps logs them again at
            # the next regular evaluation, as a run never stopped would.
            check_finite(trained, step, files)
            bar.close()
            out.write(f"step {step:>5}  {metrics_lib.seed_line(test['loss'], test['accuracy'])}\n")
            out.flush()
            bar.update(step + 1)
            record = {"step": step, "wall_s": round(wall_offset + time.perf_counter() - t_start, 3)}
            history.append({**record, "train_loss": trained["loss"],
                            "train_accuracy": trained["accuracy"],
                            "test_loss": test["loss"], "test_accuracy": test["accuracy"]})
            files.log(record, trained, test)
            if save_after:
                checkpoint_s += save_checkpoint(step)
    except BaseException:
        with contextlib.suppress(Exception):  # the error in flight is the one to report
            files.close()
        raise
    finally:
        bar.close()
    files.close()

    wall_s = time.perf_counter() - t_start
    last = history[-1]
    summary = {
        "final_test_accuracy": last["test_accuracy"],
        "final_test_loss": last["test_loss"],
        "steps": config.steps,
        "wall_s": wall_s,  # this process's; the metrics files' count the parts resumed too
        "run_wall_s": wall_offset + wall_s,
        "data_s": t_data,
        "init_s": init_s,
        "compile_cache": cache_dir,
        "compile_s": compile_s,
        "train_s": train_s,
        "eval_s": eval_s,
        # None (JSON null) where this process trained nothing (a run finished here).
        "steps_per_s": (config.steps - start) / train_s if train_s else None,
        "checkpoint_s": checkpoint_s,
        "resumed_from": start,
        "tuning": {**(tuning or {"mode": "off"}),
                   "settings": {name: getattr(config, name) for name in TUNED}},
        "xla_flags_env": os.environ.get("XLA_FLAGS", ""),
        "huge_pages_on": process.huge_pages_on(),
        "cpus_used": process.cpu_count(),
        **runtime.device_info(),
        **dp.describe(),
        "versions": runtime.versions(),
    }
    out.write(format_summary(summary))
    out.flush()
    if workdir is not None and jax.process_index() == 0:
        workdir = Path(workdir)
        # A run that trained here writes both; one finished here, what it lacks.
        outputs = checkpoint_lib.FINAL_OUTPUTS if start < config.steps \
            else checkpoint_lib.unfinished_outputs(workdir, config.steps)
        # The curves first: a summary.json of the run's steps then vouches for them too.
        summary_json, curves_png = checkpoint_lib.FINAL_OUTPUTS
        if curves_png in outputs:
            from rnnjax import plots  # matplotlib: imported only when a workdir wants it

            plots.learning_curves(history, workdir / curves_png,
                                  title=f"{config.cell} {config.hidden_size}, {config.dataset}")
        if summary_json in outputs:
            atomic.write_text(workdir / summary_json, json.dumps(summary, indent=2) + "\n")
    return RunResult(state, history, summary)


def format_summary(s: dict[str, Any]) -> str:
    """The closing lines of a run."""
    versions = ", ".join(f"{k} {v}" for k, v in s["versions"].items())
    cache = f" (cache {s['compile_cache']})" if s.get("compile_cache") else ""
    tuning = s.get("tuning") or {}
    devices = s.get("mesh_devices", s["device_count"])  # the run's, of all the backend has
    devices = f"x{devices}" + (f" (of {s['device_count']})" if devices != s["device_count"] else "")
    rate = "no steps here" if s["steps_per_s"] is None else f"{s['steps_per_s']:.0f} steps/s"
    tuned = ""
    if tuning.get("mode") in ("measured", "cached", "resumed", "recorded"):
        from rnnjax.tune import describe

        # A resumed or recorded run's settings are its first run's: tuned, or not.
        label = "tuned" if tuning["mode"] in ("measured", "cached") else "settings"
        tuned = f"{label} ({tuning['mode']}): {describe(tuning['settings'])}\n"
    return (
        f"final test accuracy: {s['final_test_accuracy']:.4f} "
        f"(test cost {s['final_test_loss']:.4f}) "
        f"after {metrics_lib.steps_phrase(s['steps'])}\n"
        f"wall time {s['wall_s']:.2f} s: data {s['data_s']:.2f} s, init {s['init_s']:.2f} s, "
        f"compile {s['compile_s']:.2f} s{cache}, train {s['train_s']:.2f} s "
        f"({rate}), eval {s['eval_s']:.2f} s\n"
        f"device: {s['backend']} {s['device_kind']} {devices}; {versions}\n"
        f"{tuned}"
    )
