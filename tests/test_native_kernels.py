"""``benchmarks.native_kernels``: the backward 'native' of simple_rnn, lstm and gru built
for 8 and 16 floats per vector, timed against the built-in forms in rnnjax's train step;
``benchmarks.evaluation``: the evaluation each way a run can take it."""

from __future__ import annotations

import json

import pytest

from benchmarks import evaluation, native_kernels


def test_the_benchmark_times_the_native_builds_against_the_built_in_forms(tmp_path):
    native_kernels.main(["--cells", "simple_rnn", "--cases", "rows:8", "--rounds", "1",
                         "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "native_kernels.json").read_text())["rows"]
    assert [(row["cell"], row["batch"]) for row in rows] == [("simple_rnn", 8)]
    for row in rows:
        names = list(native_kernels.configs(row["cell"], "rows", 8))
        assert len(names) == 2 * len(native_kernels.FORMS) + len(native_kernels.LANES)
        assert all(row[f"{name} ms"] > 0 and row[f"{name} compile s"] > 0 for name in names)
        built_in = {name: row[f"{name} ms"] for name in names if not name.startswith("native")}
        fastest = min(built_in, key=built_in.__getitem__)
        assert row["fastest built-in"] == fastest.removeprefix(f"{row['cell']}, ")
        for lanes in native_kernels.LANES:
            assert row[f"native, {lanes} lanes first-step difference"] <= 1e-5
            assert row[f"native, {lanes} lanes speed-up"] == pytest.approx(
                built_in[fastest] / row[f"native, {lanes} lanes ms"])
    table = (tmp_path / "native_kernels.md").read_text()
    assert "native, 8 lanes ms" in table and "fastest built-in" in table


def test_the_evaluation_benchmark_times_every_way_and_they_agree(tmp_path):
    evaluation.main(["--cells", "lstm,gru", "--examples", "64", "--rounds", "2",
                     "--out", str(tmp_path)])
    result = json.loads((tmp_path / "evaluation.json").read_text())
    rows = result["rows"]
    ways = ["XLA, unroll 1", "XLA, full unroll", "native, 8 lanes", "native, 16 lanes"]
    assert [(row["cell"], row["way"]) for row in rows] == [
        (cell, way) for cell in ("lstm", "gru") for way in ways]
    gemm = min(result["environment"]["gemm_gflops"]) * 1e9
    for row in rows:
        assert 0 < row["fastest ms"] <= row["median ms"] <= row["slowest ms"]
        assert row["compile s"] > 0
        # 64 examples, 28 steps, 4 (3) gates of [28 + 50] x 50, and the head once.
        flops = 2 * 64 * (28 * {"lstm": 4, "gru": 3}[row["cell"]] * 78 * 50 + 500)
        assert row["bound ms"] == pytest.approx(flops / gemm * 1e3)
        first = rows[[r["cell"] for r in rows].index(row["cell"])]
        assert row["loss"] == pytest.approx(first["loss"], rel=1e-5)
        assert row["correct"] == first["correct"]
    assert "| lstm | native, 16 lanes |" in (tmp_path / "evaluation.md").read_text()


def test_the_default_form_alone_beside_native(tmp_path, monkeypatch):
    """``--forms default``: the built-in default form (at both unrolls) and native only, as
    a short accelerator session runs it; on a GPU only simple_rnn has native kernels. A
    build whose first step differs (here made to) is timed all the same, marked in its
    row, and the benchmark exits 1 once the results are written."""
    differs = native_kernels.LANES[-1]
    real = native_kernels.first_step_difference
    monkeypatch.setattr(native_kernels, "first_step_difference", lambda config, *rest: (
        0.5 if config.native_lanes == differs else real(config, *rest)))
    with pytest.raises(SystemExit, match=rf"simple_rnn rows 8: native, {differs} lanes"):
        native_kernels.main(["--cells", "simple_rnn", "--cases", "rows:8", "--rounds", "1",
                             "--forms", "default", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "native_kernels.json").read_text())["rows"]
    assert [row[f"native, {lanes} lanes matches"] for lanes in native_kernels.LANES] == \
        [lanes != differs for lanes in native_kernels.LANES]
    assert row[f"native, {differs} lanes first-step difference"] == 0.5
    timed = sorted(key.removesuffix(" best ms") for key in row if key.endswith(" best ms"))
    assert timed == sorted(native_kernels.configs("simple_rnn", "rows", 8,
                                                  forms=native_kernels.FORMS[:1]))
    assert len(timed) == 2 + len(native_kernels.LANES)
    assert native_kernels.native_cells("gpu") == ("simple_rnn",)
    assert native_kernels.native_cells("cpu") == native_kernels.NATIVE
    assert list(native_kernels.configs("simple_rnn", "rows", 8, (8,), ()))[-1:] == \
        ["native, 8 lanes"]


def test_pixel_cases_skip_the_full_unroll():
    assert [name for name in native_kernels.configs("lstm", "pixels", 50)
            if "full" in name] == []


@pytest.mark.parametrize(("flags", "message"), [
    (["--cases", "rows"], "ORDER:BATCH"),
    (["--cases", "rows:0"], "ORDER:BATCH"),
    (["--cases", "words:50"], "ORDER:BATCH"),
    (["--cases", "rows:x"], "ORDER:BATCH"),
    (["--cells", "irnn"], "cells with native kernels on this cpu, of simple_rnn, lstm, gru"),
])
def test_a_bad_flag_is_refused_with_the_form_it_takes(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        native_kernels.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
