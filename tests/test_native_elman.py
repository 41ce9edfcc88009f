"""``benchmarks.native_elman``: simple_rnn's backward 'native' built for 8 and 16 floats per
vector, timed against the built-in forms in rnnjax's train step."""

from __future__ import annotations

import json

import pytest

from benchmarks import native_elman


def test_the_benchmark_times_the_native_builds_against_the_built_in_forms(tmp_path):
    native_elman.main(["--cases", "rows:8", "--rounds", "1", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "native_elman.json").read_text())["rows"]
    names = list(native_elman.configs("rows", 8))
    assert len(names) == len(native_elman.FORMS) + len(native_elman.LANES)
    assert all(row[f"{name} ms"] > 0 and row[f"{name} compile s"] > 0 for name in names)
    fastest = min(row[f"{name} ms"] for name in names if not name.startswith("native"))
    for lanes in native_elman.LANES:
        assert row[f"native, {lanes} lanes first-step difference"] <= 1e-5
        assert row[f"native, {lanes} lanes speed-up"] == pytest.approx(
            fastest / row[f"native, {lanes} lanes ms"])
    assert "native, 8 lanes ms" in (tmp_path / "native_elman.md").read_text()


def test_pixel_cases_skip_the_full_unroll():
    assert [name for name in native_elman.configs("pixels", 50) if "full" in name] == []


@pytest.mark.parametrize("case", ["rows", "rows:0", "words:50", "rows:x"])
def test_a_bad_case_is_refused_with_the_form_it_takes(case, capsys):
    with pytest.raises(SystemExit) as exit_info:
        native_elman.main(["--cases", case])
    assert exit_info.value.code == 2
    assert "ORDER:BATCH" in capsys.readouterr().err
