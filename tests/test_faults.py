"""Training faults with real processes, really killed: nothing is lost, nothing bad loads."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from rnnjax import checkpoint as checkpoint_lib
from rnnjax.config import Config
from rnnjax.model import make_model
from rnnjax.optim import make_optimizer
from rnnjax.train import create_state

RUN = ["--hidden-size", "16", "--eval-every", "200", "--steps-per-call", "50",
       "--checkpoint-every", "100", "--compile-cache", "off"]


def rnnjax(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnnjax", *args], capture_output=True,
                          text=True, timeout=600, **kwargs)


def final_state(workdir: Path):
    """The whole train state (step, parameters, optimizer state) of the latest checkpoint."""
    directory = checkpoint_lib.checkpoints_dir(workdir)
    step_dir = directory / str(checkpoint_lib.latest_step(directory))
    config = checkpoint_lib.read_config(step_dir)
    model, optimizer = make_model(config), make_optimizer(config)
    target = create_state(jax.random.key(0), model, optimizer)
    return checkpoint_lib.restore(step_dir, target)


def records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in lines]


@pytest.mark.slow
def test_kill_9_during_training_then_resume_loses_nothing(tmp_path, bitwise_equal):
    steps = "2001"
    whole = tmp_path / "whole"
    assert rnnjax("train", "--steps", steps, "--workdir", str(whole), *RUN).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rnnjax", "train", "--steps", steps,
                             "--workdir", str(killed), *RUN],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "300"
    deadline = time.monotonic() + 300
    while not target.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps_saved = checkpoint_lib.list_steps(killed / "checkpoints")
    assert steps_saved and max(steps_saved) < int(steps), "the run ended before the kill"

    resumed = rnnjax("train", "--resume", "--workdir", str(killed), "--steps", steps, *RUN)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    bitwise_equal(final_state(whole), final_state(killed))
    assert records(whole) == records(killed)


def test_checkpoint_write_killed_midway_never_loads_as_valid(tmp_path):
    """A process SIGKILLs itself inside orbax's save, after the files, before the commit."""
    script = textwrap.dedent(f"""
        import os, signal, jax
        import orbax.checkpoint as ocp
        from rnnjax import checkpoint as ck
        from rnnjax.config import Config
        from rnnjax.model import make_model
        from rnnjax.optim import make_optimizer
        from rnnjax.train import create_state

        config = Config(hidden_size=8)
        state = create_state(jax.random.key(0), make_model(config), make_optimizer(config))
        writer = ck.CheckpointWriter({str(tmp_path / "checkpoints")!r}, 3)
        writer.save(state._replace(step=jax.numpy.asarray(10, "int32")), config)
        writer.close()
        original = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = die
        writer = ck.CheckpointWriter({str(tmp_path / "checkpoints")!r}, 3)
        writer.save(state._replace(step=jax.numpy.asarray(20, "int32")), config)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    directory = tmp_path / "checkpoints"
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith("20")]
    assert leftovers, "the kill happened before anything of step 20 was written"
    assert checkpoint_lib.list_steps(directory) == [10]
    config = Config(hidden_size=8)
    target = create_state(jax.random.key(1), make_model(config), make_optimizer(config))
    restored = checkpoint_lib.restore(directory / "10", target)
    assert int(restored.step) == 10


def test_corrupt_latest_checkpoint_is_a_clear_error_and_older_ones_load(tmp_path, capsys,
                                                                        worker_compile_cache):
    work = tmp_path / "run"
    args = ["--steps", "30", "--eval-every", "10", "--checkpoint-every", "10",
            "--hidden-size", "8", "--compile-cache", worker_compile_cache]
    assert rnnjax("train", "--workdir", str(work), *args).returncode == 0
    directory = checkpoint_lib.checkpoints_dir(work)
    assert checkpoint_lib.list_steps(directory) == [10, 20, 30]
    for path in sorted((directory / "30" / "state").rglob("*")):
        if path.is_file() and path.stat().st_size > 64:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
    broken = rnnjax("eval", str(directory / "30"))
    assert broken.returncode == 2
    assert broken.stderr.startswith("rnnjax: error: ") and broken.stderr.count("\n") == 1
    assert f"rnnjax: error: checkpoint {directory / '30'} is corrupt" in broken.stderr
    assert f"pass another step directory of {directory}, or delete this one" in broken.stderr
    from rnnjax.cli import main

    capsys.readouterr()
    assert main(["train", "--resume", "--workdir", str(work), "--steps", "40",
                 "--compile-cache", worker_compile_cache]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rnnjax: error: checkpoint {directory / '30'} is corrupt")
    assert err.count("\n") == 1
    older = rnnjax("eval", str(directory / "20"))
    assert older.returncode == 0, older.stderr
    assert "accuracy" in older.stdout


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    work = tmp_path / "run"
    # Plain SGD at 1e37 overflows the logits to inf within a few steps.
    proc = rnnjax("train", "--workdir", str(work), "--steps", "400", "--eval-every", "100",
                  "--checkpoint-every", "1", "--steps-per-call", "1", "--hidden-size", "8",
                  "--optimizer", "sgd", "--learning-rate", "1e37", "--compile-cache", "off")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("rnnjax: error: ") and proc.stderr.count("\n") == 1
    assert "NaN or infinite by step " in proc.stderr
    directory = checkpoint_lib.checkpoints_dir(work)
    kept = checkpoint_lib.list_steps(directory)
    assert kept, "the run diverged before its first checkpoint"
    assert (f"the last good checkpoint, after {kept[-1]} steps, is kept in "
            f"{directory / str(kept[-1])}") in proc.stderr
    assert proc.stderr.rstrip().endswith("with --clip-norm, into another --workdir")
    config = Config(hidden_size=8, optimizer="sgd", learning_rate=1e37)
    target = create_state(jax.random.key(0), make_model(config), make_optimizer(config))
    for step in kept:
        state = checkpoint_lib.restore(directory / str(step), target)
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params)), step


def test_divergence_before_any_checkpoint_says_so(tmp_path, worker_compile_cache):
    import io

    from rnnjax.loop import TrainingDiverged, train_and_evaluate

    config = Config(steps=30, eval_every=10, hidden_size=8, optimizer="sgd",
                    learning_rate=1e37, compile_cache=worker_compile_cache)
    with pytest.raises(TrainingDiverged, match=r"by step 10 .*; no checkpoint was saved "
                                               r"before it; .*into another --workdir$"):
        train_and_evaluate(config, tmp_path / "run", out=io.StringIO())
    assert not checkpoint_lib.has_checkpoints(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"--clip-norm$"):  # no workdir to name
        train_and_evaluate(config, out=io.StringIO())


def test_resume_survives_a_metrics_line_cut_short_by_a_kill(tmp_path):
    from rnnjax import metrics

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "split": "test", "loss": 2.3, "accuracy": 0.1, "wall_s": 1.0}\n'
        '{"step": 10, "split": "test", "loss": 1.0, "accuracy": 0.6, "wall_s": 2.0}\n'
        '{"step": 20, "split": "te'
    )
    (tmp_path / "metrics.csv").write_text(
        "step,split,loss,accuracy,wall_s\n0,test,2.3,0.1,1.0\n10,test,1.0,0.6,2.0\n20,te"
    )
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [0, 10]
    kept, truncate = metrics.kept_metrics(tmp_path, 10)
    truncate()
    assert [r["step"] for r in kept] == [0, 10]
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [0, 10]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "step,split,loss,accuracy,wall_s", "0,test,2.3,0.1,1.0", "10,test,1.0,0.6,2.0"]


JSONL = ('{"step": 0, "split": "test", "loss": 2.3, "accuracy": 0.1, "wall_s": 1.0}\n'
         '{"step": 10, "split": "test", "loss": 1.0, "accuracy": 0.6, "wall_s": 2.0}\n'
         '{"step": 20, "split": "test", "loss": 0.9, "accuracy": 0.7, "wall_s": 3.0}\n')
CSV = "step,split,loss,accuracy,wall_s\r\n0,test,2.3,0.1,1.0\r\n10,test,1.0,0.6,2.0\r\n"


@pytest.mark.parametrize(("name", "text", "line"), [
    ("metrics.jsonl", JSONL.replace('"step": 10, "split"', '"step": 10 "split"'), 2),
    ("metrics.jsonl", JSONL.replace('"step": 10', '"step": "10"'), 2),
    ("metrics.jsonl", JSONL.replace("\n", "\n\n", 1), 2),  # an empty line
    ("metrics.jsonl", JSONL[:-30] + "\n", 3),  # a cut line that a newline ends: not a kill
    ("metrics.csv", CSV.replace("0,test,2.3", "0,test2.3"), 2),
    ("metrics.csv", CSV.replace("10,test", "ten,test"), 3),
], ids=["jsonl_not_json", "jsonl_step_not_int", "jsonl_empty_line", "jsonl_cut_then_newline",
        "csv_short_row", "csv_step_not_int"])
def test_a_damaged_metrics_line_not_cut_short_by_a_kill_is_an_error_naming_it(
        tmp_path, name, text, line):
    """Only a last line without its newline (a write cut short) may be dropped; any other
    line that is not a record stops the resume, naming the file and the line, and neither
    file is rewritten."""
    from rnnjax import metrics

    (tmp_path / "metrics.jsonl").write_text(JSONL)
    (tmp_path / "metrics.csv").write_bytes(CSV.encode())
    (tmp_path / name).write_bytes(text.encode())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(metrics.MetricsFileError) as info:
        metrics.kept_metrics(tmp_path, 10)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / name}: line {line} is not a metrics record")
    assert f"repair or delete line {line}" in message and "\n" not in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    if name == "metrics.jsonl":
        with pytest.raises(metrics.MetricsFileError, match=f"line {line} "):
            metrics.read_jsonl(tmp_path / name)


def test_resume_over_a_damaged_metrics_line_is_one_line_naming_it(tmp_path, capsys,
                                                                  worker_compile_cache):
    from rnnjax.cli import main

    work = tmp_path / "run"
    args = ["--steps", "20", "--eval-every", "5", "--checkpoint-every", "10",
            "--hidden-size", "8", "--compile-cache", worker_compile_cache, "--workdir",
            str(work)]
    assert main(["train", *args]) == 0
    lines = (work / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"step"', '"st')
    (work / "metrics.jsonl").write_text("".join(lines))
    capsys.readouterr()
    assert main(["train", "--resume", *args[2:], "--steps", "30"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rnnjax: error: {work / 'metrics.jsonl'}: line 3 is not a "
                          "metrics record") and err.count("\n") == 1
    assert (work / "metrics.jsonl").read_text() == "".join(lines)
    # Nothing written before the error: the workdir's files as they were.
    assert json.loads((work / "config.json").read_text())["steps"] == 20


def test_undecodable_bytes_in_a_metrics_file_are_one_line_naming_it(tmp_path):
    """Bytes that are not text (a damaged disk, another program's file) stop the resume
    naming the file, not a traceback; neither file is rewritten."""
    from rnnjax import metrics

    (tmp_path / "metrics.jsonl").write_text(JSONL)
    (tmp_path / "metrics.csv").write_bytes(CSV.encode())
    for name in ("metrics.jsonl", "metrics.csv"):
        damaged = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(damaged[:40] + b"\xff" + damaged[40:])
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        with pytest.raises(metrics.MetricsFileError,
                           match=rf"^{tmp_path / name}: byte 40 is not text .*repair or "
                                 "delete the file, then run again$"):
            metrics.kept_metrics(tmp_path, 10)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
        (tmp_path / name).write_bytes(damaged)


def ten_steps_flags(compile_cache: str) -> list[str]:
    return ["--steps", "10", "--eval-every", "5", "--hidden-size", "8", "--compile-cache",
            compile_cache]


@pytest.fixture(scope="module")
def ten_steps(tmp_path_factory: pytest.TempPathFactory, worker_compile_cache: str) -> Path:
    """The workdir of a finished 10-step run (checkpoint 10), trained once for the tests that
    each damage a copy of it."""
    from rnnjax.cli import main

    work = tmp_path_factory.mktemp("ten_steps") / "run"
    assert main(["train", *ten_steps_flags(worker_compile_cache), "--workdir", str(work)]) == 0
    return work


@pytest.mark.parametrize(("field", "value"), [
    ("wall_s", "abc"),
    ("train_sums", {"loss_sum": {"dtype": "float32"}}),  # no value
    ("train_sums", {"loss_sum": {"dtype": "no-such-dtype", "value": 1.0}}),
    ("train_sums", [1, 2]),
    ("data", {"foo": 1}),
    ("data", {"image_shape": [28, 28], "num_classes": 10}),
    ("data", {"image_shape": [28, 28, 1], "num_classes": "ten"}),
], ids=["wall_not_a_number", "sums_without_value", "sums_dtype_unknown", "sums_not_a_dict",
        "data_without_shape", "data_shape_2d", "data_classes_not_a_number"])
def test_a_checkpoint_whose_meta_does_not_load_is_one_line_and_nothing_is_written(
        tmp_path, capsys, ten_steps, worker_compile_cache, field, value):
    """What a resumed run reads of a checkpoint's meta/ is checked before anything is
    written: a damaged field is one line naming the checkpoint and the fix (its images'
    shape and classes: a KeyError's traceback, in eval and predict too, before)."""
    from rnnjax.cli import main

    work = tmp_path / "run"
    shutil.copytree(ten_steps, work)  # the run, trained once for every field damaged
    args = [*ten_steps_flags(worker_compile_cache), "--workdir", str(work)]
    [meta_file] = (work / "checkpoints" / "10" / "meta").glob("metadata")
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, field: value}))
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", *args[2:], "--steps", "20"]) == 2
    err = capsys.readouterr().err
    corrupt = (f"rnnjax: error: checkpoint {work / 'checkpoints' / '10'} is corrupt: its "
               "meta/ train sums, wall time, data or probes do not load (")
    assert err.startswith(corrupt)
    assert err.count("\n") == 1 and "pass another step directory" in err
    assert err.rstrip().endswith("(--resume then continues from the one before it)")
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before
    for command in (["eval", str(work)], ["predict", str(work), str(work / "none.png")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(corrupt) and err.count("\n") == 1


def test_a_checkpoint_a_full_disk_stops_is_one_line(tmp_path, train_with_file_limit):
    """A save that fails on a full disk (here: files of at most 8 KiB, RLIMIT_FSIZE, whose
    writes then fail as ENOSPC's do) is the one line naming the checkpoint and the fix: the
    tensorstore writes still in flight printed 140-190 lines of tracebacks before it (each
    "Event loop is closed", and orbax's threads logging the error at ERROR through absl)."""
    work = tmp_path / "run"
    done = train_with_file_limit(8192, "--steps", "12", "--eval-every", "5",
                                 "--checkpoint-every", "5", "--compile-cache", "off",
                                 "--workdir", str(work))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(f"rnnjax: error: cannot write checkpoint "
                                  f"{work / 'checkpoints' / '5'} (")
    assert done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert done.stderr.rstrip().endswith("free disk space or choose another --workdir (older "
                                         "checkpoints are intact)")
    assert (work / "config.json").is_file() and checkpoint_lib.list_steps(
        work / "checkpoints") == []


def test_programs_a_full_compilation_cache_cannot_take_are_one_line(tmp_path, monkeypatch,
                                                                      capsys):
    """JAX warns, in two lines, of each program it cannot write into the cache: a run on a
    full disk printed 6-7 of them. One line names the directory and the fix; every other
    warning is shown as before."""
    import errno
    import warnings

    import jax.numpy as jnp
    from jax._src import lru_cache  # where JAX writes an entry (jax 0.10-0.11)

    from rnnjax import runtime

    def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lru_cache.LRUCache, "put", full)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # put back after
    directory = runtime.enable_compile_cache(str(tmp_path / "cache"))
    for k in range(3):  # three programs
        jax.jit(lambda x, k=k: x * k + 1)(jnp.ones(3 + k)).block_until_ready()
    err = capsys.readouterr().err
    assert err == (f"rnnjax: the compilation cache {directory} cannot be written (OSError: "
                   "[Errno 28] No space left on device): programs are compiled, not cached; "
                   "free space there, or pass --compile-cache with another directory, or "
                   "off\n")
    shown = []
    note = runtime._UnwrittenNote(lambda *args: shown.append(args[:2]), directory)
    note("another warning", UserWarning, "f.py", 1)
    assert shown == [("another warning", UserWarning)]


def test_checkpoints_of_another_run_do_not_resume_into_these_records(tmp_path, capsys,
                                                                     worker_compile_cache):
    """A workdir's checkpoints replaced by another run's (another cell and width): resumed,
    they appended that run's metrics to this one's and wrote its config over this one's.
    Refused, naming the fields, with nothing written; the run's own checkpoints resume."""
    from rnnjax.cli import main

    common = ["--steps", "10", "--eval-every", "5", "--compile-cache", worker_compile_cache]
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert main(["train", *common, "--hidden-size", "8", "--workdir", str(ours)]) == 0
    assert main(["train", *common, "--hidden-size", "6", "--cell", "lstm", "--workdir",
                 str(theirs)]) == 0
    shutil.move(ours / "checkpoints", tmp_path / "our_checkpoints")
    shutil.copytree(theirs / "checkpoints", ours / "checkpoints")
    before = {p.name: p.read_bytes() for p in ours.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", "--workdir", str(ours), "--steps", "20"]) == 2
    err = capsys.readouterr().err
    assert err == (f"rnnjax: error: {ours / 'config.json'} is another run's than the "
                          f"checkpoint {ours / 'checkpoints' / '10'}: it differs in --cell "
                          "simple_rnn (the checkpoint's: lstm), --hidden-size 8 (the "
                          "checkpoint's: 6); where config.json was edited, put the "
                          "checkpoint's values back; where the checkpoints came from another "
                          "run, resume in the workdir they were trained in, or move "
                          f"{ours / 'checkpoints'} into a workdir of its own\n")
    assert err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in ours.iterdir() if p.is_file()} == before
    shutil.rmtree(ours / "checkpoints")
    shutil.move(tmp_path / "our_checkpoints", ours / "checkpoints")
    assert main(["train", "--resume", "--workdir", str(ours), "--steps", "20"]) == 0


def test_a_resume_stopped_before_its_first_line_leaves_the_records_as_they_were(
        tmp_path, worker_compile_cache):
    """A resumed run drops the lines it logs again only when it logs its first: stopped
    before that (a kill, an error), the finished run's records stay whole, its last line
    (step 29, off the --eval-every grid, which a longer run does not log) among them."""
    from rnnjax.loop import train_and_evaluate

    config = Config(steps=30, eval_every=10, hidden_size=8, compile_cache=worker_compile_cache)
    train_and_evaluate(config, tmp_path, out=io.StringIO())
    before = {name: (tmp_path / name).read_bytes()
              for name in ("metrics.jsonl", "metrics.csv", "summary.json", "config.json")}
    events = sorted(tmp_path.glob("events.out.tfevents.*"))

    class Stop(Exception):
        pass

    class StopAtFirstLine(io.StringIO):
        def write(self, text: str) -> int:
            if text.startswith("step"):
                raise Stop(text)
            return super().write(text)

    with pytest.raises(Stop, match="step    30"):
        train_and_evaluate(config.replace(steps=40), tmp_path, out=StopAtFirstLine(),
                           resume=True)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(tmp_path.glob("events.out.tfevents.*")) == events  # no purge written
    assert [r["step"] for r in records(tmp_path)][-2:] == [29, 29]
    # Resumed to its end, the run logs as one never stopped.
    train_and_evaluate(config.replace(steps=40), tmp_path, out=io.StringIO(), resume=True)
    assert [r["step"] for r in records(tmp_path)] == [0, 0, 10, 10, 20, 20, 30, 30, 39, 39]
    # A run started over where one stopped before its first checkpoint: its config.json, too,
    # waits for its first line (it had been written first, and the first run's own command
    # was then refused as another run's).
    class StopAtStep4(io.StringIO):
        def write(self, text: str) -> int:
            if text.startswith("step     4"):
                raise Stop(text)
            return super().write(text)

    fresh, first = tmp_path / "fresh", config.replace(steps=6, eval_every=2)
    with pytest.raises(Stop):
        train_and_evaluate(first, fresh, out=StopAtStep4())
    before = {p.name: p.read_bytes() for p in fresh.iterdir() if p.is_file()}
    with pytest.raises(Stop, match="step     0"):
        train_and_evaluate(first.replace(steps=8), fresh, out=StopAtFirstLine())
    assert {p.name: p.read_bytes() for p in fresh.iterdir() if p.is_file()} == before
    train_and_evaluate(first, fresh, out=io.StringIO())
