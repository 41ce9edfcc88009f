"""Checkpoints, resume, TensorBoard/curves, eval and predict, and the image conversion."""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import io
import json
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from rnnjax import cells, checkpoint, inference, train
from rnnjax.cli import main
from rnnjax.config import Config
from rnnjax.data import images
from rnnjax.data.spec import DataSpec
from rnnjax.loop import train_and_evaluate
from rnnjax.metrics import read_jsonl
from rnnjax.model import make_model
from rnnjax.optim import make_optimizer

# Reaches ~0.7 test accuracy in 300 steps (~0.4 s): enough for confident predictions.
CONFIG = Config(steps=300, eval_every=100, checkpoint_every=100, keep_checkpoints=2,
                hidden_size=32, batch_size=64, learning_rate=5e-3, eval_batch_size=5000)


class Crash(Exception):
    """Stands for a kill: raised by the output stream mid-run."""


class CrashingOut(io.StringIO):
    """An output stream that raises when the evaluation line of ``step`` is printed."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.line = f"step {step:>5}"

    def write(self, text: str) -> int:
        if text.startswith(self.line):
            raise Crash(text)
        return super().write(text)


def without_wall(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


def csv_rows(path: Path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run never stopped; one stopped at 200 steps, resumed to 300, killed before its
    end (after a line logged past its checkpoint), and resumed again."""
    root = tmp_path_factory.mktemp("runs")
    full = train_and_evaluate(CONFIG, root / "full", out=io.StringIO())
    stopped = root / "stopped"
    train_and_evaluate(CONFIG.replace(steps=200), stopped, out=io.StringIO())
    with pytest.raises(Crash):
        train_and_evaluate(CONFIG, stopped, out=CrashingOut(299), resume=True)
    crashed = read_jsonl(stopped / "metrics.jsonl")
    out = io.StringIO()
    resumed = train_and_evaluate(CONFIG, stopped, out=out, resume=True)
    return SimpleNamespace(full=full, resumed=resumed, crashed=crashed, out=out.getvalue(),
                           full_dir=root / "full", stopped_dir=stopped)


def test_resume_equals_the_run_never_stopped_bitwise(runs, bitwise_equal):
    # The whole state, step, parameters and optimizer state, byte for byte.
    assert jax.tree.leaves(runs.resumed.state.opt_state)
    bitwise_equal(runs.full.state, runs.resumed.state)
    assert int(runs.resumed.state.step) == 300
    assert without_wall(runs.resumed.history) == without_wall(runs.full.history)
    assert [h["step"] for h in runs.resumed.history] == [0, 100, 200, 299]
    assert (without_wall(read_jsonl(runs.stopped_dir / "metrics.jsonl"))
            == without_wall(read_jsonl(runs.full_dir / "metrics.jsonl")))
    assert csv_rows(runs.stopped_dir / "metrics.csv") == csv_rows(runs.full_dir / "metrics.csv")
    assert runs.out.startswith(f"resuming from {runs.stopped_dir / 'checkpoints' / '200'}")
    assert "note:" not in runs.out  # on the devices it trained on
    # The summary's wall time is this process's; its run_wall_s counts the parts before too,
    # as the metrics files' wall_s does.
    summary, last = runs.resumed.summary, read_jsonl(runs.stopped_dir / "metrics.jsonl")[-1]
    assert summary["run_wall_s"] >= last["wall_s"] and summary["run_wall_s"] > summary["wall_s"]
    assert runs.full.summary["run_wall_s"] == runs.full.summary["wall_s"]


def test_a_resume_on_other_devices_says_it_rounds_apart(tmp_path, worker_compile_cache):
    """Each checkpoint records the devices it trained on. A resume on another number (a
    run moved to another machine, or --num-devices left out: machine settings are never
    taken from a checkpoint) goes on, but its gradients' sums round apart from a run
    never stopped: it said nothing, and the records differed in their last digits."""
    config = Config(steps=8, eval_every=4, checkpoint_every=6, hidden_size=8,
                    compile_cache=worker_compile_cache)
    train_and_evaluate(config.replace(steps=6), tmp_path, out=io.StringIO())
    meta_file = tmp_path / "checkpoints" / "6" / "meta" / checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    assert meta["mesh_devices"] == 1  # (on as many, no note: the bitwise resume's test)
    meta_file.write_text(json.dumps({**meta, "mesh_devices": 8}))
    out = io.StringIO()
    train_and_evaluate(config, tmp_path, out=out, resume=True)
    assert ("note: the checkpoint trained on 8 devices, this run on 1: the gradients' sums "
            "round differently from a run never stopped (--num-devices 8 resumes "
            "bitwise)\n") in out.getvalue()


def test_the_resume_note_names_the_devices_and_processes_that_resume_bitwise():
    """With several processes the note's advice did not work (--num-devices is each
    process's: 2 x 2 devices resumed as advised, --num-devices 4, ran on 8), and a resume on
    as many devices in other processes (1 x 4 against 2 x 2), which rounds apart, said
    nothing."""
    from rnnjax.loop import layout_note

    sums = "the gradients' sums round differently from a run never stopped"
    assert layout_note({"mesh_devices": 8}, 1, 1) == (
        f"note: the checkpoint trained on 8 devices, this run on 1: {sums} (--num-devices 8 "
        "resumes bitwise)\n")
    assert layout_note({"mesh_devices": 4, "mesh_processes": 2}, 8, 2) == (
        f"note: the checkpoint trained on 4 devices in 2 process(es), this run on 8 in 2: "
        f"{sums} (2 process(es) of --num-devices 2 resumes bitwise)\n")
    assert "trained on 4 devices in 1 process(es), this run on 4 in 2" in layout_note(
        {"mesh_devices": 4, "mesh_processes": 1}, 4, 2)
    assert layout_note({"mesh_devices": 4, "mesh_processes": 2}, 4, 2) == ""
    # A checkpoint from before mesh_processes: its layout unknown, the devices in all.
    assert layout_note({"mesh_devices": 4}, 8, 2) == (
        f"note: the checkpoint trained on 4 devices, this run on 8 in 2: {sums} (4 devices in "
        "all resumes bitwise)\n")
    assert layout_note({"mesh_devices": 4}, 4, 1) == layout_note({}, 3, 1) == ""


def test_an_optimizer_holding_a_random_key_trains_saves_and_resumes_bitwise(
        tmp_path, worker_compile_cache):
    """optax's noisy_sgd keeps a typed PRNG key in its state: the memory estimate
    (``memory.tree_bytes``) raised a TypeError on its dtype, and the checkpoint's digest
    could not turn it into NumPy."""
    config = Config(optimizer="noisy_sgd", steps=12, eval_every=6, checkpoint_every=6,
                    hidden_size=8, compile_cache=worker_compile_cache)
    full = train_and_evaluate(config, tmp_path / "full", out=io.StringIO())
    train_and_evaluate(config.replace(steps=6), tmp_path / "part", out=io.StringIO())
    resumed = train_and_evaluate(config, tmp_path / "part", out=io.StringIO(), resume=True)
    keys = [leaf for leaf in jax.tree.leaves(resumed.state.opt_state)
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)]
    assert keys and checkpoint.digest(resumed.state) == checkpoint.digest(full.state)
    assert without_wall(resumed.history) == without_wall(full.history)


