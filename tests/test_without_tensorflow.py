"""Accelerator images have jax, flax, optax and orbax but no TensorFlow: training with the
default data, the benchmarks' core, eval and predict must run with it unimportable; where it
is installed, a run of IDX files imports none of it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Runs a module as `python -m MODULE ARGS...` with tensorflow and tensorflow_datasets hidden
# from the import system, as on an image that lacks them: any import of them fails.
RUNNER = """
import runpy, sys

BLOCKED = ("tensorflow", "tensorflow_datasets")


class NoTensorFlow:
    \"\"\"The import system's finders, minus TensorFlow: to `import` and to
    `importlib.util.find_spec` alike, it is not installed.\"\"\"

    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None

    def find_distributions(self, *args, **kwargs):
        for finder in self.finders:
            for dist in getattr(finder, "find_distributions", lambda *a, **k: [])(*args, **kwargs):
                if not dist.metadata["Name"].lower().startswith("tensorflow"):
                    yield dist

    def invalidate_caches(self):
        for finder in self.finders:
            getattr(finder, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [NoTensorFlow(list(sys.meta_path))]
module, *args = sys.argv[1:]
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_blocked(tmp_path: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RNNJAX_BENCH_OUT": str(tmp_path),
           "PYTHONPATH": str(ROOT)}  # benchmarks/ runs from the checkout, as benchmarks/gpu.sh
    proc = subprocess.run([sys.executable, "-c", RUNNER, module, *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_train_eval_and_predict_run_without_tensorflow(tmp_path, mnist):
    work = tmp_path / "run"
    proc = run_blocked(tmp_path, "rnnjax", "train", "--steps", "11", "--eval-every", "5",
                       "--hidden-size", "16", "--workdir", str(work))
    assert "final test accuracy: " in proc.stdout
    proc = run_blocked(tmp_path, "rnnjax", "eval", str(work))
    assert "accuracy" in proc.stdout
    digit = tmp_path / "digit.png"
    Image.fromarray(np.asarray(mnist.test_images[0])).save(digit)
    proc = run_blocked(tmp_path, "rnnjax", "predict", str(work), str(digit))
    assert str(digit) in proc.stdout


def test_throughput_benchmark_runs_without_tensorflow(tmp_path):
    run_blocked(tmp_path, "benchmarks.throughput", "--batch-sizes", "8", "--unrolls", "1",
                "--repeats", "1", "--steps-per-call", "5", "--cells", "simple_rnn",
                "--out", str(tmp_path / "tp"))
    result = json.loads((tmp_path / "tp" / "throughput.json").read_text())
    rows = result["rows"]
    assert [(r["batch"], r["unroll"]) for r in rows] == [(8, 1)]
    assert rows[0]["ms_per_step"] > 0
    assert result["environment"]["ops_per_step"]["simple_rnn"]["forward"] > 0


def test_flax_benchmark_runs_without_tensorflow(tmp_path):
    # No full unroll (--max-full-unroll 0): its compiles would double the test's time, and
    # it runs the same code as unroll 1.
    run_blocked(tmp_path, "benchmarks.flax_peers", "--cases", "rows:8", "--cells", "simple_rnn",
                "--rounds", "1", "--tune-budget", "0", "--steps-per-call", "3",
                "--max-full-unroll", "0", "--out", str(tmp_path / "fp"))
    rows = json.loads((tmp_path / "fp" / "flax_peers.json").read_text())["rows"]
    assert [(r["order"], r["batch"], r["cell"]) for r in rows] == [("rows", 8, "simple_rnn")]
    assert rows[0]["steps/call"] == 3  # given, in place of the 200 this case times by default
    names = ["rnnjax (as rnnjax train)", "flax.linen unroll=1", "flax.nnx unroll=1"]
    assert all(rows[0][f"{name} ms"] > 0 for name in names)
    assert not any("full" in column for column in rows[0])


def test_native_kernels_benchmark_runs_without_tensorflow(tmp_path):
    """As benchmarks/gpu.sh runs it: the default form beside native."""
    run_blocked(tmp_path, "benchmarks.native_kernels", "--cells", "simple_rnn", "--cases",
                "rows:8", "--rounds", "1", "--forms", "default", "--out", str(tmp_path / "nk"))
    (row,) = json.loads((tmp_path / "nk" / "native_kernels.json").read_text())["rows"]
    assert row["native, 8 lanes first-step difference"] <= 1e-5
    assert row["fastest built-in"].startswith("hand_written hoisted, product")


PROBE = """
import importlib.metadata, importlib.util

from rnnjax.config import ConfigError
from rnnjax.data.sources import import_tfds

for name in ("tensorflow", "tensorflow_datasets", "tensorflow.python"):
    assert importlib.util.find_spec(name.split(".")[0]) is None, name
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"{name} was imported")
for dist in ("tensorflow-cpu", "tensorflow-datasets"):
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        raise SystemExit(f"{dist} is listed as installed")
try:
    import_tfds()
except ConfigError as e:
    print("rnnjax says:", e)
else:
    raise SystemExit("rnnjax found tfds")

import contextlib, io

from rnnjax.cli import main

err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(["train", "--source", "tfds", "--steps", "1", "--no-tune", "--workdir", "run"])
print(f"rnnjax train exits {code}, stderr:")
print(err.getvalue(), end="")
"""


def test_the_blocker_hides_tensorflow_that_is_installed(tmp_path):
    """The control of the tests above: without the blocker TensorFlow and tfds import (the
    test install has them); with it, importing them fails, their distributions are not
    listed, and rnnjax's --source tfds says what to install: ``rnnjax train --source tfds``
    in one line, exit 2, nothing written."""
    for name in ("tensorflow", "tensorflow_datasets"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    (tmp_path / "probe_tf.py").write_text(PROBE)
    proc = run_blocked(tmp_path, "probe_tf")
    fix = "; pip install -e '.[tfds]' (or train with --source idx)"
    said = proc.stdout.split("rnnjax says: ")[1].splitlines()[0]
    assert said.startswith("--source tfds needs TensorFlow and tensorflow-datasets (")
    assert said.endswith(fix), said
    train = proc.stdout.split("rnnjax train exits ")[1]
    assert train == f"2, stderr:\nrnnjax: error: {said}\n", train
    assert not (tmp_path / "run").exists()


IDX_RUN = """
import sys

from rnnjax.cli import main

work, digit = sys.argv[1:]
assert main(["train", "--steps", "2", "--eval-every", "2", "--hidden-size", "4",
             "--batch-size", "8", "--compile-cache", "off", "--no-tune", "--workdir",
             work]) == 0
assert main(["eval", work]) == 0
assert main(["predict", work, digit]) == 0
print("tensorflow packages:", sorted({m.split(".")[0] for m in sys.modules
                                     if m.startswith("tensorflow")}))
"""


def test_a_run_of_idx_files_imports_no_tensorflow_that_is_installed(tmp_path, mnist):
    """The tests above hide TensorFlow, where an optional import of it could fall back
    unseen (eval asking tfds for an IDX dataset's shape, say): here it is installed, and
    train, eval and predict of a run of IDX files (one process) import none of it, as the
    README says."""
    for name in ("tensorflow", "tensorflow_datasets"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    digit = tmp_path / "digit.png"
    Image.fromarray(np.asarray(mnist.test_images[0])).save(digit)
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", IDX_RUN, str(tmp_path / "run"), str(digit)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "final test accuracy: " in proc.stdout and str(digit) in proc.stdout
    assert proc.stdout.endswith("tensorflow packages: []\n"), proc.stdout[-300:]


def test_feeds_benchmark_runs_without_tensorflow(tmp_path):
    """The tfds rows are skipped; every row runs the steps per call its name says (with
    --steps below 100 there is no 100-step call), its compile timed apart."""
    proc = run_blocked(tmp_path, "benchmarks.feeds", "--steps", "10", "--rounds", "1",
                       "--out", str(tmp_path / "fd"))
    assert "tfds rows skipped" in proc.stdout
    rows = json.loads((tmp_path / "fd" / "feeds.json").read_text())["rows"]
    assert [r["feed"] for r in rows] == ["1 step/call, host numpy",
                                         "1 step/call, device-resident",
                                         "10 steps/call, device-resident"]
    assert all(r["ms_per_step"] > 0 and r["compile_s"] > 0 for r in rows)
