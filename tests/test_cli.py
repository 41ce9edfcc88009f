"""The command line end to end, and its one-line errors."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest

from rnnjax import cli
from rnnjax.cli import build_parser, main
from rnnjax.config import Config, flag_name
from tests import users_cells


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "rnnjax", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_train_end_to_end(tmp_path):
    work = tmp_path / "run"
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # nothing from the user's home
    proc = run_cli("train", "--steps", "21", "--eval-every", "10", "--hidden-size", "16",
                   "--workdir", str(work), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["0", "10", "20"]
    assert all("test cost:  " in line and "test accuracy:  " in line for line in lines[:3])
    assert lines[3].startswith("final test accuracy: ")
    assert "compile" in lines[4] and "steps/s" in lines[4]
    assert lines[5].startswith("device: cpu") and "jax " in lines[5]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"] == 21 and summary["backend"] == "cpu"


@pytest.mark.parametrize("command", [[], ["train"], ["tune"], ["eval"], ["predict"]])
def test_every_help_prints_and_exits_0(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: rnnjax"), out
    assert "``" not in out  # the docstrings' reStructuredText markup, in plain text
    if command in (["train"], ["tune"]):  # every Config flag, its help as written
        for field in dataclasses.fields(Config):
            assert flag_name(field.name) in out, field.name
        assert "'train[:90%]'" in " ".join(out.split())  # argparse's %-formatting escaped
        # A help that says its default itself gets no second "(default: )".
        for action in build_parser().commands[command[0]]._actions:
            assert (action.help or "").count("(default:") <= 1, action.help


def test_the_program_collects_garbage_while_it_trains_and_a_library_call_never_sets_it(
        tmp_path):
    """``rnnjax`` as a process (cli.run): the collector off while it imports JAX, then on,
    the imports frozen out of its view, while it trains; cli.main called from Python (a
    run that trains) leaves the collector as it was."""
    script = textwrap.dedent("""
        import gc, sys
        from rnnjax import cli, process
        imported = process.imported
        def spy_imported():
            print("imported:", gc.isenabled(), "jax" in sys.modules)
            imported()
            loop = sys.modules["rnnjax.loop"]
            init = loop.init_state
            def spy_init(*args, **kwargs):  # called by the run, once it trains
                print("training:", gc.isenabled(), gc.get_freeze_count() > 10_000)
                return init(*args, **kwargs)
            loop.init_state = spy_init
        process.imported = spy_imported
        assert "jax" not in sys.modules
        sys.argv = ["rnnjax", "train", "--steps", "2", "--eval-every", "1", "--hidden-size",
                    "4", "--eval-batch-size", "5000", "--compile-cache", "off"]
        try:
            cli.run()
        except SystemExit as e:
            print("exit:", e.code)
    """)
    library = textwrap.dedent("""
        import gc
        from rnnjax import cli, loop
        seen = []
        run = loop.train_and_evaluate
        def spy(*args, **kwargs):
            seen.append((gc.isenabled(), gc.get_freeze_count()))
            return run(*args, **kwargs)
        loop.train_and_evaluate = spy
        assert cli.main(["train", "--steps", "2", "--eval-every", "1", "--hidden-size", "4",
                         "--eval-batch-size", "5000", "--compile-cache", "off"]) == 0
        print("library:", seen, gc.isenabled(), gc.get_freeze_count())
    """)
    env = {**os.environ, "HOME": str(tmp_path)}
    out = {}
    for name, code in (("program", script), ("library", library)):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out[name] = [line for line in proc.stdout.splitlines()
                     if line.split(":")[0] in ("imported", "training", "exit", "library")]
    assert out["program"] == ["imported: False True", "training: True True", "exit: 0"]
    assert out["library"] == ["library: [(True, 0)] True 0"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--batch-size", "-5"], "--batch-size must be at least 1"),
        (["--cell", "transformer"], "--cell: unknown cell 'transformer'; choose one of"),
        (["--learning-rate", "fast"], "invalid float value: 'fast'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--batch-size", "70000"], "larger than the 60000 training examples"),
        (["--dataset", "kmnist", "--data-dir", "/nonexistent"], "not found at /nonexistent/kmnist"),
        (["--dataset", "./missing_dir"], "no such directory"),
        (["--warmup-steps", "5"], "--warmup-steps needs --schedule warmup_cosine"),
        (["--optimizer", "adamax", "--optimizer-kwargs", "[1]"], "must be a JSON object"),
        (["--optimizer", "sgd", "--optimizer-kwargs", '{"momentum": "0.9"}'],
         "--optimizer sgd --optimizer-kwargs '{\"momentum\": \"0.9\"}' cannot update "
         "parameters (TypeError: "),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(capsys, tmp_path, args, message):
    work = tmp_path / "run"
    code = main(["train", *args, "--workdir", str(work)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("rnnjax: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not work.exists()  # nothing half-written


def test_unwritable_workdir_is_refused_before_training(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["train", "--workdir", str(blocker / "run")])
    assert code == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["train", "--workdir=", "--steps", "1"], ["eval", ""], ["eval", "run", "--out="],
    ["predict", "", "digit.png"], ["predict", "run", ""],
], ids=["workdir", "eval", "eval-out", "predict", "predict-image"])
def test_an_empty_path_is_refused_not_taken_for_the_working_directory(capsys, tmp_path,
                                                                      monkeypatch, argv):
    """``--workdir="$RUN"`` with ``RUN`` unset is ``--workdir=``: ``Path("")`` is ``.``, and
    the run trained into the working directory. Every path argument refuses it."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnjax: error: argument ") and err.count("\n") == 1, err
    assert "the path is empty (an unset shell variable?); pass a path" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("register", "message"), [
    (lambda: users_cells.elman(8), "'mistake' is registered in rnnjax.cells.CELLS as a Cell, "
     "not a function hidden -> Cell; register the function of the width: "
     "CELLS['mistake'] = my_cell (not my_cell(64))"),
    (lambda: lambda *, hidden: users_cells.elman(hidden), "'mistake': its function "
     "<lambda>.<locals>.<lambda> cannot be called with the width alone (too many "
     "positional arguments); "),
    (lambda: lambda hidden: {"init": None}, "'mistake': its function returned a dict, not a "
     "rnnjax.cells.Cell; return Cell(init=..., step=..., initial_carry=..., "
     "hidden_size=hidden)"),
], ids=["a-cell", "keyword-only", "not-a-cell"])
def test_a_cell_registered_wrongly_is_one_line(capsys, tmp_path, monkeypatch, register,
                                               message):
    """A built cell registered in place of its function, a function of another signature,
    one returning no Cell: a traceback and exit 1, where bad input is one line."""
    from rnnjax import cells

    monkeypatch.setitem(cells.CELLS, "mistake", register())
    for tuning in (["--no-tune"], ["--tune-budget", "5"]):
        assert main(["train", "--cell", "mistake", "--hidden-size", "8", "--steps", "2",
                     "--workdir", str(tmp_path / "run"), *tuning]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rnnjax: error: ") and err.count("\n") == 1, err
        assert message in err
        assert not (tmp_path / "run").exists()


def test_an_interrupted_run_says_how_to_go_on(capsys, tmp_path, monkeypatch):
    """Ctrl-C: ``rnnjax: interrupted``, exit 130, and what the workdir left allows: resume
    from its latest checkpoint, or, with none yet, the same command again."""
    from rnnjax import checkpoint, cli

    work = tmp_path / "run"

    def interrupted(args, whole_process):
        work.mkdir(exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_train", interrupted)
    assert main(["train", "--workdir", str(work)]) == 130
    assert capsys.readouterr().err == (f"rnnjax: interrupted; {work} holds no checkpoint "
                                       "yet: the same command again starts the run over\n")
    (work / "checkpoints" / "20").mkdir(parents=True)
    (work / "checkpoints" / "20" / checkpoint.COMMIT_FILE).write_text("")
    assert main(["train", "--workdir", str(work), "--resume"]) == 130
    assert capsys.readouterr().err == (f"rnnjax: interrupted; {work} keeps its checkpoints: "
                                       f"go on with rnnjax train --workdir {work} --resume\n")
    for argv in (["train"], ["train", "--workdir", str(tmp_path / "never")]):
        assert main(argv) == 130
        assert capsys.readouterr().err == "rnnjax: interrupted\n"


def _saved_checkpoint(workdir, **config_fields):
    """A real checkpoint of a tiny config (with ``config_fields``) in ``workdir`` (a made-up
    state, no training)."""
    import functools

    import jax
    import jax.numpy as jnp

    from rnnjax import checkpoint, train
    from rnnjax.config import Config
    from rnnjax.model import make_model
    from rnnjax.optim import make_optimizer

    config = Config(**{"hidden_size": 4, "steps": 10, **config_fields})
    create = functools.partial(train.create_state, model=make_model(config),
                               optimizer=make_optimizer(config))
    state = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                         jax.eval_shape(create, jax.random.key(0)))
    with checkpoint.CheckpointWriter(checkpoint.checkpoints_dir(workdir), keep=1) as writer:
        return writer.save(state, config)


@pytest.fixture
def saved(tmp_path):
    return _saved_checkpoint(tmp_path / "run")


def _one_line_error(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("rnnjax: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_eval_on_images_of_another_shape_is_refused_before_they_are_read(tmp_path, capsys,
                                                                        monkeypatch):
    """A checkpoint of 32x32x3 images evaluated on MNIST: refused once the data was read,
    which under --source tfds first built the IDX files into a tfds dataset (a minute, 23
    MB written into the run's tfds dir). The shape is known before: nothing is read."""
    import jax
    import jax.numpy as jnp

    from rnnjax import checkpoint, train
    from rnnjax.config import Config
    from rnnjax.data import sources
    from rnnjax.data.spec import DataSpec
    from rnnjax.model import make_model
    from rnnjax.optim import make_optimizer

    config, spec = Config(hidden_size=4, steps=10), DataSpec((32, 32, 3), 4)
    shapes = jax.eval_shape(lambda: train.create_state(
        jax.random.key(0), make_model(config, spec), make_optimizer(config)))
    state = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
    with checkpoint.CheckpointWriter(checkpoint.checkpoints_dir(tmp_path), keep=1) as writer:
        writer.save(state, config, data=spec.to_json())

    def read(*args, **kwargs):
        raise AssertionError("the dataset was read")

    monkeypatch.setattr(sources, "load_dataset", read)
    _one_line_error(capsys, ["eval", str(tmp_path)], f"checkpoint {tmp_path / 'checkpoints'}"
                    f"/1 was trained on {spec.describe()} but the dataset has "
                    f"{sources.IDX_SPEC.describe()}; pass the dataset it was trained on")


def test_eval_and_predict_bad_checkpoints_give_one_line(capsys, tmp_path, saved):
    _one_line_error(capsys, ["eval", str(tmp_path / "nowhere")], "no such file or directory")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["eval", str(tmp_path / "empty")], "holds no checkpoint")
    _one_line_error(capsys, ["predict", str(tmp_path / "empty"), "x.png"], "holds no checkpoint")
    (tmp_path / "empty" / "config.json").write_text("{}")  # a run stopped before its first
    for command in (["eval"], ["predict", "x.png"]):  # save: not "a workdir trained with it"
        _one_line_error(capsys, [command[0], str(tmp_path / "empty"), *command[1:]],
                        "holds no checkpoint: its run stopped before it saved one (a run saves "
                        "one at its end, and every --checkpoint-every steps); train it again")
    for f in (saved / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * f.stat().st_size)  # damaged array data
    _one_line_error(capsys, ["eval", str(saved), "--out", str(tmp_path / "cm.png")],
                    "is corrupt")
    (saved / "meta" / "metadata").write_text("{truncated")
    _one_line_error(capsys, ["eval", str(saved.parent.parent)], "is corrupt: its meta/")


@pytest.mark.parametrize("name", ["cm.jpg", "cm.svg", "cm"])
def test_eval_out_not_a_png_name_is_one_line_before_the_work(capsys, tmp_path, saved, name):
    """The confusion matrix is a PNG whatever --out says (it was written as PNG bytes into
    cm.jpg or cm.svg): another suffix is refused before anything is loaded or written."""
    _one_line_error(capsys, ["eval", str(saved), "--out", str(tmp_path / name)],
                    f"--out {tmp_path / name}: the confusion matrix is written as a PNG; "
                    "pass a file name ending in .png")
    assert not (tmp_path / name).exists()


def test_predict_bad_images_give_one_line(capsys, tmp_path, saved):
    import numpy as np
    from PIL import Image

    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    _one_line_error(capsys, ["predict", str(saved), str(text)], "not an image file")
    _one_line_error(capsys, ["predict", str(saved), str(tmp_path / "gone.png")], "no such file")
    _one_line_error(capsys, ["predict", str(saved), str(tmp_path)], "is a directory")
    digit = np.zeros((40, 40), np.uint8)
    digit[10:30, 18:22] = 255
    Image.fromarray(digit).save(tmp_path / "one.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes((tmp_path / "one.png").read_bytes()[:60])  # truncated file
    _one_line_error(capsys, ["predict", str(saved), str(tmp_path / "one.png"), str(cut)],
                    "cut.png: unreadable")
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(tmp_path / "white.jpg")
    _one_line_error(capsys, ["predict", str(saved), str(tmp_path / "white.jpg")],
                    "white.jpg: no ink found")
    nan = digit.astype(np.float32)
    nan[0, 0] = np.nan
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    _one_line_error(capsys, ["predict", str(saved), str(tmp_path / "nan.tif")],
                    "nan.tif: pixels that are not numbers (NaN or infinite)")


def test_predict_reads_float_images_in_0_1_and_0_255_alike(capsys, tmp_path, saved):
    """A float (mode F) image in [0, 1], the floats' usual range, is the same digit as one
    in 0..255 (it used to read as pixels of 0 and 1: "no ink found")."""
    import numpy as np
    from PIL import Image

    digit = np.zeros((40, 40), np.float32)
    digit[10:30, 18:22] = 255
    digit[10:14, 12:28] = 200
    Image.fromarray(digit, mode="F").save(tmp_path / "a.tif")
    Image.fromarray(digit / 255, mode="F").save(tmp_path / "b.tif")
    Image.fromarray(digit.astype(np.uint8)).save(tmp_path / "c.png")
    assert main(["predict", str(saved), *(str(tmp_path / n) for n in ("a.tif", "b.tif",
                                                                     "c.png"))]) == 0
    rows = [line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 3 and rows[0] == rows[1] == rows[2]


def test_probabilities_of_arrays_the_model_cannot_read_are_clear_errors(saved):
    """inference.probabilities on one's own arrays (predict's advice) takes uint8 pixels of
    the model's shape; floats, bools or wider ints indexed the pixel table wrongly (an
    IndexError, or negative ints silently wrapped round it)."""
    import numpy as np

    from rnnjax import inference

    loaded = inference.load(saved)
    good = np.zeros((2, 28, 28), np.uint8)
    assert inference.probabilities(loaded, good).shape == (2, 10)
    assert inference.probabilities(loaded, good[..., None]).shape == (2, 10)
    for bad in (good / 255.0, good > 0, good.astype(np.int16) - 255):
        with pytest.raises(ValueError, match=rf"images of dtype {bad.dtype}: the model reads "
                                             r"uint8 pixels 0\.\.255"):
            inference.probabilities(loaded, bad)
    for bad in (good[:, :27], good[0], np.zeros((2, 28, 28, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"images of shape .*: the model reads "
                                             r"\[N, 28, 28, 1\] or \[N, 28, 28\]"):
            inference.probabilities(loaded, bad)


def test_inference_of_no_images_and_of_bad_labels(saved):
    """No images are no probabilities (a reshape divided by zero), and evaluate's labels are
    checked: a class past the model's had failed in NumPy's reshape, float labels were cut
    to integers."""
    import numpy as np

    from rnnjax import inference

    loaded = inference.load(saved)
    none = np.zeros((0, 28, 28), np.uint8)
    assert inference.probabilities(loaded, none).shape == (0, 10)
    images, labels = np.zeros((3, 28, 28), np.uint8), np.array([0, 9, 1])
    assert inference.evaluate(loaded, images, labels).confusion.sum() == 3
    for bad_images, bad_labels, message in (
            (images, np.array([0, 10, 1]), "labels from 0 to 10: the model has 10 classes, "
                                           "0 to 9"),
            (images, np.array([0, -1, 1]), "labels from -1 to 1"),
            (images, np.array([0.0, 1.7, 1.0]), "labels of dtype float64: give integer"),
            (images, labels[:2], r"labels of shape \[2\] for 3 examples of 10 classes: "
                                 r"give one integer class per example, int32 \[3\]"),
            (none, labels[:0], "no images to evaluate")):
        with pytest.raises(ValueError, match=message):
            inference.evaluate(loaded, bad_images, bad_labels)


def test_eval_and_predict_size_their_memory_by_the_images_they_run(capsys, tmp_path,
                                                                 monkeypatch):
    """A run evaluated with --eval-batch-size 10**8 (chunks of the test set's 10,000) was
    refused by eval and predict as needing 600 GiB, with a fix neither had: they size a
    chunk by the images they run, take --eval-batch-size themselves, and where the images do
    not fit say what to change there."""
    import numpy as np
    from PIL import Image

    from rnnjax import memory

    saved = _saved_checkpoint(tmp_path / "run", eval_batch_size=10**8)
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255  # a one
    Image.fromarray(digit).save(tmp_path / "d.png")
    assert main(["predict", str(saved), str(tmp_path / "d.png")]) == 0
    assert main(["predict", str(saved), str(tmp_path / "d.png"), "--eval-batch-size",
                 "7"]) == 0
    one, seven = (line.split()[1:] for line in capsys.readouterr().out.splitlines()[1::2])
    assert one == seven
    seed_lines = []
    for flags in ([], ["--eval-batch-size", "3000"]):
        assert main(["eval", str(saved), "--out", str(tmp_path / "cm.png"), *flags]) == 0
        seed_lines += [line for line in capsys.readouterr().out.splitlines()
                       if "test" in line and "accuracy" in line]
    assert len(seed_lines) == 2 and seed_lines[0] == seed_lines[1]
    _one_line_error(capsys, ["eval", str(saved), "--eval-batch-size", "0"],
                    "--eval-batch-size must be at least 1, got 0")
    _one_line_error(capsys, ["predict", str(saved), str(tmp_path / "d.png"),
                             "--eval-batch-size", "0"],
                    "--eval-batch-size must be at least 1, got 0")
    monkeypatch.setattr(memory, "available",
                        lambda device=None: (20 << 20, "the host has 20.0 MiB of RAM", False))
    _one_line_error(capsys, ["eval", str(saved), "--out", str(tmp_path / "cm.png")],
                    "evaluating 10000 images with the checkpoint's simple_rnn 4 model beside "
                    "it needs about 30.8 MiB of memory (activations of 10000 examples 859.4 "
                    "KiB, dataset 29.9 MiB) but the host has 20.0 MiB of RAM; evaluate fewer "
                    "images at a time (rnnjax predict: fewer IMAGE files")


def test_the_images_memory_check_leaves_out_the_state_already_loaded(tmp_path, monkeypatch):
    """Once loaded, the state is in use (a GPU's bytes_in_use, the host's RAM): checking the
    images, counting it again refused a checkpoint of more than half the free memory."""
    import numpy as np

    from rnnjax import inference, memory

    loaded = inference.load(_saved_checkpoint(tmp_path / "run", cell="lstm", hidden_size=256))
    state = memory.tree_bytes((loaded.state.params, loaded.state.opt_state))
    monkeypatch.setattr(memory, "available",
                        lambda device=None: (state // 2, "the device has little free", True))
    assert inference.probabilities(loaded, np.zeros((1, 28, 28), np.uint8)).shape == (1, 10)
    with pytest.raises(memory.OutOfMemory, match="fewer IMAGE files"):
        inference.probabilities(loaded, np.zeros((2000, 28, 28), np.uint8), chunk=1)


def test_predict_an_image_pillow_refuses_as_too_large_gives_one_line(monkeypatch, capsys,
                                                                      tmp_path, saved):
    """Pillow refuses an image of more than twice ``MAX_IMAGE_PIXELS`` (179 million by
    default: a 190 KB PNG of 14000x14000 is one) with ``DecompressionBombError``, which is
    no OSError; the limit is lowered here so that a small image crosses it."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 // 4)
    _one_line_error(capsys, ["predict", str(saved), str(tmp_path / "huge.png")],
                    "huge.png: too large, over 800 pixels")


def test_resume_and_existing_checkpoints_on_the_command_line(capsys, tmp_path, saved):
    work = saved.parent.parent
    _one_line_error(capsys, ["train", "--resume"], "--resume needs --workdir")
    _one_line_error(capsys, ["train", "--resume", "--workdir", str(tmp_path / "new")],
                    "no checkpoint in")
    _one_line_error(capsys, ["train", "--checkpoint-every", "5"], "needs --workdir")
    before = sorted(p.name for p in work.iterdir())
    _one_line_error(capsys, ["train", "--steps", "3", "--workdir", str(work)],
                    "already holds checkpoints")
    _one_line_error(capsys, ["train", "--workdir", str(work), "--resume", "--hidden-size", "9"],
                    "--hidden-size 9 differs from 4")
    _one_line_error(capsys, ["train", "--workdir", str(work), "--resume", "--steps", "1"],
                    "already trained 1 step of --steps 1")
    assert sorted(p.name for p in work.iterdir()) == before == ["checkpoints"]


@pytest.mark.parametrize(("code", "fix"), [
    (errno.ENOSPC, "free disk space or choose another --workdir"),
    (errno.EDQUOT, "free space within your disk quota"),
    (errno.EACCES, "check its permissions"),
    (errno.EPERM, "check its permissions"),
    (errno.EROFS, "read-only; choose a --workdir on a writable one"),
])
def test_os_errors_with_a_known_fix_are_one_line_naming_it(monkeypatch, capsys, tmp_path,
                                                            code, fix):
    path = tmp_path / "run" / "metrics.jsonl"

    def fail(args, whole_process=False):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(cli, "_train", fail)
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err == (f"rnnjax: error: {path}: {os.strerror(code)}; {cli.OS_ERROR_FIXES[code]} "
                   "(files already written are kept)\n")
    assert fix in err
    others = {f for c, f in cli.OS_ERROR_FIXES.items() if os.strerror(c) != os.strerror(code)}
    assert not any(other in err for other in others - {cli.OS_ERROR_FIXES[code]})


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error", "x"),
                                   FileNotFoundError(errno.ENOENT, "No such file", "y"),
                                   OSError("no errno")])
def test_other_os_errors_are_not_taken_for_a_full_disk(monkeypatch, capsys, error):
    """An OSError rnnjax cannot explain keeps its traceback, not a wrong fix."""
    def fail(args, whole_process=False):
        raise error

    monkeypatch.setattr(cli, "_train", fail)
    with pytest.raises(OSError) as info:
        main(["train"])
    assert info.value is error
    assert "disk" not in capsys.readouterr().err


def test_eval_into_a_place_it_cannot_write_names_that_place(capsys, tmp_path, saved,
                                                             monkeypatch):
    """A workdir that cannot take the confusion matrix (no --out given: a read-only mount)
    is named as eval's default place, with --out as the fix, not as an --out the user never
    passed; a given --out is named as given, the file, not its directory."""
    import tempfile

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    workdir = tmp_path / "run"  # saved: its checkpoints/STEP
    _one_line_error(capsys, ["eval", str(saved)],
                    f"{workdir} (where it writes without --out): {workdir} is not writable "
                    f"({os.strerror(errno.EROFS)}); pass --out in a writable directory")
    _one_line_error(capsys, ["eval", str(saved), "--out", str(tmp_path / "cm.png")],
                    f"--out {tmp_path / 'cm.png'}: {tmp_path} is not writable")


def test_eval_of_a_relative_step_directory_writes_into_its_workdir(capsys, tmp_path, saved,
                                                                   monkeypatch):
    """``rnnjax eval .`` inside checkpoints/STEP, or ``eval STEP`` inside checkpoints/,
    writes the confusion matrix into the workdir (it went into the checkpoint itself)."""
    workdir = tmp_path / "run"
    png = workdir / f"confusion_matrix_step{saved.name}.png"
    for cwd, arg in ((saved, "."), (saved.parent, saved.name), (saved, f"../{saved.name}")):
        monkeypatch.chdir(cwd)
        assert main(["eval", arg]) == 0, capsys.readouterr().err
        assert f"confusion matrix: {png}" in capsys.readouterr().out
        png.unlink()
        assert not list(tmp_path.rglob("*.png"))  # none in the checkpoint, nor beside it
    # The default place taken by a directory: named as the default, --out the fix.
    png.mkdir()
    _one_line_error(capsys, ["eval", str(saved)],
                    f"{png} (where it writes without --out) is a directory; pass --out with "
                    "a file name ending in .png")


def test_a_full_disk_mid_run_is_one_line(tmp_path, capsys):
    """A real ENOSPC: the run's metrics.jsonl is /dev/full."""
    work = tmp_path / "run"
    work.mkdir()
    (work / "metrics.jsonl").symlink_to("/dev/full")
    assert main(["train", "--steps", "3", "--eval-every", "2", "--hidden-size", "8",
                 "--workdir", str(work), "--compile-cache", "off"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rnnjax: error: {work / 'metrics.jsonl'}: ")  # the file it names
    assert err.count("\n") == 1
    assert os.strerror(errno.ENOSPC) in err
    assert "free disk space or choose another --workdir" in err
    assert (work / "config.json").is_file()  # what was written before stays


def test_a_full_disk_under_the_tensorboard_file_is_one_line_naming_it(
        tmp_path, train_with_file_limit):
    """The event file filling (files of at most 20 KB: RLIMIT_FSIZE, whose writes then fail
    as a full disk's do) is the one line naming it: tensorboardX's writer thread and its
    flush at exit printed the error twice more as tracebacks, and the line named no file."""
    work = tmp_path / "run"
    done = train_with_file_limit(
        20000, "--steps", "400", "--eval-every", "2", "--hidden-size", "8",
        "--checkpoint-every", "1000", "--compile-cache", "off", "--workdir", str(work))
    assert done.returncode == 2, done.stderr[-2000:]
    (events,) = work.glob("events.out.tfevents.*")
    assert done.stderr == (f"rnnjax: error: {events}: {os.strerror(errno.EFBIG)}; choose a "
                           "--workdir on a file system that allows larger files (files "
                           "already written are kept)\n")
    assert events.stat().st_size == 20000 and (work / "metrics.jsonl").stat().st_size < 20000


def test_a_full_disk_under_tensorboard_is_its_error_and_the_checkpoints_still_close(
        tmp_path, capsys, monkeypatch):
    """The TensorBoard writer's flush fails on a full disk, and so does its close: the run
    reports the first error (its close's used to replace it, and stopped the checkpoint
    writer from closing, whose async save then never finished)."""
    from rnnjax import checkpoint, metrics

    def full(self, step, split, values):  # from the second evaluation on, after a save
        if step >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_on_close(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (closing)")

    closed = []
    close = checkpoint.CheckpointWriter.close
    monkeypatch.setattr(metrics.TensorBoardWriter, "write", full)
    monkeypatch.setattr(metrics.TensorBoardWriter, "close", full_on_close)
    monkeypatch.setattr(checkpoint.CheckpointWriter, "close",
                        lambda self: (closed.append(self), close(self))[1])
    work = tmp_path / "run"
    assert main(["train", "--steps", "3", "--eval-every", "2", "--checkpoint-every", "1",
                 "--hidden-size", "8", "--workdir", str(work), "--compile-cache", "off"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnjax: error: ") and err.count("\n") == 1
    assert os.strerror(errno.ENOSPC) in err and "closing" not in err
    assert len(closed) == 1 and checkpoint.list_steps(work / "checkpoints") == [1, 2]


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_output_to_a_pipe_closed_by_its_reader_stops_quietly(tmp_path, saved, unbuffered):
    """``rnnjax eval RUN | head -1``: the reader gone, rnnjax stops with no traceback (nor
    Python's 'Exception ignored' at exit) and the status of a program killed by SIGPIPE,
    whether stdout is unbuffered (the error met at a print) or buffered (at the flush)."""
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    proc = subprocess.Popen([sys.executable, "-m", "rnnjax", "eval", str(saved), "--out",
                             str(tmp_path / "cm.png")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    proc.stdout.close()  # as `head` does once it has its lines: every write now fails
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == cli.EXIT_BROKEN_PIPE == 141, err
    assert err == ""


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--hidden_size", "8"], "unrecognized arguments: --hidden_size 8; did you mean "
     "--hidden-size? (see 'rnnjax train --help')"),
    (["tune", "--workdir", "w", "--batchsize=4"], "unrecognized arguments: --workdir w "
     "--batchsize=4; did you mean --batch-size? (see 'rnnjax tune --help')"),
    (["eval", "run", "--bogus"], "unrecognized arguments: --bogus (see 'rnnjax eval --help')"),
])
def test_an_unknown_flag_points_at_the_help_of_its_command(capsys, argv, message):
    """`rnnjax --help` lists no flag of train, tune, eval or predict: an unknown flag is
    reported by its command, pointing at that command's --help, with the flag meant."""
    assert main(argv) == 2
    assert capsys.readouterr().err == f"rnnjax: error: {message}\n"


@pytest.mark.parametrize("command", [["train", "--tune"], ["tune"]])
@pytest.mark.parametrize(("flags", "message"), [
    (["--optimizer", "adamw", "--optimizer-kwargs", '{"weight_decay": "0.1"}'],
     "cannot update parameters"),
    (["--cell", "foo"], "--cell: unknown cell 'foo'"),
    (["--cell", "flax.linen:Dense"], "is not an RNN cell"),
])
def test_a_cell_or_optimizer_that_cannot_work_is_refused_before_tuning(
        monkeypatch, capsys, command, flags, message):
    """Tuned (the default), every child failed on it, and the tuner said first that the
    defaults were 'not timed within 30 s' (rnnjax tune: only that, and exit 1)."""
    from rnnjax import tune

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuning started")

    monkeypatch.setattr(tune, "tune", no_tuning)
    _one_line_error(capsys, [*command, *flags, "--compile-cache", "off"], message)


@pytest.mark.parametrize("argv", [
    ["train", "--workdir", "{long}"], ["train", "--workdir", "runs/{long}"],
    ["train", "--compile-cache", "cache/{long}"], ["train", "--dataset", "./{long}"],
    ["eval", "{long}"], ["predict", "{long}", "x.png"]])
def test_a_name_longer_than_the_file_system_takes_is_one_line(capsys, tmp_path, monkeypatch,
                                                             argv):
    """A 300-byte name (a sweep naming workdirs by many settings) was a traceback (OSError:
    File name too long), and --workdir runs/NAME left runs/ behind."""
    monkeypatch.chdir(tmp_path)
    long = "a" * 300
    _one_line_error(capsys, [arg.format(long=long) for arg in argv], "choose a shorter path")
    assert list(tmp_path.iterdir()) == []


def test_a_relative_dataset_directory_is_found_from_anywhere(capsys, tmp_path, monkeypatch):
    """``--dataset ./mydata`` is recorded absolute: eval of its checkpoint from another
    working directory found no ./mydata there (and eval took no --dataset to say where).
    The runs also show --progress read (it could be dropped unnoticed): with it the bar is
    drawn on stderr, no terminal here (the default draws none there), and with
    --no-progress none, where stderr says it is one."""
    import shutil
    from pathlib import Path

    import rnnjax.data

    mnist = Path(rnnjax.data.__file__).parent / "mnist"
    shutil.copytree(mnist, tmp_path / "a" / "mydata")
    monkeypatch.chdir(tmp_path / "a")
    assert main(["train", "--dataset", "./mydata", "--steps", "3", "--hidden-size", "8",
                 "--no-tune", "--workdir", "run", "--compile-cache", "off",
                 "--progress"]) == 0
    recorded = json.loads((tmp_path / "a" / "run" / "config.json").read_text())["dataset"]
    assert recorded == str(tmp_path / "a" / "mydata")
    err = capsys.readouterr().err  # the bar after steps 0 and 2, the evaluations
    assert f"\r[{'#' * 10}{'-' * 20}] 1/3 " in err and f"\r[{'#' * 30}] 3/3 " in err, err
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "a/run", "--out", "cm.png"]) == 0
    first = capsys.readouterr().out
    assert f"on {tmp_path / 'a' / 'mydata'} after 3 steps" in first
    shutil.move(tmp_path / "a" / "mydata", tmp_path / "moved")
    _one_line_error(capsys, ["eval", "a/run", "--out", "cm.png"], "no such directory")
    assert main(["eval", "a/run", "--out", "cm.png", "--dataset", "./moved"]) == 0
    again = capsys.readouterr().out
    assert f"on {tmp_path / 'moved'} after 3 steps" in again
    assert again.split("\n", 1)[1] == first.split("\n", 1)[1]  # the same results
    # A named dataset under a relative --data-dir: recorded absolute too (it was recorded as
    # given, and eval from elsewhere looked for droot/digits there).
    shutil.copytree(mnist, tmp_path / "a" / "droot" / "digits")
    monkeypatch.chdir(tmp_path / "a")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the default: a bar
    assert main(["train", "--dataset", "digits", "--data-dir", "droot", "--steps", "3",
                 "--hidden-size", "8", "--no-tune", "--workdir", "run2",
                 "--compile-cache", "off", "--no-progress"]) == 0
    config = json.loads((tmp_path / "a" / "run2" / "config.json").read_text())
    assert config["data_dir"] == str(tmp_path / "a" / "droot")
    monkeypatch.chdir(tmp_path)
    assert "\r[" not in capsys.readouterr().err
    assert main(["eval", "a/run2", "--out", "cm2.png"]) == 0


def test_steps_per_call_is_read_only_by_the_device_feed_given_resumed_or_tuned():
    """A resume of a --feed stream run took --steps-per-call 7 and recorded it, unread;
    a tuned run given --steps-per-call could be tuned to the stream feed."""
    with pytest.raises(cli.UsageError, match="--steps-per-call 7: --feed stream runs one"):
        cli.check_read(Config(feed="stream", steps_per_call=7), {"steps_per_call": 7})
    cli.check_read(Config(feed="device", steps_per_call=7), {"steps_per_call": 7})
    assert cli.pinned_settings({"steps_per_call": 7, "unroll": 2, "seed": 1}) == {"feed",
                                                                                  "unroll"}


def test_a_resumed_tfds_run_takes_its_own_dataset_name_again(monkeypatch, tmp_path):
    """--resume --dataset NAME/CONFIG of a --source tfds run was read as an IDX directory
    (the flags' --source, idx, not the checkpoint's): made absolute, then refused as
    differing from NAME/CONFIG, the advice to pass just what was passed."""
    from rnnjax import checkpoint

    saved = Config(source="tfds", dataset="my_set/cfg")
    monkeypatch.setattr(checkpoint, "latest_checkpoint", lambda workdir: tmp_path / "10")
    monkeypatch.setattr(checkpoint, "read_meta", lambda step_dir: {})
    monkeypatch.setattr(checkpoint, "read_config", lambda step_dir, meta=None: saved)
    args = cli.build_parser().parse_args(["train", "--resume", "--workdir", "w",
                                          "--dataset", "my_set/cfg"])
    assert cli.resume_config(args).dataset == "my_set/cfg"


def test_a_resume_runs_where_its_own_flags_say_never_where_the_checkpoint_ran(monkeypatch,
                                                                             tmp_path):
    """Where a run runs (its compile cache, devices and processes) is each resume's own
    choice: a checkpoint of 2 processes on 2 devices each may be resumed by one process
    elsewhere. Every CLI resume in the suite passed --compile-cache off both times, so a
    resume that took these from the checkpoint went unnoticed; here the checkpoint holds
    other values than the defaults for all six, and the resume gets the defaults, or the
    flags it was given."""
    from rnnjax import checkpoint

    machine = {"compile_cache": str(tmp_path / "their-cache"), "num_devices": 2,
               "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
               "coordinator_timeout": 60}
    saved = Config(hidden_size=8, steps=30, **machine)
    monkeypatch.setattr(checkpoint, "latest_checkpoint", lambda workdir: tmp_path / "10")
    monkeypatch.setattr(checkpoint, "read_meta", lambda step_dir: {})
    monkeypatch.setattr(checkpoint, "read_config", lambda step_dir, meta=None: saved)
    defaults = Config()

    def resumed(*flags):
        args = cli.build_parser().parse_args(["train", "--resume", "--workdir",
                                              str(tmp_path / "w"), *flags])
        return cli.resume_config(args)

    config = resumed()
    assert {name: getattr(config, name) for name in machine} == {
        name: getattr(defaults, name) for name in machine}
    assert (config.hidden_size, config.steps) == (8, 30)  # the rest is the checkpoint's
    config = resumed("--compile-cache", "off", "--num-devices", "1")
    assert {name: getattr(config, name) for name in machine} == {
        **{name: getattr(defaults, name) for name in machine}, "compile_cache": "off",
        "num_devices": 1}
    assert set(cli.MACHINE_SETTINGS) == set(machine)  # the README's six, no more


def test_a_write_that_fails_on_a_file_written_whole_names_it(tmp_path, train_with_file_limit):
    """config.json, summary.json and the PNGs are written whole beside their place, then
    renamed: a write failing there (a full disk, a file-size limit) raised an OSError that
    named no file, and the one line named none. Nor is the file it failed on left half
    written: a config.json cut at the limit had the same command refused when run again
    (unreadable), where the run it names never started."""
    from rnnjax import atomic

    target = tmp_path / "summary.json"
    target.write_bytes(b"the summary before")

    def fill(f):
        f.write(b"half of a new summary")
        f.flush()
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    with pytest.raises(OSError) as info:
        atomic.write(target, fill)
    assert info.value.errno == errno.EFBIG and info.value.filename == str(target)
    assert target.read_bytes() == b"the summary before"  # as it was
    assert list(tmp_path.iterdir()) == [target]  # its temporary file removed
    work = tmp_path / "run"
    done = train_with_file_limit(1000, "--steps", "3", "--eval-every", "2", "--hidden-size",
                                 "8", "--compile-cache", "off", "--workdir", str(work))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (f"rnnjax: error: {work / 'config.json'}: {os.strerror(errno.EFBIG)}"
                           "; choose a --workdir on a file system that allows larger files "
                           "(files already written are kept)\n")
    assert not (work / "config.json").exists()  # not the first 1000 bytes of it
    assert not list(work.glob(".config.json.*"))  # nor its temporary file


def _bad_cells():
    import jax.numpy as jnp

    def half(params, h, x):
        y = jnp.tanh(jnp.concatenate([x, h], axis=-1) @ params["w"])
        return y, y[:, :4]

    def grows(params, h, x):
        y = jnp.tanh(jnp.concatenate([x, h], axis=-1) @ params["w"])
        return jnp.concatenate([y, y[:, :1]], axis=-1), y

    def branches(params, h, x):
        if x.sum() > 0:
            return h, h
        return -h, h

    def counted(key, input_size):
        return {"w": jnp.zeros((input_size + 8, 8)), "n": jnp.ones((8,), jnp.int32)}

    def rows_only(key, input_size):  # the first layer's width, whatever the layer
        return {"w": jnp.zeros((28 + 8, 8))}

    def promotes(params, h, x):  # a float32 constant: a bfloat16 carry comes back float32
        h = jnp.tanh(jnp.concatenate([x, h], axis=-1) @ params["w"]) + jnp.float32(0.5)
        return h, h

    def with_last_output(last_output):
        return lambda hidden: dataclasses.replace(users_cells.elman(hidden),
                                                  last_output=last_output)

    cell = users_cells.with_parts
    return {  # name: (cell, its line, the run's flags)
        "narrow_output": (cell(step=half), "its step returns y_t float32[2, 4] for a batch of "
                          "2, not [2, 8] (its hidden_size, --hidden-size)", []),
        "growing_carry": (cell(step=grows), "its step returns the carry float32[2, 9] where "
                          "initial_carry makes float32[2, 8]", []),
        "python_branch": (cell(step=branches), "its init, initial_carry, project or step fails "
                          "on one step of a batch of 2 (TracerBoolConversionError", []),
        "integer_param": (cell(init=counted), "its init makes params that are not floating "
                          "point at ['n']", []),
        "first_layer_only": (cell(init=rows_only), "in a layer above the first, which reads 8 "
                             "features a step (the outputs of the layer below), its init, "
                             "initial_carry, project or step fails on one step of a batch of 2 "
                             "(TypeError: dot_general", ["--num-layers", "2"]),
        "float32_carry": (cell(step=promotes), "its step returns the carry float32[2, 8] where "
                          "initial_carry makes bfloat16[2, 8] in bfloat16 (--compute-dtype): "
                          "the same shapes and dtypes", ["--compute-dtype", "bfloat16"]),
        "wide_last_output": (with_last_output(lambda h: jnp.concatenate([h, h], axis=-1)),
                             "its last_output returns float32[2, 16] from the carry "
                             "float32[2, 8] for a batch of 2, not y_T [2, 8]", []),
    }


@pytest.mark.parametrize("name", list(_bad_cells()))
def test_a_users_cell_that_cannot_work_is_one_line_before_anything_is_written(
        name, capsys, tmp_path, monkeypatch, worker_compile_cache):
    """A researcher's cell with a mistake: a traceback of 40-60 lines from deep in the
    model (the head's product for an output of the wrong width, naming neither the cell
    nor y_t), exit 1, where one line naming the cell and the mistake is promised; with or
    without tuning, before the workdir is made. So for a mistake that shows only in a
    layer above the first (which reads the outputs below it), in the compute dtype the
    model casts to, or in ``last_output``."""
    from rnnjax import cells

    cell, message, flags = _bad_cells()[name]
    monkeypatch.setitem(cells.CELLS, name, cell)
    for tuning in (["--no-tune"], ["--tune-budget", "5"]):
        _one_line_error(capsys, ["train", "--cell", name, "--hidden-size", "8", "--steps", "2",
                                 "--workdir", str(tmp_path / "run"), "--compile-cache", "off",
                                 *flags, *tuning], f"rnnjax: error: --cell {name}: {message}")
        assert not (tmp_path / "run").exists()
    monkeypatch.setitem(cells.CELLS, name, users_cells.elman)  # the cell mended: it trains
    assert main(["train", "--cell", name, "--hidden-size", "8", "--steps", "2", "--no-tune",
                 "--compile-cache", worker_compile_cache, *flags]) == 0