def test_a_second_run_in_a_workdir_in_use_is_refused(tmp_path, worker_compile_cache):
    """Two runs of one workdir at once (a scheduler restarting a job still running): the
    second's writer deleted the first's save in flight, or the first's retention the
    checkpoint the second was restoring, then called corrupt. The second is refused, the
    first's files untouched; a refused run in a new workdir leaves none behind."""
    config = Config(steps=6, eval_every=3, checkpoint_every=3, hidden_size=8,
                    compile_cache=worker_compile_cache)
    work = tmp_path / "run"
    train_and_evaluate(config, work, out=io.StringIO())
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    with checkpoint.workdir_lock(work), pytest.raises(checkpoint.CheckpointError, match=(
            rf"^{work} is in use by another rnnjax run \(it holds {work / '.rnnjax.lock'}"
            r"\); wait for that run to end, or choose another --workdir$")):
        train_and_evaluate(config.replace(steps=9), work, out=io.StringIO(), resume=True)
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before
    assert not (work / ".rnnjax.lock").exists()  # let go: removed
    train_and_evaluate(config.replace(steps=9), work, out=io.StringIO(), resume=True)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        train_and_evaluate(config, tmp_path / "new", out=io.StringIO(), resume=True)
    assert not (tmp_path / "new").exists()


def test_resuming_a_workdir_whose_run_has_no_checkpoint_yet_says_it_is_in_use(
        tmp_path, capsys):
    """A run still training, before its first checkpoint: --resume there said "no
    checkpoint ...; train without --resume to start the run", advice refused in turn as
    the workdir is in use. The refusal comes first, and the probe holds nothing."""
    from rnnjax.cli import main

    work = tmp_path / "run"
    with checkpoint.workdir_lock(work):
        assert main(["train", "--resume", "--workdir", str(work)]) == 2
        assert f"{work} is in use by another rnnjax run" in capsys.readouterr().err
        checkpoint.check_not_in_use(tmp_path / "elsewhere")  # no lock file: free
    checkpoint.check_not_in_use(work)
    assert main(["train", "--resume", "--workdir", str(work)]) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err


def test_where_a_runs_calls_are_cut_changes_no_metric(tmp_path, worker_compile_cache):
    """Each call adds its steps' train metrics to the sums so far, one step at a time: a run
    resumed with more --steps from its last checkpoint (off the --checkpoint-every grid, so
    that its calls are cut where the run never stopped cut none), and runs with another
    --steps-per-call or --checkpoint-every, log the same lines, bit for bit."""
    config = Config(steps=30, eval_every=5, hidden_size=8, compile_cache=worker_compile_cache)
    full = train_and_evaluate(config, tmp_path / "full", out=io.StringIO())
    train_and_evaluate(config.replace(steps=18), tmp_path / "resumed", out=io.StringIO())
    train_and_evaluate(config, tmp_path / "resumed", out=io.StringIO(), resume=True)
    assert (without_wall(read_jsonl(tmp_path / "resumed" / "metrics.jsonl"))
            == without_wall(read_jsonl(tmp_path / "full" / "metrics.jsonl")))
    # The evaluation's chunks do sum the test metrics in their own order.
    with pytest.raises(checkpoint.CheckpointError, match=r"--eval-batch-size 5000 differs "
                       r"from 10000 in .* \(it changes results\); resume with "
                       r"--eval-batch-size 10000"):
        train_and_evaluate(config.replace(steps=40, eval_batch_size=5000),
                           tmp_path / "resumed", out=io.StringIO(), resume=True)
    for i, other in enumerate((config.replace(steps_per_call=4),
                               config.replace(checkpoint_every=7), config.replace(feed="stream"))):
        history = train_and_evaluate(other, tmp_path / str(i), out=io.StringIO()).history
        assert without_wall(history) == without_wall(full.history), other


def test_resume_drops_lines_logged_after_its_checkpoint(runs):
    # The run stopped at 200 steps logged step 199 (its end); the first resume dropped that
    # line, logged step 200 after checkpoint 200 and was killed at step 299, before
    # checkpoint 300: the second resume drops step 200 and logs it again.
    assert [r["step"] for r in runs.crashed if r["split"] == "test"] == [0, 100, 200]
    assert checkpoint.list_steps(runs.stopped_dir / "checkpoints") == [200, 300]
    steps = [r["step"] for r in read_jsonl(runs.stopped_dir / "metrics.jsonl")]
    assert steps == [0, 0, 100, 100, 200, 200, 299, 299]  # train and test, none twice


