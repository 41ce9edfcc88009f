"""The benchmarks refuse a bad flag value before anything is tuned or timed: one ``error:``
line naming the flag and the fix (``harness.Parser``: no usage before it), exit 2
(``benchmarks.harness``' flag types, results directory and batch checks); and
``benchmarks/gpu.sh`` runs again into an OUT_DIR an earlier run filled, and refuses one it
cannot write."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import (
    accuracy,
    evaluation,
    feeds,
    flax_peers,
    harness,
    keras_seed,
    native_kernels,
    peers,
    scaling,
    throughput,
)
from rnnjax import tune
from rnnjax.data.idx import Arrays

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"flax_peers": flax_peers, "throughput": throughput, "peers": peers,
           "accuracy": accuracy, "scaling": scaling, "keras_seed": keras_seed,
           "native_kernels": native_kernels, "evaluation": evaluation, "feeds": feeds}


class Started(Exception):
    """Work (data, tuning, timing, a worker, Keras) began: the flags were let through."""


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Each benchmark's first piece of work raises :class:`Started` (after the data, where
    a test loads some: :func:`hundred_examples`); results, if any, under ``tmp_path``."""
    def started(*args, **kwargs):
        raise Started

    monkeypatch.setenv("RNNJAX_BENCH_OUT", str(tmp_path / "results"))
    for target in (flax_peers, peers, throughput, native_kernels, feeds):
        monkeypatch.setattr(target, "load_arrays", started)
    for target in (flax_peers, peers):
        monkeypatch.setattr(target, "to_device", started)
    monkeypatch.setattr(throughput, "ops_table", started)
    monkeypatch.setattr(native_kernels, "build_all", started)
    monkeypatch.setattr(accuracy, "train_and_evaluate", started)
    monkeypatch.setattr(scaling, "accelerators", started)
    monkeypatch.setattr(scaling, "run_worker", started)
    monkeypatch.setattr(evaluation, "gemm_rate", started)
    # keras_seed's Keras import (test_good_flags_reach_the_work checks that it is there)
    monkeypatch.setattr(harness, "without_tensorflow", started, raising=False)
    monkeypatch.setattr(tune, "resolve", started)


BAD = [  # (module, flags, what the error line says)
    ("flax_peers", ["--cases", "rows"], "argument --cases: 'rows': give ORDER:BATCH"),
    ("flax_peers", ["--cases", "rows:x"], "'rows:x': give ORDER:BATCH"),
    ("flax_peers", ["--cases", "rows:0"], "BATCH a positive integer"),
    ("flax_peers", ["--cases", "row:50"], "ORDER rows or pixels"),
    ("flax_peers", ["--cases", "rows:50,permuted:50"], "'permuted:50': give ORDER:BATCH"),
    ("flax_peers", ["--cells", "irnn"], "argument --cells: 'irnn': give some of simple_rnn, "
                                        "lstm, gru"),
    ("flax_peers", ["--cells", "lstm,foo"], "argument --cells: 'lstm,foo'"),
    ("flax_peers", ["--apis", "foo"], "argument --apis: 'foo': give none or some of linen, nnx"),
    ("flax_peers", ["--rounds", "0"], "argument --rounds: '0': give an integer of 1 or more"),
    ("throughput", ["--repeats", "0"], "argument --repeats: '0': give an integer of 1 or more"),
    ("throughput", ["--steps-per-call", "-3"], "argument --steps-per-call: '-3': give an "
                                               "integer of 0 or more"),
    ("throughput", ["--batch-sizes", "0"], "argument --batch-sizes: '0': give integers of 1 "
                                           "or more, comma-separated (e.g. 50,100)"),
    ("throughput", ["--unrolls", "x"], "argument --unrolls: 'x': give integers of 0 or more, "
                                       "comma-separated (e.g. 1,4,0)"),
    ("throughput", ["--cell", "foo"], "argument --cell: unknown cell 'foo'"),
    ("throughput", ["--backends", "cpux"], "argument --backends: 'cpux' is not a backend JAX "
                                           "has here; give some of cpu"),
    ("throughput", ["--backends", "cpu,tpu", "--ops-only"], "argument --backends: 'tpu'"),
    ("peers", ["--batch-sizes", "50,0"], "argument --batch-sizes: '50,0'"),
    ("peers", ["--repeats", "0"], "argument --repeats: '0'"),
    ("peers", ["--flax-cases", "rows:x"], "argument --flax-cases: 'rows:x'"),
    # rnnjax train refuses these budgets; a nan one wrote a NaN record into the tuner's cache
    ("peers", ["--tune-budget", "nan"], "argument --tune-budget: 'nan': give a positive "
                                        "number of seconds, as rnnjax train's --tune-budget"),
    ("peers", ["--tune-budget", "x"], "argument --tune-budget: 'x': give a positive number"),
    ("flax_peers", ["--tune-budget", "inf"], "argument --tune-budget: 'inf': give a positive"),
    ("flax_peers", ["--tune-budget", "-5"], "argument --tune-budget: '-5': give a positive"),
    ("accuracy", ["--cells", "foo"], "argument --cells: unknown cell 'foo'"),
    ("accuracy", ["--row-steps", "0"], "argument --row-steps: '0': give an integer of 1"),
    ("accuracy", ["--orders", "rows,columns"], "argument --orders: 'rows,columns': give some "
                                               "of rows, pixels, permuted"),
    ("scaling", ["--counts", "3", "--batch-size", "8"],
     "--batch-size 8 does not divide over cpu x3; give a multiple of 3"),
    ("scaling", ["--counts", "1,x"], "argument --counts: '1,x'"),
    ("keras_seed", ["--steps", "0"], "argument --steps: '0': give an integer of 1 or more"),
    ("native_kernels", ["--rounds", "0"], "argument --rounds: '0'"),
    ("evaluation", ["--cells", "lstm,flax.linen:GRUCell"], "argument --cells: "
     "'lstm,flax.linen:GRUCell': give some of simple_rnn, irnn, lstm, gru"),
    ("evaluation", ["--examples", "0"], "argument --examples: '0': give an integer of 1"),
    ("evaluation", ["--rounds", "0"], "argument --rounds: '0'"),
]


