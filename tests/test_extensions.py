"""Sequence orders and optimizers of one's own (``rnnjax.orders.ORDERS``,
``rnnjax.optim.OPTIMIZERS``; cells: tests/test_cells.py, test_tune.py): used as their
functions say, refused in one line where they cannot be, and tuned by the tuner's
children."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnnjax import optim, orders, train
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
    # images of several channels: the function is called with the dataset's shape, its
    # positions read in the image flattened row-major, (h * W + w) * C + c
    colour = DataSpec((32, 32, 3))
    assert colour.sequence("columns") == (32, 96)
    assert colour.sequence("patches") == (64, 48)
    rgb = np.random.default_rng(1).random((3, 32, 32, 3), np.float32)
    for order, steps in (("columns", 32), ("patches", 64)):
        model = make_model(Config(order=order), colour)
        positions = orders.ORDERS[order](32, 32, 3)
        sequences = np.asarray(model.sequences(jnp.asarray(rgb)))  # [T, B, F]
        np.testing.assert_array_equal(sequences, rgb.reshape(3, -1)[:, positions]
                                      .transpose(1, 0, 2))
        assert sequences.shape[0] == steps
    np.testing.assert_array_equal(  # the README's columns: column 1, top to bottom
        np.asarray(make_model(Config(order="columns"), colour).sequences(jnp.asarray(rgb)))[1],
        rgb[:, :, 1, :].reshape(3, 96))


def test_an_order_of_jax_numpy_positions_reads_as_numpys(monkeypatch):
    """An order whose function builds its positions with ``jax.numpy`` (int ``[T, F]`` as
    documented): rnnjax calls it inside its own traces (the parameters' shapes, a jitted
    step), where ``jnp.arange`` was a tracer and every use failed, blaming the function."""
    monkeypatch.setitem(orders.ORDERS, "columns", columns)
    monkeypatch.setitem(orders.ORDERS, "columns_jnp",
                        lambda h, w, c: jnp.asarray(columns(h, w, c)) * 1)
    images = jnp.asarray(np.random.default_rng(0).random((3, 28, 28), np.float32))
    numpys, jnps = (make_model(Config(order=order, hidden_size=4))
                    for order in ("columns", "columns_jnp"))
    params = numpys.init(jax.random.key(0))
    assert jnps.param_shapes() == numpys.param_shapes()
    np.testing.assert_array_equal(jax.jit(jnps.apply)(params, images),
                                  jax.jit(numpys.apply)(params, images))


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
    ("below", lambda h, w, c: np.arange(4).reshape(2, 2) - 2, r"returns positions -2 to 1, "
     r"outside the image's 0 to 783"),
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


USERS_MODULE = """
import numpy as np
import optax

def columns(height, width, channels):
    grid = np.arange(height * width * channels).reshape(height, width, channels)
    return grid.transpose(1, 0, 2).reshape(width, height * channels)

def sign_descent(learning_rate, momentum=0.0):
    return optax.chain(optax.trace(decay=momentum), optax.scale_by_sign(),
                       optax.scale_by_learning_rate(learning_rate))
