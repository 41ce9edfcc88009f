"""The command line end to end, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rnnjax.cli import main


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