@pytest.mark.parametrize(("module", "flags", "message"), BAD,
                         ids=[f"{m} {' '.join(f)}" for m, f, _ in BAD])
def test_a_bad_flag_is_one_error_line_and_exit_2(module, flags, message, no_work, capsys):
    with pytest.raises(SystemExit) as exit_info:
        MODULES[module].main(flags)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.err.count("\n") == 1 and " error: " in captured.err, captured.err
    assert message in captured.err and "usage:" not in captured.err
    assert captured.out == ""


GOOD = [  # the same benchmarks with good values get to their work (the fixture's sentinels)
    ("flax_peers", ["--cases", "rows:50,pixels:8", "--cells", "gru", "--apis", ""]),
    ("throughput", ["--repeats", "1", "--steps-per-call", "0", "--batch-sizes", "8,16",
                    "--cell", "flax.linen:GRUCell"]),
    ("throughput", ["--backends", "cpu", "--ops-only"]),
    ("peers", ["--batch-sizes", "50", "--repeats", "1", "--flax-cases", ""]),
    ("peers", ["--batch-sizes", "50", "--tune-budget", "0", "--flax-cases", ""]),
    ("flax_peers", ["--cases", "rows:50", "--tune-budget", "2.5"]),
    ("accuracy", ["--cells", "irnn", "--row-steps", "1"]),
    ("scaling", ["--counts", "1,2", "--batch-size", "8"]),
    ("scaling", ["--counts", "3", "--batch-size", "8", "--weak"]),
    ("keras_seed", ["--steps", "1"]),
    ("native_kernels", ["--cells", "simple_rnn", "--cases", "rows:8"]),
    ("evaluation", ["--cells", "gru", "--examples", "8", "--rounds", "1"]),
]


@pytest.mark.parametrize(("module", "flags"), GOOD,
                         ids=[f"{m} {' '.join(f)}" for m, f in GOOD])
def test_good_flags_reach_the_work(module, flags, no_work):
    """The sentinels above are where each benchmark starts working: a refusal above came
    before any of it."""
    with pytest.raises(Started):
        MODULES[module].main(flags)