"""


def test_a_registered_order_and_optimizer_are_tuned_by_the_children_and_train(tmp_path):
    """As a cell registered in Python: the tuner's children, fresh processes, import the
    order's and the optimizer's functions from their module beside the script; the run
    records both by name."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "users_parts.py").write_text(USERS_MODULE)
    (tmp_path / "lib" / "run.py").write_text(textwrap.dedent("""
        import sys
        from rnnjax.optim import OPTIMIZERS
        from rnnjax.orders import ORDERS
        import users_parts
        ORDERS["columns"] = users_parts.columns
        OPTIMIZERS["sign_descent"] = users_parts.sign_descent
        from rnnjax.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "lib" / "run.py"), "train", "--order", "columns",
         "--optimizer", "sign_descent", "--optimizer-kwargs", '{"momentum": 0.5}',
         "--hidden-size", "4", "--batch-size", "4", "--steps", "3", "--eval-every", "3",
         "--eval-batch-size", "2048", "--xla-flags=", "--no-huge-pages", "--cpus", "0",
         "--tune-budget", "8", "--compile-cache", "off", "--workdir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "RNNJAX_TUNE": "", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for failed in ("unknown --order", "not an optax optimizer", "Traceback", "cannot be imported"):
        assert failed not in proc.stderr, proc.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["order"], config["optimizer"]) == ("columns", "sign_descent")
    tuning = json.loads((tmp_path / "run" / "summary.json").read_text())["tuning"]
    # Measured; or, on a machine loaded past the budget (a suite beside other work: seen
    # once at ~3x the suite's load), the defaults not timed in it, the children sound.
    assert tuning["mode"] == "measured" or (
        tuning["mode"] == "defaults" and tuning["reason"].startswith(
            "the defaults were not timed in")), tuning


def sign_descent(learning_rate, momentum=0.0):
    """The README's optimizer: signSGD with momentum."""
    return optax.chain(optax.trace(decay=momentum), optax.scale_by_sign(),
                       optax.scale_by_learning_rate(learning_rate))


def test_a_registered_optimizer_is_built_with_the_runs_options_and_steps_as_written(
        monkeypatch):
    """Its options from --optimizer-kwargs, --clip-norm chained before it: two steps of sign
    descent with momentum 0.5 move every parameter by the learning rate, the second against
    the sign of g2 + 0.5 g1, each gradient clipped to the global norm first (signs that
    neither the momentum nor the clipping may leave as they were: the first step alone, sign
    descent's, could show neither)."""
    monkeypatch.setitem(optim.OPTIMIZERS, "sign_descent", sign_descent)
    clip = 1e-3
    config = Config(optimizer="sign_descent", optimizer_kwargs='{"momentum": 0.5}',
                    learning_rate=0.01, clip_norm=clip, hidden_size=8)
    model = make_model(config)
    optimizer = optim.make_optimizer(config)
    state = train.create_state(jax.random.key(0), model, optimizer)
    rng = np.random.default_rng(0)
    batches = [(jnp.asarray(rng.random((4, 28, 28), np.float32)),
                jnp.asarray(rng.integers(0, 10, 4), jnp.int32)) for _ in range(2)]
    step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer))
    grad = jax.grad(lambda p, b: train.loss_fn(p, model, *b)[0])
    clipped = lambda g: jax.tree.map(  # noqa: E731
        lambda x: x * min(1.0, clip / float(optax.tree.norm(g))), g)
    states = [state]
    for batch in batches:
        states.append(step(states[-1], *batch)[0])
    g1, g2 = (grad(states[i].params, batches[i]) for i in range(2))
    leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]  # noqa: E731
    wanted = [np.sign(b + 0.5 * a) for a, b in zip(leaves(clipped(g1)), leaves(clipped(g2)),
                                                   strict=True)]
    for i, signs in enumerate(([np.sign(g) for g in leaves(g1)], wanted)):
        for before, after, sign in zip(leaves(states[i].params), leaves(states[i + 1].params),
                                       signs, strict=True):
            np.testing.assert_allclose(after - before, -0.01 * sign, atol=1e-7)
    unclipped = [np.sign(b + 0.5 * a) for a, b in zip(leaves(g1), leaves(g2), strict=True)]
    no_momentum = [np.sign(b) for b in leaves(g2)]
    for other in (unclipped, no_momentum):
        assert any((w != o).any() for w, o in zip(wanted, other, strict=True))
    assert optim.REGISTRY.registered("sign_descent") == f"{__name__}:sign_descent"


