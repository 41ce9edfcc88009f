"""Sequence orders of one's own (``rnnjax.orders.ORDERS``): read as their functions say,
refused in one line where they cannot be, and tuned by the tuner's children."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import orders
from rnnjax.cli import main
from rnnjax.config import Config, ConfigError
from rnnjax.data.spec import DataSpec
from rnnjax.model import count_params, make_model, to_sequence


def columns(height: int, width: int, channels: int) -> np.ndarray:
    """The README's order: W steps of H*C, the image read left to right."""
    grid = np.arange(height * width * channels).reshape(height, width, channels)
    return grid.transpose(1, 0, 2).reshape(width, height * channels)


def patches(height: int, width: int, channels: int) -> np.ndarray:
    """4x4 patches, row by row, each a step of 16*C features (28x28: 49 steps of 16)."""
    grid = np.arange(height * width * channels).reshape(height // 4, 4, width // 4, 4,
                                                        channels)
    return grid.transpose(0, 2, 1, 3, 4).reshape((height // 4) * (width // 4), -1)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(orders.ORDERS, "columns", columns)
    monkeypatch.setitem(orders.ORDERS, "patches", patches)


def test_a_registered_order_reads_the_positions_its_function_gives(registered):
    images = jnp.asarray(np.random.default_rng(0).random((3, 28, 28), np.float32))
    model = make_model(Config(order="columns"))
    assert (model.time_steps, model.input_size) == (28, 28)
    np.testing.assert_array_equal(model.sequences(images),
                                  to_sequence(jnp.swapaxes(images, 1, 2), "rows"))
    model = make_model(Config(order="patches"))
    sequences = model.sequences(images)
    assert sequences.shape == (49, 3, 16) and sequences.dtype == jnp.float32
    np.testing.assert_array_equal(sequences[8], images[:, 4:8, 4:8].reshape(3, 16))
    params = model.init(jax.random.key(0))
    assert count_params(params) == 16 * 50 + 50 * 50 + 50 + 510  # input 16 a step
    assert model.apply(params, images).shape == (3, 10)
    # images of several channels: the function is called with the dataset's shape
    assert DataSpec((32, 32, 3)).sequence("columns") == (32, 96)
    assert DataSpec((32, 32, 3)).sequence("patches") == (64, 48)


@pytest.mark.parametrize(("name", "function", "message"), [
    ("diagonal", None, r"unknown --order 'diagonal'; choose rows, pixels, permuted, or one "
                       r"registered in rnnjax.orders.ORDERS"),
    ("rows", columns, r"--order rows: a name of rnnjax's own orders, .* under another name"),
    ("flat", lambda h, w, c: np.arange(h * w * c), r"--order flat: its function, on "
     r"28x28x1 images, returns int64 \[784\], not integer positions \[T, F\]"),
    ("halves", lambda h, w, c: np.zeros((2, 2)) + 0.5, r"returns float64 \[2, 2\], not "
                                                       r"integer positions"),
    ("beyond", lambda h, w, c: np.arange(4).reshape(2, 2) + 782, r"returns positions 782 to "
     r"785, outside the image's 0 to 783"),
    ("broken", lambda h, w, c: 1 / 0, r"its function, on 28x28x1 images, fails "
                                      r"\(ZeroDivisionError: division by zero\)"),
])
def test_an_order_that_cannot_be_read_is_one_line(monkeypatch, name, function, message):
    if function is not None:
        monkeypatch.setitem(orders.ORDERS, name, function)
    with pytest.raises(ConfigError, match=message):
        make_model(Config(order=name))


def test_the_cli_refuses_an_unknown_order_before_anything_is_written(tmp_path, capsys):
    assert main(["train", "--order", "diagonal", "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnjax: error: unknown --order 'diagonal'") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_registered_order_is_tuned_by_the_children_and_trains(tmp_path):
    """As a cell registered in Python: the tuner's children import the order's function
    from its module beside the script; the run records the order by name."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "users_orders.py").write_text(textwrap.dedent("""
        import numpy as np

        def columns(height, width, channels):
            grid = np.arange(height * width * channels).reshape(height, width, channels)
            return grid.transpose(1, 0, 2).reshape(width, height * channels)
    """))
    (tmp_path / "lib" / "run.py").write_text(textwrap.dedent("""
        import sys
        from rnnjax.orders import ORDERS
        import users_orders
        ORDERS["columns"] = users_orders.columns
        from rnnjax.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "lib" / "run.py"), "train", "--order", "columns",
         "--hidden-size", "4", "--batch-size", "4", "--steps", "3", "--eval-every", "3",
         "--eval-batch-size", "2048", "--xla-flags=", "--no-huge-pages", "--cpus", "0",
         "--tune-budget", "8", "--compile-cache", "off", "--workdir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**__import__("os").environ, "RNNJAX_TUNE": "", **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unknown --order" not in proc.stderr and "rnnjax: tuning" in proc.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["order"] == "columns"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tuning"]["mode"] == "measured", summary["tuning"]


def test_an_order_no_child_can_import_is_one_line_before_anything_is_timed(monkeypatch,
                                                                            capsys):
    def in_a_script(height, width, channels):
        return columns(height, width, channels)

    in_a_script.__module__ = "__main__"
    monkeypatch.setitem(orders.ORDERS, "scripted", in_a_script)
    assert main(["tune", "--order", "scripted", "--hidden-size", "4", "--batch-size", "4",
                 "--compile-cache", "off"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("rnnjax: error: --order scripted: its function "
                                              "(registered from the script run as __main__)")
    assert err.endswith("or pass --no-tune")