def test_the_flag_types_parse_what_they_take():
    assert harness.cases()("rows:50,pixels:1") == [("rows", 50), ("pixels", 1)]
    assert harness.cases(empty=True)("") == []
    assert harness.names(("linen", "nnx"), empty=True)("") == []
    assert harness.ints_at_least(0)("1,0") == [1, 0]
    assert harness.at_least(2)("2") == 2
    assert harness.cell_names("lstm,flax.linen:GRUCell") == ["lstm", "flax.linen:GRUCell"]
    assert harness.tune_budget("0") == 0 and harness.tune_budget("2.5") == 2.5


def one_error_line(exit_info, capsys, quiet: bool = True) -> str:
    """The one ``error:`` line of a refusal (exit 2, no traceback; with ``quiet``, nothing
    on stdout)."""
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    errors = [line for line in captured.err.splitlines() if "error: " in line]
    assert len(errors) == 1 and errors[0] == captured.err.splitlines()[-1], captured.err
    assert "Traceback" not in captured.err and (captured.out == "" or not quiet), captured.out
    return errors[0]


# The benchmarks that write results (benchmarks/results, --out or $RNNJAX_BENCH_OUT), with
# good flags that get them to their work (the no_work fixture's sentinels).
WRITERS = {"flax_peers": [], "throughput": [], "peers": ["--flax-cases", ""],
           "accuracy": ["--row-steps", "1"], "scaling": ["--counts", "1", "--batch-size", "8"],
           "native_kernels": ["--cells", "simple_rnn"], "evaluation": ["--examples", "8"],
           "feeds": []}


@pytest.mark.parametrize("where", ["under a file", "a file", "$RNNJAX_BENCH_OUT", "/proc"])
@pytest.mark.parametrize("module", list(WRITERS))
def test_a_results_directory_that_cannot_be_written_is_refused_first(
        module, where, tmp_path, no_work, monkeypatch, capsys):
    """It was found by ``write_results`` after all the work: a traceback, exit 1, every
    result lost. Now the directory is made and written to before any work."""
    file = tmp_path / "a-file"
    file.write_text("kept\n")
    out = {"under a file": file / "sub", "a file": file, "$RNNJAX_BENCH_OUT": file / "sub",
           "/proc": Path("/proc/rnnjax-bench")}[where]
    flags = list(WRITERS[module])
    if where == "$RNNJAX_BENCH_OUT":
        monkeypatch.setenv("RNNJAX_BENCH_OUT", str(out))
    else:
        flags += ["--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        MODULES[module].main(flags)
    error = one_error_line(exit_info, capsys)
    said = (f"$RNNJAX_BENCH_OUT {out}" if where == "$RNNJAX_BENCH_OUT"
            else f"argument --out: {out}")
    reason = "No such file or directory" if where == "/proc" else f"{file} is a file"
    assert error.endswith(f"error: {said}: cannot write the results there ({reason}); "
                          + ("set $RNNJAX_BENCH_OUT to a directory you can write to, or give "
                             "--out one" if where == "$RNNJAX_BENCH_OUT" else
                             "give --out a directory you can write to")), error
    assert file.read_text() == "kept\n"


@pytest.mark.parametrize("module", list(WRITERS))
def test_the_results_directory_is_made_before_the_work(module, tmp_path, no_work):
    out = tmp_path / "new" / "results"
    with pytest.raises(Started):
        MODULES[module].main([*WRITERS[module], "--out", str(out)])
    assert out.is_dir() and list(out.iterdir()) == []  # the probe's file removed


@pytest.fixture
def hundred_examples(no_work, monkeypatch):
    """A training set of 100 examples, loaded at once; every other work as in no_work."""
    images, labels = np.zeros((100, 28, 28), np.uint8), np.zeros((100,), np.int32)
    arrays = Arrays(images, labels, images[:10], labels[:10])
    for target in (flax_peers, peers, throughput, native_kernels, feeds, scaling):
        monkeypatch.setattr(target, "load_arrays", lambda config: arrays, raising=False)


BIG = [  # a batch larger than the training set (100 examples): (module, flags, error)
    ("flax_peers", ["--cases", "rows:50,pixels:101"], "--cases pixels:101"),
    ("peers", ["--batch-sizes", "50,101", "--flax-cases", ""], "--batch-sizes 101"),
    ("throughput", ["--batch-sizes", "101"], "--batch-sizes 101"),
    ("native_kernels", ["--cells", "simple_rnn", "--cases", "rows:101"], "--cases rows:101"),
    ("scaling", ["--counts", "1", "--batch-size", "101"], "--batch-size 101"),
    ("scaling", ["--counts", "1,2", "--batch-size", "51", "--weak"],
     "--batch-size 51 (--weak: 102 over cpu x2)"),
    ("feeds", ["--batch-size", "101"], "--batch-size 101"),
]


@pytest.mark.parametrize(("module", "flags", "said"), BIG,
                         ids=[f"{m} {' '.join(f)}" for m, f, _ in BIG])
def test_a_batch_larger_than_the_training_set_is_refused_as_rnnjax_train_refuses_it(
        module, flags, said, hundred_examples, capsys):
    """Its batches wrap around, each holding examples twice: rnnjax train refuses it
    ("--batch-size 70000 is larger than the 60000 training examples"), and so do the
    benchmarks that time "rnnjax as rnnjax train" now, as benchmarks.feeds did."""
    with pytest.raises(SystemExit) as exit_info:
        MODULES[module].main(flags)
    assert one_error_line(exit_info, capsys).endswith(
        f"error: {said}: larger than the training set (100 examples); give a batch of at "
        "most 100")


@pytest.mark.parametrize("module", ["flax_peers", "peers", "throughput", "native_kernels",
                                    "scaling"])
def test_a_batch_of_the_whole_training_set_gets_to_the_work(module, hundred_examples):
    flags = {"flax_peers": ["--cases", "rows:100"], "peers": ["--batch-sizes", "100"],
             "throughput": ["--batch-sizes", "100"], "scaling": ["--batch-size", "100",
                                                                 "--counts", "1"],
             "native_kernels": ["--cells", "simple_rnn", "--cases", "rows:100"]}[module]
    with pytest.raises(Started):
        MODULES[module].main(flags)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is None,
                    reason="needs tensorflow-datasets (the tfds extra)")