def test_a_factory_of_any_options_gets_them_and_optax_names_are_not_taken(monkeypatch):
    """A factory written ``(learning_rate, **options)`` had every option refused as not
    among its arguments; one registered over an optax name was silently optax's again in a
    process that had not registered it (a resume, rnnjax eval)."""
    seen = {}

    def any_options(learning_rate, **options):
        seen.update(options)
        return optax.sgd(learning_rate, **options)

    monkeypatch.setitem(optim.OPTIMIZERS, "any_options", any_options)
    optim.make_optimizer(Config(optimizer="any_options", optimizer_kwargs='{"momentum": 0.9}',
                                hidden_size=4))
    assert seen == {"momentum": 0.9}
    for name, whose in (("adam", "optax"), ("keras_adam", "rnnjax")):
        monkeypatch.setitem(optim.OPTIMIZERS, name, sign_descent)
        with pytest.raises(ConfigError, match=rf"^--optimizer {name}: registered in "
                                              rf"rnnjax.optim.OPTIMIZERS over {whose}'s of "
                                              r"that name, .* under a name of its own$"):
            optim.make_optimizer(Config(optimizer=name, hidden_size=4))


def legacy_noisy(learning_rate, key=0):
    """Noisy SGD of one's own whose state keeps a legacy uint32 key (``PRNGKey``)."""

    def init(params):
        return {"key": jax.random.PRNGKey(key)}

    def update(updates, state, params=None):
        key, sub = jax.random.split(state["key"])
        return jax.tree.map(lambda g: g + jax.random.normal(sub, g.shape, g.dtype),
                            updates), {"key": key}

    return optax.chain(optax.GradientTransformation(init, update), optax.sgd(learning_rate))


@pytest.mark.parametrize(("factory", "kwargs", "message"), [
    (sign_descent, '{"beta": 0.5}', r"--optimizer-kwargs: sign_descent has no argument\(s\) "
                                    r"\['beta'\]; it takes \['momentum'\]"),
    (lambda learning_rate: optax.sgd(learning_rate), "",
     r"--optimizer sign_descent: its function \(a lambda\) cannot be imported by the "
     r"tuner's child processes"),
    (optax.scale_by_sign, "", r"--optimizer 'sign_descent' takes no learning_rate: not an "
                              r"optimizer"),
    (lambda learning_rate, **options: optax.sgd(learning_rate, **options), '{"beta": 0.5}',
     r"--optimizer sign_descent: --optimizer-kwargs '\{\"beta\": 0.5\}' cannot be built "
     r"\(TypeError: .*beta"),  # **options: the factory judges them
    (lambda learning_rate: optax.stateless(lambda g, p: jax.tree.map(lambda x: x[0], g)),
     "", r"--optimizer sign_descent makes updates that are not the parameters' shapes "
         r"\(\['head'\]\['bias'\] of shape \[\], not \[10\]\): its update must return one "
         r"array of each parameter's shape"),
    (legacy_noisy, "", r"--optimizer sign_descent keeps its random key as uint32 \[2\] "
                       r"\(jax.random.PRNGKey\), which rnnjax cannot tell .* every seed would "
                       r"add the same noise; make the key with jax.random.key\(key\)"),
    (optax.sgd(1e-3), "", r"--optimizer sign_descent: registered in "
                          r"rnnjax.optim.OPTIMIZERS as a GradientTransformationExtraArgs, not a "
                          r"function of learning_rate; register the function: "
                          r"OPTIMIZERS\['sign_descent'\] = my_optimizer \(not "),
])
def test_a_registered_optimizer_that_cannot_work_is_one_line(monkeypatch, tmp_path, capsys,
                                                             factory, kwargs, message):
    monkeypatch.setitem(optim.OPTIMIZERS, "sign_descent", factory)
    args = ["tune" if "lambda" in message else "train", "--optimizer", "sign_descent",
            "--hidden-size", "4", "--batch-size", "4", "--compile-cache", "off",
            "--workdir", str(tmp_path / "run")]
    if "lambda" in message:
        args = args[:-2]  # tune takes no workdir
    if kwargs:
        args += ["--optimizer-kwargs", kwargs]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


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
