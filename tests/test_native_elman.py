"""``benchmarks.native_elman``: the Elman loops as native XLA:CPU custom calls (built here
with the machine's C++ compiler) train as the built-in SimpleRNN does, and the benchmark
times them against it."""

from __future__ import annotations

import json

import jax
import pytest

from benchmarks import native_elman
from rnnjax.config import Config
from rnnjax.data.pipeline import to_device


@pytest.fixture(scope="module")
def native_cells() -> dict[str, float]:
    return native_elman.add_cells()


@pytest.mark.parametrize("lanes", native_elman.LANES)
@pytest.mark.parametrize(("hidden", "batch", "layers"), [(20, 7, 1), (32, 4, 2)])
def test_the_native_cell_takes_the_built_in_cells_first_step(native_cells, mnist, lanes, hidden,
                                                             batch, layers):
    """Widths and batches that fill no whole vector or row block, and two layers (the lower
    one's outputs have a gradient: the backward call that reads it)."""
    device_data = to_device(mnist)
    images, labels = device_data.train_images[:batch], device_data.train_labels[:batch]
    reference = Config(hidden_size=hidden, batch_size=batch, num_layers=layers,
                       backward="hand_written")
    native = reference.replace(cell=native_elman.cell_name(lanes))
    assert native_elman.first_step_difference(native, reference, images, labels) <= 1e-5


def test_the_native_cell_refuses_bfloat16(native_cells):
    cell = native_elman.native_simple_rnn(8, native_elman.LANES[0])
    params = cell.init(jax.random.key(0), 3)
    xs = jax.numpy.zeros((2, 4, 3), jax.numpy.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        cell.sequence(params, xs, cell.initial_carry(4, xs.dtype), 1)


def test_the_benchmark_times_the_native_cells_against_the_built_in_forms(native_cells, tmp_path):
    native_elman.main(["--cases", "rows:8", "--rounds", "1", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "native_elman.json").read_text())["rows"]
    names = list(native_elman.configs("rows", 8))
    assert len(names) == len(native_elman.FORMS) + len(native_elman.LANES)
    assert all(row[f"{name} ms"] > 0 and row[f"{name} compile s"] > 0 for name in names)
    fastest = min(row[f"{name} ms"] for name in names if not name.startswith("native"))
    for lanes in native_elman.LANES:
        assert row[f"native, {lanes} lanes first-step difference"] <= native_elman.TOLERANCE
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


def test_without_a_compiler_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(native_elman.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"g\+\+"):
        native_elman.compiler()


def test_a_failed_build_shows_the_compilers_error(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native_elman, "SOURCE", bad)
    with pytest.raises(RuntimeError, match=r"building bad\.cc failed"):
        native_elman.build(8, tmp_path)