def test_feeds_refuses_a_tfds_dir_it_cannot_build_in_before_compiling(
        tmp_path, monkeypatch, capsys):
    """A 39-line traceback, exit 1, after compiling the step, was what a --tfds-dir that is
    a file got: the build is made (or found) now, inside ``harness.checked``."""
    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(feeds, "make_model", started)  # the model, then compiling
    file = tmp_path / "a-file"
    file.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        feeds.main(["--tfds-dir", str(file), "--out", str(tmp_path / "out")])
    error = one_error_line(exit_info, capsys, quiet=False)  # tfds' own lines on stdout
    assert "error: --tfds-dir " in error and "cannot write the tfds build of mnist" in error
    assert "pass --tfds-dir a writable directory" in error


def test_a_scaling_worker_that_fails_is_its_own_line_and_the_rows_before_it_are_kept(
        tmp_path, monkeypatch, capsys):
    """A worker's failure was a nested traceback of 28 lines, and the rows of the workers
    before it were lost (written only at the end): now its own error line (its last line,
    where it printed none), exit 2, and the table is written after each worker."""
    real = subprocess.run
    said = {2: "Traceback (most recent call last):\n  File ...\njaxlib.XlaRuntimeError: "
               "RESOURCE_EXHAUSTED: Out of memory allocating 40000000000 bytes.\n",
            4: "usage: scaling.py [-h]\nscaling.py: error: --batch-size 8 does not divide "
               "over 3 devices\n"}

    def worker(cmd, **kwargs):
        if "--worker" not in cmd:
            return real(cmd, **kwargs)
        devices = int(cmd[cmd.index("--worker") + 2])
        if devices in said:
            return subprocess.CompletedProcess(cmd, 1 + (devices == 4), "", said[devices])
        env = {"backend": "cpu", "device_kind": "cpu", "device_count": devices,
               "versions": {"jax": "x"}, "xla_flags": ""}
        row = {"backend": "cpu", "devices": devices, "batch": 8, "samples_per_s": 100.0,
               "ms_per_step": 1.0}
        return subprocess.CompletedProcess(cmd, 0, scaling.MARK + json.dumps([row, env]), "")

    monkeypatch.setattr(scaling.subprocess, "run", worker)
    for counts, line in (
            ("1,2", "the worker of cpu x2 failed (exit 1): jaxlib.XlaRuntimeError: "
                    "RESOURCE_EXHAUSTED: Out of memory allocating 40000000000 bytes."),
            ("1,4", "the worker of cpu x4 failed (exit 2): --batch-size 8 does not divide "
                    "over 3 devices")):
        with pytest.raises(SystemExit) as exit_info:
            scaling.main(["--counts", counts, "--batch-size", "8", "--no-accelerators",
                          "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.splitlines()[-1].endswith(f": error: {line}"), err
        assert "Traceback" not in err and err.count("error: ") == 1, err
        rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
        assert [r["devices"] for r in rows] == [1]  # the worker before it's, written


# -- benchmarks/gpu.sh ---------------------------------------------------------------------

SEED_FLAGS = "--steps 3 --eval-every 2 --hidden-size 8"  # a short run of the seed parts


def gpu_sh(tmp_path: Path, out: Path, cwd: Path | None = None,
           **env: str) -> subprocess.CompletedProcess:
    """``bash benchmarks/gpu.sh OUT`` with ``python3`` this interpreter, untuned (the suite's
    RNNJAX_TUNE=off), run from ``cwd``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python3.chmod(python3.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "RNNJAX_TUNE": "off", **env}
    env.pop("OUT", None)  # no bundle
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("timeout") is None, reason="gpu.sh needs coreutils' timeout")
def test_gpu_sh_seed_runs_train_afresh_in_an_out_dir_an_earlier_run_filled(tmp_path):
    """The committed results' seed folders hold an older run's config (rnnjax train refused
    it as another run's records), and a first run of gpu.sh left checkpoints (a second
    refused them: pass --resume): each seed part trains in a fresh workdir, its config and
    summary copied into OUT_DIR, replacing the earlier ones. A relative OUT_DIR is the
    caller's (it was once taken from the repository's root)."""
    out = tmp_path / "gpu"
    for name in ("seed_first", "seed_cached"):  # as in benchmarks/results/gpu
        shutil.copytree(ROOT / "benchmarks" / "results" / "gpu" / name, out / name)
    for parts in ("seed_first,seed_cached", "seed_first"):  # into the same OUT_DIR again
        given = out if "," in parts else Path(out.name)  # the second time from tmp_path
        proc = gpu_sh(tmp_path, given, cwd=tmp_path, GPU_PARTS=parts,
                      GPU_SEED_FLAGS=SEED_FLAGS)
        for name in parts.split(","):
            assert f"=== {name}: rc 0," in proc.stdout, proc.stdout + proc.stderr
            assert sorted(p.name for p in (out / name).iterdir()) == ["config.json",
                                                                      "summary.json"]
            assert json.loads((out / name / "config.json").read_text())["steps"] == 3
            assert "final test accuracy: " in (out / f"{name}.log").read_text()
        assert "native_kernels" not in proc.stdout  # GPU_PARTS: the seed parts alone
        assert proc.returncode == 0 and proc.stderr == ""
    assert not (ROOT / out.name).exists()


def test_gpu_sh_exits_1_naming_the_parts_that_failed_after_running_the_rest(tmp_path):
    """Its exit status was the last part's grep: 0 with every part but the last failed."""
    out = tmp_path / "gpu"
    proc = gpu_sh(tmp_path, out, GPU_PARTS="seed_first,seed_cached",
                  GPU_SEED_FLAGS="--steps -1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "=== seed_first: rc 2," in proc.stdout and "=== seed_cached: rc 2," in proc.stdout
    assert proc.stderr == ("gpu.sh: error: 2 part(s) failed: seed_first seed_cached; their "
                           f"logs are in {out}\n")
    assert "--steps" in (out / "seed_cached.log").read_text()


def test_gpu_sh_refuses_a_part_it_does_not_have_writing_nothing(tmp_path):
    proc = gpu_sh(tmp_path, tmp_path / "gpu", GPU_PARTS="seed_first,sead_cached")
    assert proc.returncode == 2
    assert proc.stderr == ("gpu.sh: error: GPU_PARTS names sead_cached; give some of "
                           "seed_first, seed_cached, native_kernels, flax_rows, flax_pixels, "
                           "throughput\n")
    assert not (tmp_path / "gpu").exists()


@pytest.mark.parametrize("where", ["under a file", "/proc"])
def test_gpu_sh_refuses_an_out_dir_it_cannot_write_before_any_part(tmp_path, where):
    """Every part failed to write its log, and the script exited 0."""
    file = tmp_path / "a-file"
    file.write_text("")
    out = file / "gpu" if where == "under a file" else Path("/proc/rnnjax-gpu")
    proc = gpu_sh(tmp_path, out, GPU_PARTS="seed_first")
    assert proc.returncode == 2
    assert proc.stderr == (f"gpu.sh: error: cannot write in OUT_DIR {out}; give a directory "
                           "you can write to\n")
    assert proc.stdout == ""  # no part ran, not even the versions' line


def test_gpu_sh_names_every_dependency_the_seed_runs_need():
    """Its header listed jax, flax, optax, orbax and numpy; the seed runs (rnnjax train)
    need Pillow too, for their figures: it names rnnjax's declared dependencies."""
    import re
    import tomllib

    header = "".join(line.lstrip("# ") for line in
                     (ROOT / "benchmarks" / "gpu.sh").read_text().splitlines()[1:20]
                     if line.startswith("#")).lower()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in declared:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower()
        assert name in header, name


def test_gpu_sh_time_limits_sum_under_the_device_tools_600_s():
    """Each part's limit, summed: the device tool runs a command for at most 600 s."""
    import re

    text = (ROOT / "benchmarks" / "gpu.sh").read_text()
    limits = [int(n) for n in re.findall(r"^\s*part \w+ (\d+) ", text, re.M)]
    limits += [int(n) for n in re.findall(r"\bseed_\w+:(\d+)\b", text)]
    assert len(limits) == 6 and sum(limits) <= 560
    assert f"({sum(limits)} s in all" in text


def test_the_scaling_tables_header_names_every_workers_device_count(tmp_path, monkeypatch):
    """The Markdown header was the last worker's environment: a table of 1 and 2 forced CPU
    devices read "x2; XLA_FLAGS=...count=2" for both rows. It names both now; the JSON keeps
    every worker's environment whole."""
    def worker(backend, devices, args):
        flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
        env = {"backend": backend, "device_kind": "cpu", "device_count": devices,
               "versions": {"jax": "x"}, "xla_flags": flags}
        return {"backend": backend, "devices": devices, "batch": 8, "samples_per_s": 100.0,
                "ms_per_step": 1.0}, env

    monkeypatch.setattr(scaling, "run_worker", worker)
    scaling.main(["--counts", "1,2", "--batch-size", "8", "--no-accelerators",
                  "--out", str(tmp_path)])
    header = (tmp_path / "scaling.md").read_text().splitlines()[2]
    assert header.startswith("cpu cpu x1 / 2 (per row); jax x; XLA_FLAGS=none / "
                             "--xla_force_host_platform_device_count=2 (per row)"), header
    env = json.loads((tmp_path / "scaling.json").read_text())["environment"]
    assert [e["device_count"] for e in env["per_row_environment"]] == [1, 2]


def test_results_record_the_peers_versions_and_the_precision_of_the_gemm_rate():
    """Every results file's environment names the installed peers' and plugins' versions
    (Flax's was missing from flax_peers.json, Keras' and PyTorch's from peers.json) and JAX's
    matmul precision; on a GPU at the default precision the "float32 GEMM" rate was TF32's,
    and its label now says so."""
    from importlib import metadata

    versions = harness.environment()["versions"]
    assert versions["flax"] == metadata.version("flax")
    for name in harness.OTHER_PACKAGES:
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        assert versions.get(name) == installed, name
    assert harness.environment()["matmul_precision"] == "default"
    assert throughput.gemm_kind("cpu") == "float32 GEMM"
    assert "TF32" in throughput.gemm_kind("gpu")
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        assert throughput.gemm_kind("gpu") == "float32 GEMM"
        assert harness.environment()["matmul_precision"] == "highest"
    finally:
        jax.config.update("jax_default_matmul_precision", None)
