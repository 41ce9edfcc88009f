"""The benchmarks refuse a bad flag value before anything is tuned or timed: argparse's one
``error:`` line naming the flag and the fix, exit 2 (``benchmarks.harness``' flag types);
and ``benchmarks/gpu.sh`` runs again into an OUT_DIR an earlier run filled."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import (
    accuracy,
    evaluation,
    flax_peers,
    harness,
    keras_seed,
    native_kernels,
    peers,
    scaling,
    throughput,
)
from rnnjax import tune

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"flax_peers": flax_peers, "throughput": throughput, "peers": peers,
           "accuracy": accuracy, "scaling": scaling, "keras_seed": keras_seed,
           "native_kernels": native_kernels, "evaluation": evaluation}


class Started(Exception):
    """Work (data, tuning, timing, a worker, Keras) began: the flags were let through."""


@pytest.fixture
def no_work(monkeypatch):
    """Each benchmark's first piece of work raises :class:`Started`."""
    def started(*args, **kwargs):
        raise Started

    for target in (flax_peers, peers, throughput, native_kernels):
        monkeypatch.setattr(target, "load_arrays", started)
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
                                           "or more"),
    ("throughput", ["--cell", "foo"], "argument --cell: unknown cell 'foo'"),
    ("peers", ["--batch-sizes", "50,0"], "argument --batch-sizes: '50,0'"),
    ("peers", ["--repeats", "0"], "argument --repeats: '0'"),
    ("peers", ["--flax-cases", "rows:x"], "argument --flax-cases: 'rows:x'"),
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
    errors = [line for line in captured.err.splitlines() if "error: " in line]
    assert len(errors) == 1 and errors[0] == captured.err.splitlines()[-1], captured.err
    assert message in errors[0]
    assert "Traceback" not in captured.err and captured.out == ""


GOOD = [  # the same benchmarks with good values get to their work (the fixture's sentinels)
    ("flax_peers", ["--cases", "rows:50,pixels:8", "--cells", "gru", "--apis", ""]),
    ("throughput", ["--repeats", "1", "--steps-per-call", "0", "--batch-sizes", "8,16",
                    "--cell", "flax.linen:GRUCell"]),
    ("peers", ["--batch-sizes", "50", "--repeats", "1", "--flax-cases", ""]),
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


# -- benchmarks/gpu.sh ---------------------------------------------------------------------

SEED_FLAGS = "--steps 3 --eval-every 2 --hidden-size 8"  # a short run of the seed parts


def gpu_sh(tmp_path: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    """``bash benchmarks/gpu.sh OUT`` with ``python3`` this interpreter, untuned (the suite's
    RNNJAX_TUNE=off)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python3.chmod(python3.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "RNNJAX_TUNE": "off", **env}
    env.pop("OUT", None)  # no bundle
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("timeout") is None, reason="gpu.sh needs coreutils' timeout")
def test_gpu_sh_seed_runs_train_afresh_in_an_out_dir_an_earlier_run_filled(tmp_path):
    """The committed results' seed folders hold an older run's config (rnnjax train refused
    it as another run's records), and a first run of gpu.sh left checkpoints (a second
    refused them: pass --resume): each seed part trains in a fresh workdir, its config and
    summary copied into OUT_DIR, replacing the earlier ones."""
    out = tmp_path / "gpu"
    for name in ("seed_first", "seed_cached"):  # as in benchmarks/results/gpu
        shutil.copytree(ROOT / "benchmarks" / "results" / "gpu" / name, out / name)
    for parts in ("seed_first,seed_cached", "seed_first"):  # into the same OUT_DIR again
        proc = gpu_sh(tmp_path, out, GPU_PARTS=parts, GPU_SEED_FLAGS=SEED_FLAGS)
        for name in parts.split(","):
            assert f"=== {name}: rc 0," in proc.stdout, proc.stdout + proc.stderr
            assert sorted(p.name for p in (out / name).iterdir()) == ["config.json",
                                                                      "summary.json"]
            assert json.loads((out / name / "config.json").read_text())["steps"] == 3
            assert "final test accuracy: " in (out / f"{name}.log").read_text()
        assert "native_kernels" not in proc.stdout  # GPU_PARTS: the seed parts alone


def test_gpu_sh_refuses_a_part_it_does_not_have_writing_nothing(tmp_path):
    proc = gpu_sh(tmp_path, tmp_path / "gpu", GPU_PARTS="seed_first,sead_cached")
    assert proc.returncode == 2
    assert proc.stderr == ("gpu.sh: error: GPU_PARTS names sead_cached; give some of "
                           "seed_first, seed_cached, native_kernels, flax_rows, flax_pixels, "
                           "throughput\n")
    assert not (tmp_path / "gpu").exists()


def test_gpu_sh_time_limits_sum_under_the_device_tools_600_s():
    """Each part's limit, summed: the device tool runs a command for at most 600 s."""
    import re

    text = (ROOT / "benchmarks" / "gpu.sh").read_text()
    limits = [int(n) for n in re.findall(r"^\s*part \w+ (\d+) ", text, re.M)]
    limits += [int(n) for n in re.findall(r"\bseed_\w+:(\d+)\b", text)]
    assert len(limits) == 6 and sum(limits) <= 560
    assert f"({sum(limits)} s in all" in text