def event_tags(path: str) -> list[tuple[str, int]]:
    """``(tag, step)`` of the scalars in a TensorBoard event file (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    data, i, out = Path(path).read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        if event.HasField("session_log"):
            out.append(("purge", event.step))
        out.extend((v.tag, event.step) for v in event.summary.value)
    return out


def test_run_writes_kept_checkpoints_events_and_curves(runs):
    work = runs.full_dir
    assert checkpoint.list_steps(work / "checkpoints") == [200, 300]  # keep_checkpoints=2
    meta = checkpoint.read_meta(work / "checkpoints" / "300")
    assert meta["config"] == json.loads((work / "config.json").read_text())
    (events,) = glob.glob(str(work / "events.out.tfevents.*"))
    tags = event_tags(events)
    assert [s for t, s in tags if t == "test/accuracy"] == [0, 100, 200, 299]
    assert {"train/loss", "train/accuracy", "test/loss"} <= {t for t, _ in tags}
    # The resumed run's events tell TensorBoard to drop the steps it logs again.
    last = sorted(glob.glob(str(runs.stopped_dir / "events.out.tfevents.*")))[-1]
    assert ("purge", 101) in event_tags(last)
    png = (work / "learning_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert Image.open(work / "learning_curves.png").size[0] >= 600


def made_up_state(config: Config, seed: int = 0) -> train.TrainState:
    """A state with the structure of ``config``'s and random values in every leaf (the
    step and the optimizer's counts too), built without compiling anything."""
    create = functools.partial(train.create_state, model=make_model(config),
                               optimizer=make_optimizer(config))
    shapes = jax.eval_shape(create, jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(s):
        if jnp.issubdtype(s.dtype, jnp.integer):
            return jnp.asarray(rng.integers(1, 1000, s.shape), s.dtype)
        return jnp.asarray(rng.standard_normal(s.shape), s.dtype)

    return jax.tree.map(fill, shapes)


def test_save_restore_round_trip(tmp_path, bitwise_equal):
    config = Config(hidden_size=4, cell="lstm", optimizer="keras_adam", schedule="cosine",
                    clip_norm=1.0)
    state = made_up_state(config)._replace(step=jnp.asarray(7, jnp.int32))
    # Bits that numbers hide: -0.0 and a NaN with a payload in every float leaf.
    nan = np.array(0x7FC01234, np.uint32).view(np.float32)

    def odd_bits(leaf):
        leaf = np.array(leaf)
        if leaf.dtype == np.float32 and leaf.size > 1:
            leaf.flat[:2] = -0.0, nan
        return jnp.asarray(leaf)

    state = jax.tree.map(odd_bits, state)
    with checkpoint.CheckpointWriter(tmp_path, keep=3) as writer:
        path = writer.save(state, config, train_sums={"loss_sum": np.float32(1.25),
                                                      "correct": np.int32(3),
                                                      "count": np.int32(8)})
    assert path == tmp_path / "7"
    restored = checkpoint.restore(path, made_up_state(config, seed=1))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert type(restored.opt_state[1][0]).__name__ == "KerasAdamState"
    bitwise_equal(state, restored)
    assert checkpoint.read_config(path) == config
    sums = checkpoint.ResumePoint(path, 7, checkpoint.read_meta(path)).train_sums
    assert sums["loss_sum"].dtype == np.float32 and sums["loss_sum"] == np.float32(1.25)
    assert sums["correct"].dtype == np.int32


def test_a_config_written_before_a_field_runs_as_it_ran(tmp_path):
    """A config without a field added since (a checkpoint's or config.json of an older
    rnnjax) takes the value that runs what it ran, not the new default: a native model's
    evaluations in XLA's form (eval_native False), so that its resumed run and `rnnjax
    eval` round as the run did. Written now, every field is there."""
    from rnnjax.config import from_dict, to_dict

    config = Config(backward="native")
    assert from_dict(to_dict(config)) == config and config.eval_native
    old = {k: v for k, v in to_dict(config).items() if k != "eval_native"}
    assert from_dict(old) == config.replace(eval_native=False)


def test_keeps_the_last_k_and_never_picks_an_incomplete_one(tmp_path):
    config = Config(hidden_size=4)
    state = made_up_state(config)
    directory = tmp_path / "checkpoints"
    with checkpoint.CheckpointWriter(directory, keep=2) as writer:
        for step in (5, 10, 15, 20):
            writer.save(state._replace(step=jnp.asarray(step, jnp.int32)), config)
    assert checkpoint.list_steps(directory) == [15, 20]
    # A save killed mid-write (orbax's temporary dir) and a step dir without the commit
    # file are never the latest.
    (directory / "25.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    (directory / "30" / "state").mkdir(parents=True)
    assert checkpoint.latest_step(directory) == 20
    assert checkpoint.resolve(tmp_path) == directory / "20"
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.resolve(directory / "30")
    # Which orbax's manager counts as a step: a run refuses it before anything is written
    # (kept 2, a save of 25 had deleted 20 for it, and a save of step 30 failed).
    for resume in (False, True):
        with pytest.raises(checkpoint.CheckpointError, match=(
                rf"^{directory / '30'} is a checkpoint whose save never finished \(it has no "
                rf"commit_success.txt\); delete it, or move it out of {directory}, then")):
            checkpoint.prepare(config, tmp_path, resume=resume)
    # The next writer clears the dead temporary directory (before its first save).
    shutil.rmtree(directory / "30")
    with checkpoint.CheckpointWriter(directory, keep=2) as writer:
        writer.save(state._replace(step=jnp.asarray(35, jnp.int32)), config)
    assert not (directory / "25.orbax-checkpoint-tmp-1234").exists()
    assert checkpoint.list_steps(directory) == [20, 35]


def test_a_part_of_a_checkpoint_names_its_step_directory(tmp_path):
    """orbax marks the state/ and meta/ items of a checkpoint finished as it marks the step:
    given one of them, rnnjax named it a corrupt checkpoint and advised deleting it, a part
    of a good one; it names the step directory to pass instead."""
    config = Config(hidden_size=4)
    with checkpoint.CheckpointWriter(tmp_path / "checkpoints", keep=1) as writer:
        path = writer.save(made_up_state(config), config)
    assert (path / "state" / checkpoint.COMMIT_FILE).exists() or \
        (path / "meta" / checkpoint.COMMIT_FILE).exists()  # what made it look like a step
    for item in ("state", "meta"):
        with pytest.raises(checkpoint.CheckpointError,
                           match=f"a part of the checkpoint {path}; pass its step directory"):
            checkpoint.resolve(path / item)
    assert checkpoint.resolve(path) == path == checkpoint.resolve(tmp_path)


def test_a_checkpoint_of_another_step_or_rnnjax_is_refused_as_such(tmp_path):
    """A step directory renamed resumed silently: the state of step 4 trained on the
    batches of steps 7 on. A checkpoint format or config field of another rnnjax version
    loaded, or was called corrupt with the advice to delete it (every checkpoint of its
    run alike: deleting them one by one lost the run)."""
    config = Config(hidden_size=4, steps=20)
    with checkpoint.CheckpointWriter(tmp_path / "checkpoints", keep=1) as writer:
        path = writer.save(made_up_state(config)._replace(step=jnp.asarray(4, jnp.int32)),
                           config)
    moved = path.rename(path.parent / "7")
    with pytest.raises(checkpoint.CheckpointError, match=(
            rf"^checkpoint {moved} holds step 4, not 7 \(a step directory renamed, or another's "
            rf"moved in\); rename it back to {path}, or move it out of {path.parent}$")):
        checkpoint.prepare(config, tmp_path, resume=True)
    moved.rename(path)
    assert checkpoint.prepare(config, tmp_path, resume=True).step == 4
    meta_file = path / "meta" / checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format": 2}))
    with pytest.raises(checkpoint.CheckpointError, match=(
            rf"^checkpoint {path} has checkpoint format 2, and this rnnjax \S+ reads format "
            r"1; use the rnnjax version that wrote it$")):
        checkpoint.prepare(config, tmp_path, resume=True)
    meta_file.write_text(json.dumps({**meta, "config": {**meta["config"], "new_field": 1}}))
    with pytest.raises(checkpoint.CheckpointError, match=(
            rf"^checkpoint {path} was written by another rnnjax version \(its config has "
            r"new_field, which this rnnjax \S+ does not know\); use the rnnjax version")):
        checkpoint.read_config(path)


def _diagonal(name, dtype=jnp.float32):
    """An IndRNN of one's own (h = relu(x W + d * h + b)), its diagonal named ``name``."""
    def cell(hidden):
        def init(key, input_size):
            return {"kernel": jax.random.normal(key, (input_size, hidden)) * 0.1,
                    name: jnp.full((hidden,), 0.5, dtype), "bias": jnp.zeros((hidden,))}

        def step(params, h, x):
            d = params[name].astype(jnp.float32)
            h = jax.nn.relu(x @ params["kernel"] + d * h + params["bias"])
            return h, h

        return cells.Cell(init=init, step=step, hidden_size=hidden,
                          initial_carry=lambda batch, dtype: jnp.zeros((batch, hidden), dtype))
    return cell


def test_a_cell_whose_code_changed_is_not_called_corrupt(tmp_path, monkeypatch, capsys):
    """A researcher's registered cell, a parameter renamed since the run: every checkpoint
    of the run was "corrupt or does not match its config ... delete this one", so that
    following the advice deleted them all. It names what differs and keeps them."""
    monkeypatch.setitem(cells.CELLS, "diagonal", _diagonal("u"))
    work = tmp_path / "run"
    assert main(["train", "--cell", "diagonal", "--hidden-size", "4", "--steps", "2",
                 "--eval-every", "2", "--checkpoint-every", "1", "--workdir", str(work),
                 "--compile-cache", "off"]) == 0
    capsys.readouterr()
    monkeypatch.setitem(cells.CELLS, "diagonal", _diagonal("diag"))
    assert main(["eval", str(work)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds the parameters of another model" in err
    assert "the model has ['rnn'][0]['diag']; the checkpoint has ['rnn'][0]['u']" in err
    assert "do not delete it" in err and "delete this one" not in err
    # A dtype changed: orbax would cast it, and the checksum call the checkpoint corrupt.
    monkeypatch.setitem(cells.CELLS, "diagonal", _diagonal("u", jnp.bfloat16))
    assert main(["train", "--resume", "--workdir", str(work), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the checkpoint's differ at ['rnn'][0]['u'] " \
        "(float32[4], not bfloat16[4])" in err and "do not delete it" in err
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["1", "2"]
    monkeypatch.setitem(cells.CELLS, "diagonal", _diagonal("u"))
    assert main(["eval", str(work)]) == 0


def test_a_states_digest_reads_every_bit_of_every_leaf():
    """``checkpoint.digest``, the SHA-256 a checkpoint's state is checked against: one
    element changed, one bit flipped, -0.0 for 0.0, another dtype or shape, a random key's
    bits, each gives another digest; the same values, the same digest."""
    state = made_up_state(Config(hidden_size=4))
    kernel = np.asarray(state.params["head"]["kernel"])
    with_kernel = lambda k: state._replace(params={**state.params,  # noqa: E731
                                                    "head": {**state.params["head"],
                                                             "kernel": jnp.asarray(k)}})
    same = checkpoint.digest(with_kernel(kernel.copy()))
    assert same == checkpoint.digest(state)
    changed = kernel.copy()
    changed[0, 0] += 1.0
    flipped = kernel.copy()
    flipped.view(np.uint32)[1, 2] ^= 1
    zeros, negative = np.zeros_like(kernel), np.zeros_like(kernel)
    negative[0, 0] = -0.0
    digests = {checkpoint.digest(with_kernel(k))
               for k in (changed, flipped, zeros, negative, kernel.astype(np.float16),
                         kernel.reshape(kernel.shape[::-1]))}
    assert len(digests) == 6 and same not in digests
    keys = [{"key": jax.random.key(seed)} for seed in (0, 1)]
    assert checkpoint.digest(keys[0]) != checkpoint.digest(keys[1])


def test_corrupt_checkpoints_give_a_clear_error(tmp_path, capsys):
    config = Config(hidden_size=4)
    state = made_up_state(config)
    with checkpoint.CheckpointWriter(tmp_path / "a", keep=1) as writer:
        path = writer.save(state, config)
    target = made_up_state(config, seed=1)
    broken = tmp_path / "data"
    shutil.copytree(path, broken)
    for f in (broken / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.raises(checkpoint.CheckpointError, match="is corrupt"):
        checkpoint.restore(broken, target)
    tampered = tmp_path / "sum"
    shutil.copytree(path, tampered)
    meta_file = tampered / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["state_sha256"] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="does not match the checksum"):
        checkpoint.restore(tampered, target)
    # Other values that decode as well as the saved ones (another state's files, this
    # checkpoint's sum): only the checksum can tell, where zeroed files fail to decode.
    with checkpoint.CheckpointWriter(tmp_path / "b", keep=1) as writer:
        other = writer.save(made_up_state(config, seed=2), config)
    swapped = tmp_path / "swapped"
    shutil.copytree(other, swapped)
    saved = json.loads((path / "meta" / "metadata").read_text())["state_sha256"]
    swapped_meta = json.loads((swapped / "meta" / "metadata").read_text())
    (swapped / "meta" / "metadata").write_text(json.dumps({**swapped_meta,
                                                           "state_sha256": saved}))
    with pytest.raises(checkpoint.CheckpointError, match="does not match the checksum"):
        checkpoint.restore(swapped, target)
    for missing in (None, ""):  # no checksum: refused, never loaded unverified
        if missing is None:
            del meta["state_sha256"]
        else:
            meta["state_sha256"] = missing
        meta_file.write_text(json.dumps(meta))
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.restore(tampered, target)
        assert str(info.value).startswith(f"checkpoint {tampered} has no SHA-256 of its state")
        assert "pass a checkpoint written by rnnjax train --workdir" in str(info.value)
    assert main(["eval", str(tampered)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rnnjax: error: checkpoint {tampered} has no SHA-256") and \
        err.count("\n") == 1
    meta_file.write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="meta/ cannot be read"):
        checkpoint.read_meta(tampered)


def test_eval_and_predict_of_a_run_still_training_read_its_newest_checkpoint(
        monkeypatch, tmp_path, capsys):
    """A run still training in the workdir saves a newer checkpoint and deletes the one
    being read (it keeps the latest --keep-checkpoints): given the workdir, eval and
    predict (inference.load) read the newest instead; given that step directory, the
    error says it was deleted, not that it is corrupt (nor to delete it)."""
    config = Config(hidden_size=4)
    work = tmp_path / "run"
    directory = checkpoint.checkpoints_dir(work)
    writer = checkpoint.CheckpointWriter(directory, keep=1)

    def save(step):
        writer.save(made_up_state(config)._replace(step=jnp.asarray(step, jnp.int32)), config)

    save(20)
    restore = checkpoint.restore
    racing = {}  # the step whose read the run's next save races, and that save's step

    def racing_restore(step_dir, target, meta=None):  # the run saves while the state loads
        if racing and Path(step_dir).name == str(racing["read"]):
            save(racing.pop("save"))
            racing.clear()
            assert not Path(step_dir).exists()  # the one being read is gone
        return restore(step_dir, target, meta)

    def race(read, then_saves):
        racing.update(read=read, save=then_saves)

    monkeypatch.setattr(checkpoint, "restore", racing_restore)
    try:
        race(20, 40)  # (each load compiles the initialisation: ~1.5 s; few of them)
        assert main(["eval", str(work)]) == 0
        out = capsys.readouterr().out
        assert f"checkpoint {directory / '40'}: " in out and "after 40 steps" in out, out
        assert (work / "confusion_matrix_step40.png").is_file()
        digit = np.zeros((28, 28), np.uint8)
        digit[5:23, 12:16] = 255
        Image.fromarray(digit).save(tmp_path / "one.png")
        race(40, 50)
        assert main(["predict", str(directory), str(tmp_path / "one.png")]) == 0
        assert "one.png" in capsys.readouterr().out
        race(50, 60)
        assert main(["eval", str(directory / "50")]) == 2
        err = capsys.readouterr().err
        assert err == (f"rnnjax: error: checkpoint {directory / '50'} was deleted while it "
                       "was read (a run training there keeps only its latest "
                       f"--keep-checkpoints); pass {work} for its latest checkpoint\n")
    finally:
        writer.close()


def test_resume_and_overwrite_are_checked_before_anything_is_written(runs, tmp_path):
    work = runs.full_dir
    before = {p: p.read_bytes() for p in work.iterdir() if p.is_file()}
    with pytest.raises(checkpoint.CheckpointError, match=r"already holds checkpoints.*--resume"):
        train_and_evaluate(CONFIG, work, out=io.StringIO())
    with pytest.raises(checkpoint.CheckpointError, match="--hidden-size 16 differs from 32"):
        train_and_evaluate(CONFIG.replace(hidden_size=16, steps=400), work, resume=True)
    with pytest.raises(checkpoint.CheckpointError, match="already trained 300 steps"):
        train_and_evaluate(CONFIG, work, resume=True)
    assert {p: p.read_bytes() for p in work.iterdir() if p.is_file()} == before
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        train_and_evaluate(CONFIG, tmp_path / "empty", resume=True)
    with pytest.raises(checkpoint.CheckpointError, match="needs --workdir"):
        train_and_evaluate(CONFIG, None)
    cosine = CONFIG.replace(schedule="cosine")
    with pytest.raises(checkpoint.CheckpointError, match=r"--steps 400 differs from 300.*decay"):
        checkpoint.check_resumable(cosine, cosine.replace(steps=400))
    assert {f.name for f in dataclasses.fields(Config)} >= checkpoint.RUN_SETTINGS
    checkpoint.check_resumable(CONFIG, CONFIG.replace(steps=400, steps_per_call=7,
                                                      keep_checkpoints=9))


@pytest.mark.parametrize("saved, given", [(0, 10), (10, 0)])
def test_num_classes_0_resumes_as_the_count_the_checkpoint_has(saved, given, tmp_path):
    """--num-classes 0 takes the dataset's count: a resume that names the count the
    checkpoint's model has (or 0 for a run that named it) was refused as a change; and so
    was the next resume, where that one stopped before its first checkpoint (its
    config.json then says ``given``, the checkpoint ``saved``)."""
    meta = {"data": DataSpec((28, 28, 1), 10).to_json()}
    checkpoint.check_resumable(CONFIG.replace(num_classes=saved),
                               CONFIG.replace(num_classes=given), "ckpt", meta)
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"--num-classes 5 differs from {saved} in ckpt"):
        checkpoint.check_resumable(CONFIG.replace(num_classes=saved),
                                   CONFIG.replace(num_classes=5), "ckpt", meta)
    for recorded in (given, 5):
        (tmp_path / "config.json").write_text(
            json.dumps(dataclasses.asdict(CONFIG.replace(num_classes=recorded))))
        if recorded == 5:
            with pytest.raises(checkpoint.CheckpointError, match=r"--num-classes 5 \(the "):
                checkpoint.check_records_match(CONFIG.replace(num_classes=saved), tmp_path,
                                               tmp_path / "ckpt", meta)
        else:
            checkpoint.check_records_match(CONFIG.replace(num_classes=saved), tmp_path,
                                           tmp_path / "ckpt", meta)


def test_a_run_stopped_before_its_first_checkpoint_is_not_overwritten_by_another(tmp_path):
    # Killed at its second evaluation, with its only checkpoint due at its end.
    config = CONFIG.replace(checkpoint_every=0)
    work = tmp_path / "stopped"
    with pytest.raises(Crash):
        train_and_evaluate(config, work, out=CrashingOut(100))
    assert not checkpoint.has_checkpoints(work)
    before = {p: p.read_bytes() for p in work.iterdir() if p.is_file()}
    assert read_jsonl(work / "metrics.jsonl")  # step 0's records: what must not be lost
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"another run.*--hidden-size 16 \(was 32\).*another --workdir.*"
                             r"delete config.json, metrics.jsonl, metrics.csv, events.out"):
        train_and_evaluate(config.replace(hidden_size=16), work, out=io.StringIO())
    # Fewer steps would drop records; more steps write the same ones and go on.
    with pytest.raises(checkpoint.CheckpointError, match=r"--steps 200 \(was 300\)"):
        checkpoint.prepare(config.replace(steps=200), work, resume=False)
    assert checkpoint.prepare(config.replace(steps=400), work, resume=False) is None
    assert {p: p.read_bytes() for p in work.iterdir() if p.is_file()} == before
    # The same run again (a run setting aside) rewrites the same records, and finishes.
    again = train_and_evaluate(config.replace(keep_checkpoints=1), work, out=io.StringIO())
    logged = [json.loads(line) for line in before[work / "metrics.jsonl"].splitlines()]
    assert without_wall(read_jsonl(work / "metrics.jsonl"))[:len(logged)] == without_wall(logged)
    assert [h["step"] for h in again.history] == [0, 100, 200, 299]

    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "metrics.csv").write_text("step\n")
    with pytest.raises(checkpoint.CheckpointError, match=r"holds metrics.csv.*no config.json"):
        checkpoint.prepare(CONFIG, orphan, resume=False)
    (orphan / "config.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match=r"config.json: unreadable.*delete"):
        checkpoint.prepare(CONFIG, orphan, resume=False)
    assert checkpoint.prepare(CONFIG, tmp_path / "new", resume=False) is None

    def saved(tmp, config):
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
        return tmp

    cosine = CONFIG.replace(schedule="cosine")
    with pytest.raises(checkpoint.CheckpointError, match=r"--steps 400 \(was 300\)"):
        checkpoint.prepare(cosine.replace(steps=400), saved(tmp_path / "cos", cosine), False)
    tf_stream = CONFIG.replace(shuffle=True, source="tfds", feed="stream")
    with pytest.raises(checkpoint.CheckpointError, match="differs in the batch order"):
        checkpoint.prepare(tf_stream.replace(feed="device"), saved(tmp_path / "tf", tf_stream),
                           False)



def test_a_run_started_over_and_stopped_before_its_first_log_loses_no_records(tmp_path):
    # The same run started again over one stopped before its first checkpoint: its files
    # stay as they were until it logs (its metrics were emptied as it compiled).
    config = CONFIG.replace(checkpoint_every=0)
    work = tmp_path / "stopped"
    with pytest.raises(Crash):
        train_and_evaluate(config, work, out=CrashingOut(200))
    before = {p: p.read_bytes() for p in work.iterdir() if p.is_file()}
    assert len(read_jsonl(work / "metrics.jsonl")) == 4  # steps 0 and 100, train and test
    with pytest.raises(Crash):
        train_and_evaluate(config, work, out=CrashingOut(0))
    assert {p: p.read_bytes() for p in work.iterdir() if p.is_file()} == before


def test_eval_prints_per_class_accuracy_and_writes_the_png(runs, tmp_path, capsys):
    out = tmp_path / "cm.png"
    assert main(["eval", str(runs.full_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "after 300 steps" in text
    assert "class  examples  correct  accuracy" in text
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(10))
    assert sum(int(r[1]) for r in rows) == 10000
    accuracy = text.split("test accuracy:")[1].split()[0]
    assert accuracy == f"{runs.full.history[-1]['test_accuracy']:.4f}"  # training's own digits
    assert f"confusion matrix: {out}" in text
    assert out.read_bytes().startswith(b"\x89PNG")


def test_a_damaged_orbax_metadata_file_resumes_without_a_word(tmp_path, caplog):
    """orbax's own _CHECKPOINT_METADATA, which rnnjax does not read, damaged: the resume
    goes on, as it did, but without orbax's absl ERROR line."""
    config = Config(steps=2, eval_every=2, hidden_size=4, batch_size=8, eval_batch_size=5000)
    train_and_evaluate(config, tmp_path, out=io.StringIO())
    (tmp_path / "checkpoints" / "2" / "_CHECKPOINT_METADATA").write_text('{"x": [1,')
    caplog.clear()
    resumed = train_and_evaluate(config.replace(steps=4), tmp_path, out=io.StringIO(),
                                 resume=True)
    assert int(resumed.state.step) == 4
    assert not [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_eval_reads_the_test_split_alone(runs, tmp_path, capsys):
    """An evaluation neither reads the train split nor needs it: a directory of the two
    t10k files alone (another set's test set) was refused for a missing
    train-images-idx3-ubyte, and every eval read and verified 47 MB it did not use."""
    from rnnjax.data.idx import FILES
    from rnnjax.data.sources import EMBEDDED_MNIST, load_dataset

    for stem in (FILES["test_images"], FILES["test_labels"]):
        shutil.copy(EMBEDDED_MNIST / f"{stem}.gz", tmp_path / f"{stem}.gz")
    assert main(["eval", str(runs.full_dir), "--dataset", str(tmp_path), "--out",
                 str(tmp_path / "cm.png")]) == 0
    text = capsys.readouterr().out
    assert "10000 test examples" in text
    accuracy = text.split("test accuracy:")[1].split()[0]
    assert accuracy == f"{runs.full.history[-1]['test_accuracy']:.4f}"
    data = load_dataset(CONFIG.replace(dataset=str(tmp_path)), splits=("test",)).arrays
    assert data.train_images.shape == (0, 28, 28) and data.train_images.dtype == np.uint8
    assert data.train_labels.shape == (0,) and data.train_labels.dtype == np.int32
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte"):
        load_dataset(CONFIG.replace(dataset=str(tmp_path)))  # training needs both


def test_predict_as_is_reads_the_datasets_own_images_unchanged(runs, mnist, tmp_path,
                                                                capsys):
    """--as-is: files of the model's own images (28x28 grey) read as they are, for data
    that are not digits; without it, a run on other data than MNIST gets a note."""
    loaded = inference.load(runs.full_dir)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(mnist.test_images[i]).save(paths[-1])
    p = inference.probabilities(loaded, mnist.test_images[:5])
    capsys.readouterr()
    assert main(["predict", str(runs.full_dir), "--as-is", *map(str, paths)]) == 0
    captured = capsys.readouterr()
    rows = [row.split() for row in captured.out.splitlines()[1:]]
    assert [float(v) for v in rows[0][2:]] == pytest.approx(p[0], abs=1e-4)
    assert [int(r[1]) for r in rows] == p.argmax(axis=1).tolist()
    assert "note" not in captured.err  # MNIST: no note either way
    assert main(["predict", str(runs.full_dir), *map(str, paths)]) == 0
    assert "note" not in capsys.readouterr().err
    other = tmp_path / "fashion_run"  # the same checkpoint, as if trained on other data
    shutil.copytree(runs.full_dir, other)
    step = checkpoint.latest_checkpoint(other)
    meta_file = step / "meta" / checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    meta["config"]["dataset"] = "/data/fashion"
    meta_file.write_text(json.dumps(meta))
    assert main(["predict", str(other), str(paths[0])]) == 0
    assert "note" not in capsys.readouterr().err  # MNIST's fingerprint: MNIST elsewhere
    meta["data"]["fingerprint"] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    assert main(["predict", str(other), str(paths[0])]) == 0
    err = capsys.readouterr().err
    assert err.startswith("rnnjax: note: each image is made an MNIST digit") and \
        "trained on /data/fashion: pass --as-is for images that are not digits" in err


def test_predict_reads_a_large_dark_on_light_colour_png(runs, mnist, tmp_path, capsys):
    loaded = inference.load(runs.full_dir)
    originals = mnist.test_images[:300]
    p = inference.probabilities(loaded, originals)
    # Confident examples, one per class where there is one.
    chosen = {}
    for i in np.flatnonzero(p.max(axis=1) > 0.9):
        chosen.setdefault(int(p[i].argmax()), int(i))
    assert len(chosen) >= 3, p.max(axis=1)
    paths, expected = [], []
    ink = np.array([20, 30, 120], np.float64)  # dark blue ink on white paper
    for cls, i in sorted(chosen.items()):
        big = np.asarray(Image.fromarray(originals[i]).resize((100, 100), Image.BILINEAR))
        alpha = big[..., None] / 255.0
        rgb = (255 * (1 - alpha) + ink * alpha).round().astype(np.uint8)
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(rgb, "RGB").save(path)
        paths.append(str(path))
        expected.append(cls)
    assert main(["predict", str(runs.full_dir / "checkpoints" / "300"), *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["image", "class", "p(0)"]
    predicted = [int(line.split()[1]) for line in lines[1:]]
    assert predicted == expected
    probs = np.array([[float(v) for v in line.split()[2:]] for line in lines[1:]])
    assert probs.shape == (len(paths), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=2e-3)


# The image conversion: pure NumPy.


def test_to_mnist_leaves_an_mnist_digit_as_it_is(mnist):
    for i in range(50):
        original = mnist.test_images[i]
        converted = images.to_mnist(original)
        assert converted.dtype == np.uint8 and converted.shape == (28, 28)
        assert np.abs(converted.astype(int) - original).mean() < 1.0


def test_to_mnist_of_a_large_inverted_colour_copy_off_centre(mnist):
    scores = []
    for i in range(50):
        original = mnist.test_images[i]
        big = np.asarray(Image.fromarray(255 - original).resize((84, 84), Image.BICUBIC))
        paper = np.full((150, 120), 255, np.uint8)
        paper[10:94, 30:114] = big  # dark on light, off centre, in a larger page
        rgb = np.stack([paper, paper, np.minimum(paper.astype(int) + 30, 255)], -1)
        converted = images.to_mnist(rgb.astype(np.uint8))
        assert converted.shape == (28, 28) and converted.dtype == np.uint8
        scores.append(np.corrcoef(converted.ravel(), original.ravel())[0, 1])
    assert np.mean(scores) > 0.9 and np.min(scores) > 0.6


def test_light_background_is_inverted_and_contrast_stretched():
    paper = np.full((40, 30), 200.0)
    paper[10:30, 12:16] = 60.0  # a grey stroke on light grey paper
    ink = images.stretch_contrast(images.ink_on_black(paper))
    assert ink[0, 0] == 0 and ink[20, 13] == 255
    dark = images.ink_on_black(255 - paper)
    assert dark[0, 0] == 55.0  # dark backgrounds are left as they are


def test_fit_to_box_keeps_the_aspect_ratio_and_centres_by_mass():
    bar = np.full((40, 10), 255.0)
    fitted = images.fit_to_box(bar)
    assert fitted.shape == (20, 5)
    np.testing.assert_allclose(fitted, 255.0)
    canvas = np.zeros((50, 50))
    canvas[5:15, 30:45] = 255.0  # off centre, wide
    result = images.to_mnist(canvas.astype(np.uint8))
    cy, cx = images.center_of_mass(result.astype(float))
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    top, bottom, left, right = images.ink_bbox(result.astype(float), 0)
    assert max(bottom - top, right - left) == 20


def test_grayscale_follows_pillow_and_alpha_is_paper():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), float)
    np.testing.assert_allclose(images.to_grayscale(rgb), pillow, atol=1.0)
    rgba = np.zeros((4, 4, 4), np.uint8)  # black, fully transparent
    np.testing.assert_allclose(images.to_grayscale(rgba), 255.0)
    np.testing.assert_allclose(images.to_grayscale(np.full((2, 2), 65535, np.uint16)), 255.0)


def test_a_photo_turned_by_its_exif_orientation_is_read_upright(mnist, tmp_path):
    """A camera stores a photo as its sensor saw it and says in EXIF how to turn it (tag
    274, Orientation): read_image applies it, as every viewer does. A digit stored turned a
    quarter with Orientation 6 (turn clockwise to view) or 8 (counter-clockwise) is the
    upright digit (PNG's eXIf chunk: lossless, equal pixels); without the turn it was read
    on its side (20 MNIST digits so read correlate with their upright selves at -0.06 to
    0.62), and no predict test turned one."""
    digit = 255 - mnist.test_images[0]  # dark on light, as photographed
    Image.fromarray(digit).save(tmp_path / "upright.png")
    for orientation, turn in ((6, Image.Transpose.ROTATE_90),
                              (8, Image.Transpose.ROTATE_270)):
        exif = Image.Exif()
        exif[274] = orientation
        path = tmp_path / f"orientation-{orientation}.png"
        Image.fromarray(digit).transpose(turn).save(path, exif=exif)
        assert Image.open(path).getexif()[274] == orientation  # written, read back
        np.testing.assert_array_equal(images.read_image(path), digit)
        np.testing.assert_array_equal(images.load_mnist_image(path),
                                      images.load_mnist_image(tmp_path / "upright.png"))


def test_16_bit_and_transparent_palette_files_are_read_as_their_8_bit_grey(mnist, tmp_path):
    """Two encodings of a dark digit on light paper read as the 8-bit grey file does: a
    16-bit grey PNG (Pillow's I;16, read as uint16 and scaled by 257: its 8-bit values
    times 257 are the 8-bit file's, ink 20000 on paper 60000 a clean digit; read as
    Pillow's RGB, every value over 255 was 255, and that file was blank), and a palette PNG
    whose background is a transparent black (paper: read as RGBA; as RGB, the background
    was as black as the ink and no digit was found)."""
    ink = mnist.test_images[0]
    gray = 255 - ink  # dark on light
    Image.fromarray(gray).save(tmp_path / "gray.png")
    expected = images.load_mnist_image(tmp_path / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode == "I;16"
    pixels = images.read_image(tmp_path / "16bit.png")
    assert pixels.dtype == np.uint16 and pixels.max() == 65535
    np.testing.assert_array_equal(images.load_mnist_image(tmp_path / "16bit.png"), expected)
    faint = np.where(ink > 127, 20000, 60000).astype(np.uint16)  # dark ink on light paper
    Image.fromarray(faint).save(tmp_path / "faint.png")
    np.testing.assert_array_equal(
        images.load_mnist_image(tmp_path / "faint.png"),
        images.to_mnist(np.where(ink > 127, 0, 255).astype(np.uint8)))
    # Palette: index 0 black and transparent (the background), index 1 black (the ink).
    palette = Image.fromarray((ink > 127).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0] * 2)
    palette.save(tmp_path / "palette.png", transparency=0)
    assert Image.open(tmp_path / "palette.png").mode == "P"
    pixels = images.read_image(tmp_path / "palette.png")
    assert pixels.shape == (28, 28, 4)
    np.testing.assert_array_equal(images.to_grayscale(pixels),
                                  np.where(ink > 127, 0.0, 255.0))  # the background paper
    np.testing.assert_array_equal(
        images.load_mnist_image(tmp_path / "palette.png"),
        images.to_mnist(np.where(ink > 127, 0, 255).astype(np.uint8)))


def test_as_is_reads_height_by_width_luma_for_grey_and_grey_in_every_channel(tmp_path):
    """load_as_is (predict --as-is) at a shape that is not square, (28, 32): a file 32 wide
    and 28 tall is read, its pixels as they are, and the file turned (28 wide, 32 tall) is
    refused in one line naming both sizes; a colour file read by a grey model is its luma
    (Pillow's L, not one of its channels), and a grey file read by a colour model is that
    grey in each of the 3 channels. Every --as-is test before used square images of the
    model's own kind."""
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (28, 32), dtype=np.uint8)  # 28 tall, 32 wide
    rgb = rng.integers(0, 256, (28, 32, 3), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    Image.fromarray(gray.T.copy()).save(tmp_path / "turned.png")
    np.testing.assert_array_equal(images.load_as_is(tmp_path / "gray.png", (28, 32, 1)), gray)
    np.testing.assert_array_equal(images.load_as_is(tmp_path / "rgb.png", (28, 32, 3)), rgb)
    with pytest.raises(images.ImageError) as refused:
        images.load_as_is(tmp_path / "turned.png", (28, 32, 1))
    assert str(refused.value) == (
        f"image {tmp_path / 'turned.png'}: 28x32 pixels; --as-is reads the model's own 32x28 "
        "images as they are: resize it to 32x28 first")
    luma = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), np.int64)
    read = images.load_as_is(tmp_path / "rgb.png", (28, 32, 1))
    assert read.shape == (28, 32) and read.dtype == np.uint8
    assert np.abs(read.astype(np.int64) - luma).max() <= 1  # rounding, as Pillow's
    assert np.abs(rgb[..., 0].astype(np.int64) - luma).max() > 100  # not the red channel
    coloured = images.load_as_is(tmp_path / "gray.png", (28, 32, 3))
    assert coloured.shape == (28, 32, 3) and coloured.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(coloured[..., channel], gray)


def test_resize_is_anti_aliased_and_exact_at_the_same_size():
    rng = np.random.default_rng(1)
    image = rng.random((12, 9))
    np.testing.assert_allclose(images.resize(image, (12, 9)), image, atol=1e-12)
    stripes = np.tile([0.0, 1.0], (8, 4))  # 1-pixel stripes average out when halved
    np.testing.assert_allclose(images.resize(stripes, (4, 4)), 0.5, atol=0.13)


def test_blank_or_unreadable_images_are_refused(tmp_path):
    with pytest.raises(images.ImageError, match="no ink found"):
        images.to_mnist(np.full((30, 30), 250, np.uint8))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(images.ImageError, match="not an image file"):
        images.read_image(tmp_path / "text.png")
    with pytest.raises(images.ImageError, match="no such file"):
        images.read_image(tmp_path / "missing.png")
    Image.fromarray(np.full((30, 30), 255, np.uint8)).save(tmp_path / "white.png")
    with pytest.raises(images.ImageError, match=r"white\.png: no ink found"):
        images.load_mnist_image(tmp_path / "white.png")


def test_a_resume_on_other_data_is_refused_and_on_the_same_data_moved_is_not(
        tmp_path, mnist, capsys):
    """--data-dir (like --source and --tfds-dir) may change on resume, for the same data
    moved: a set of the same name and shape in another root, other images, used to be
    trained on silently, its metrics appended to the run's."""
    from rnnjax.data.idx import FILES, write_idx

    for root, start in (("a", 0), ("b", 30000)):
        for key, stem in FILES.items():
            array = getattr(mnist, key)
            first = start if key.startswith("train") else start // 10
            (tmp_path / root / "myset").mkdir(parents=True, exist_ok=True)
            write_idx(tmp_path / root / "myset" / f"{stem}.gz", array[first:first + 600])
    work = tmp_path / "run"
    argv = ["train", "--no-tune", "--hidden-size", "8", "--eval-every", "10", "--dataset",
            "myset", "--workdir", str(work), "--compile-cache", "off"]
    assert main([*argv, "--steps", "10", "--data-dir", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in work.iterdir() if p.is_file()}
    assert main([*argv, "--steps", "20", "--data-dir", str(tmp_path / "b"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnjax: error: checkpoint ") and err.count("\n") == 1, err
    assert "was trained on other data than --dataset myset (--source idx) reads now" in err
    assert "pass the --dataset, --source, --data-dir or --tfds-dir of the data it was " \
        "trained with" in err
    assert {p: p.read_bytes() for p in work.iterdir() if p.is_file()} == before
    shutil.move(tmp_path / "a", tmp_path / "moved")  # the same data elsewhere: resumes
    assert main([*argv, "--steps", "20", "--data-dir", str(tmp_path / "moved"),
                 "--resume"]) == 0
    assert [r["step"] for r in read_jsonl(work / "metrics.jsonl")][-2:] == [19, 19]


def test_a_run_of_a_dataset_directory_moved_resumes_from_its_new_place(tmp_path, mnist,
                                                                       capsys):
    """A run of --dataset PATH whose directory moved could not go on: its old path was
    gone, and a new --dataset was refused as a change of results. The fingerprint of the
    data decides, as for --data-dir; another set at the new path is refused."""
    from rnnjax.data.idx import FILES, write_idx

    for root, start in (("a", 0), ("other", 30000), ("edited", 0)):
        (tmp_path / root).mkdir()
        for key, stem in FILES.items():
            first = start if key.startswith("train") else start // 10
            array = getattr(mnist, key)[first:first + 600].copy()
            if root == "edited" and key == "train_images":
                array[1:4] = 255 - array[1:4]  # three images, none a 64th: a copy edited
            write_idx(tmp_path / root / f"{stem}.gz", array)
    work = tmp_path / "run"
    argv = ["train", "--no-tune", "--hidden-size", "8", "--eval-every", "10", "--workdir",
            str(work), "--compile-cache", "off"]
    assert main([*argv, "--steps", "10", "--dataset", str(tmp_path / "a")]) == 0
    shutil.move(tmp_path / "a", tmp_path / "moved")
    capsys.readouterr()
    gone = f"the checkpoint's dataset {tmp_path / 'a'} is gone (no such directory); if it " \
           "moved, pass its new place: rnnjax "  # not "--dataset X", a flag never given
    for command, fix in (([*argv, "--steps", "20", "--resume"],
                          f"train --workdir {work} --resume --dataset NEW_PLACE"),
                         (["eval", str(work)], f"eval {work} --dataset NEW_PLACE")):
        assert main(command) == 2
        assert capsys.readouterr().err == f"rnnjax: error: {gone}{fix}\n"
    for other in ("other", "edited"):
        assert main([*argv, "--steps", "20", "--dataset", str(tmp_path / other),
                     "--resume"]) == 2
        assert "was trained on other data than --dataset" in capsys.readouterr().err
    assert main([*argv, "--steps", "20", "--dataset", str(tmp_path / "moved"),
                 "--resume"]) == 0
    assert json.loads((work / "config.json").read_text())["dataset"] == str(tmp_path / "moved")
    # config.json names the new place, the latest checkpoint the old (a resume stopped
    # before its first checkpoint): one run, resumed again
    assert checkpoint.list_steps(work / "checkpoints") == [10, 20]
    shutil.rmtree(work / "checkpoints" / "20")
    assert main([*argv, "--steps", "30", "--dataset", str(tmp_path / "moved"),
                 "--resume"]) == 0
    assert [r["step"] for r in read_jsonl(work / "metrics.jsonl")][-1] == 29


def test_a_run_stopped_after_its_final_checkpoint_is_finished_by_resume(tmp_path):
    """A run killed (or out of disk) between its final checkpoint and summary.json /
    learning_curves.png could never be finished: --resume said to pass a larger --steps,
    which a decaying schedule then refused. A resume at the final step writes what is
    missing from the records, training nothing; a finished run is refused, naming why."""
    config = Config(steps=12, eval_every=5, checkpoint_every=5, hidden_size=4, batch_size=8,
                    optimizer="sgd", schedule="cosine", learning_rate=0.1)
    work = tmp_path / "run"
    done = train_and_evaluate(config, work, out=io.StringIO())
    records = {name: (work / name).read_bytes() for name in ("metrics.jsonl", "metrics.csv")}
    summary = json.loads((work / "summary.json").read_text())
    for lost in (["summary.json", "learning_curves.png"], ["learning_curves.png"]):
        kept = {name: (work / name).read_bytes() for name in checkpoint.FINAL_OUTPUTS
                if name not in lost}
        for name in lost:
            (work / name).unlink()
        assert checkpoint.unfinished_outputs(work, config.steps) == lost
        finished = train_and_evaluate(config, work, out=io.StringIO(), resume=True)
        assert finished.summary["resumed_from"] == 12 and finished.history == done.history
        assert finished.summary["steps_per_s"] is None  # JSON null: it trained nothing
        assert "NaN" not in (work / "summary.json").read_text()
        assert json.loads((work / "summary.json").read_text())["final_test_loss"] == \
            summary["final_test_loss"]
        assert Image.open(work / "learning_curves.png").format == "PNG"
        for name, data in {**records, **kept}.items():
            assert (work / name).read_bytes() == data, name  # nothing rewritten
        assert checkpoint.unfinished_outputs(work, config.steps) == []
    with pytest.raises(checkpoint.CheckpointError, match=(
            r"has already trained 12 steps of --steps 12, the whole run \(--schedule cosine "
            r"decays over --steps, so it cannot train on\); its records are complete")):
        train_and_evaluate(config, work, out=io.StringIO(), resume=True)
    # A summary of a shorter run (a constant rate, trained on since) is not this run's.
    (work / "summary.json").write_text(json.dumps({**summary, "steps": 10}))
    assert checkpoint.unfinished_outputs(work, 12) == list(checkpoint.FINAL_OUTPUTS)
    # Its final evaluation lost, the summary cannot be written: refused, nothing written.
    (work / "summary.json").unlink()
    (work / "metrics.jsonl").write_bytes(b"".join(
        line + b"\n" for line in records["metrics.jsonl"].splitlines()[:-2]))
    with pytest.raises(checkpoint.CheckpointError, match=(
            rf"has trained all 12 steps, but {work / 'metrics.jsonl'} lacks their final "
            r"evaluation \(step 11\)")):
        train_and_evaluate(config, work, out=io.StringIO(), resume=True)
    assert not (work / "summary.json").exists()


def test_a_retention_delete_cut_short_resumes_and_goes_at_the_next_save(tmp_path):
    """orbax deletes the oldest step (keeping the latest N) from its commit file on: a kill
    in between left a step directory without one, older than the latest, and every run
    after was refused as if a save had never finished, until it was deleted by hand."""
    config = Config(hidden_size=4, steps=40)
    state = made_up_state(config)
    directory = tmp_path / "checkpoints"
    with checkpoint.CheckpointWriter(directory, keep=2) as writer:
        for step in (10, 20):
            writer.save(state._replace(step=jnp.asarray(step, jnp.int32)), config)
    (directory / "10" / checkpoint.COMMIT_FILE).unlink()  # the delete, cut short
    assert checkpoint.prepare(config, tmp_path, resume=True).step == 20
    # One between finished ones is no deletion of the oldest: orbax, keeping 3, would
    # delete finished 5 for it. Refused, as a save that never finished.
    (directory / "10").rename(directory / "15")
    shutil.copytree(directory / "20", directory / "5")
    with pytest.raises(checkpoint.CheckpointError, match="15 is a checkpoint whose save never"):
        checkpoint.prepare(config, tmp_path, resume=True)
    shutil.rmtree(directory / "5")
    (directory / "15").rename(directory / "10")
    with pytest.raises(checkpoint.CheckpointError, match="already holds checkpoints"):
        checkpoint.prepare(config, tmp_path, resume=False)
    with checkpoint.CheckpointWriter(directory, keep=2) as writer:
        writer.save(state._replace(step=jnp.asarray(30, jnp.int32)), config)
    assert sorted(p.name for p in directory.iterdir()) == ["20", "30"]


def test_a_step_directory_named_with_leading_zeros_is_named_in_the_error(tmp_path):
    """``checkpoints/06`` counted as step 6, and the error named ``checkpoints/6``, which
    is not there."""
    config = Config(hidden_size=4, steps=20)
    with checkpoint.CheckpointWriter(tmp_path / "checkpoints", keep=1) as writer:
        path = writer.save(made_up_state(config)._replace(step=jnp.asarray(6, jnp.int32)),
                           config)
    padded = path.rename(path.parent / "06")
    for call in (lambda: checkpoint.prepare(config, tmp_path, resume=True),
                 lambda: checkpoint.resolve(tmp_path)):
        with pytest.raises(checkpoint.CheckpointError, match=(
                rf"^{padded} is not named as a step directory is \(its step, without leading "
                rf"zeros\); rename it to {path}, or move it out of {path.parent}$")):
            call()
    padded.rename(path)
    assert checkpoint.resolve(tmp_path) == path
    # Elsewhere (a workdir's own folder, a folder of runs) such a name is no step.
    (tmp_path / "007").mkdir()
    assert checkpoint.resolve(tmp_path) == path
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
        checkpoint.resolve(tmp_path / "007")


def test_a_checkpoints_train_sums_are_checked_before_they_are_used(tmp_path):
    """The train sums in meta/ went into the compiled step unchecked: another dtype, a key
    missing or an array was a JAX traceback after "resuming from", and digits changed
    logged a wrong train loss silently. Each is the one-line corrupt checkpoint now."""
    config = Config(hidden_size=4, steps=20)
    sums = {"loss_sum": np.float32(19.52), "correct": np.int32(3), "count": np.int32(16)}
    with checkpoint.CheckpointWriter(tmp_path / "checkpoints", keep=1) as writer:
        path = writer.save(made_up_state(config), config, train_sums=sums)
    meta_file = path / "meta" / checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    assert checkpoint.read_meta(path)["train_sums"] == meta["train_sums"]

    def edited(edit):
        changed = json.loads(json.dumps(meta))
        edit(changed["train_sums"])
        return changed

    cases = {
        "not of dtype float32": lambda s: s["loss_sum"].update(dtype="float16"),
        "are not loss_sum, correct, count": lambda s: s.pop("correct"),
        "count is not a number of dtype int32": lambda s: s["count"].update(value=[8, 8]),
        "correct is not a number of dtype int32": lambda s: s["correct"].update(value=True),
        "out of bounds|too large|overflow": lambda s: s["count"].update(value=2**40),
        "do not match the checksum saved with them": lambda s: s["loss_sum"].update(
            value=99.0),
    }
    for reason, edit in cases.items():
        meta_file.write_text(json.dumps(edited(edit)))
        with pytest.raises(checkpoint.CheckpointError, match=(
                rf"^checkpoint {path} is corrupt: its meta/ train sums.*({reason})")):
            checkpoint.read_meta(path)
    older = dict(meta)  # a checkpoint written before the checksum: its sums still checked
    del older["train_sums_sha256"]
    meta_file.write_text(json.dumps(older))
    assert checkpoint.read_meta(path)["train_sums"] == meta["train_sums"]
