"""A run's own cell, order and optimizer, recorded with its checkpoints by what they compute
(``rnnjax.probes``), and compared where a checkpoint is read again: another function
registered under the name since is refused on a resume and in eval/predict, in one line;
the same computation under another function passes."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnnjax import cells, checkpoint, inference, model, optim, orders, probes
from rnnjax.cli import main
from rnnjax.config import Config
from rnnjax.data.spec import DataSpec
from rnnjax.loop import train_and_evaluate
from rnnjax.model import make_model
from tests import users_cells  # the README's cell of one's own

# Two steps and a checkpoint; a resume goes on to four (a constant learning rate).
CONFIG = Config(steps=2, eval_every=2, checkpoint_every=2, hidden_size=8, batch_size=8,
                eval_batch_size=5000)


def relu_step(params, h, x):
    """The README cell's step with relu in place of tanh: the same parameters."""
    h = jax.nn.relu(jnp.concatenate([x, h], axis=-1) @ params["w"])
    return h, h


def uniform_init(key, input_size, hidden=8):
    return {"w": jax.random.uniform(key, (input_size + hidden, hidden), minval=-0.1,
                                    maxval=0.1)}


def elman_again(hidden):
    """The README cell, another function: the same computation."""
    return users_cells.with_parts()(hidden)


def columns(height, width, channels):
    grid = np.arange(height * width * channels).reshape(height, width, channels)
    return grid.transpose(1, 0, 2).reshape(width, height * channels)


def columns_right_to_left(height, width, channels):
    return columns(height, width, channels)[::-1]


def columns_again(height, width, channels):
    return np.arange(height * width * channels).reshape(height, width * channels).T.reshape(
        width, height * channels)


def adam(learning_rate):
    return optax.adam(learning_rate)


def adam_slow_momentum(learning_rate):
    return optax.adam(learning_rate, b1=0.5)


def chained_adam(learning_rate):  # optax.adam as its parts: the same updates
    return optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(learning_rate))


def train(workdir, resume=False, **changes):
    return train_and_evaluate(CONFIG.replace(**changes), workdir, resume=resume,
                              progress=False, out=io.StringIO())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run's workdir, trained with a cell, order and optimizer of its own; their names."""
    workdir = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(cells.CELLS, "mine", users_cells.elman)
        m.setitem(orders.ORDERS, "cols", columns)
        m.setitem(optim.OPTIMIZERS, "opt", adam)
        train(workdir, cell="mine", order="cols", optimizer="opt")
    return workdir


@pytest.fixture
def registered(monkeypatch):
    """The functions ``trained`` was trained with, registered as it registered them."""
    monkeypatch.setitem(cells.CELLS, "mine", users_cells.elman)
    monkeypatch.setitem(orders.ORDERS, "cols", columns)
    monkeypatch.setitem(optim.OPTIMIZERS, "opt", adam)
    return {"cell": "mine", "order": "cols", "optimizer": "opt"}


def test_a_resume_with_another_cell_order_or_optimizer_under_the_name_is_refused(
        trained, registered, monkeypatch, tmp_path):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    meta = checkpoint.read_meta(tmp_path / "checkpoints" / "2")
    assert {kind: entry["function"] for kind, entry in meta["probes"].items()} == {
        "cell": "tests.users_cells:elman", "order": "test_probes:columns",
        "optimizer": "test_probes:adam"}
    step_dir = tmp_path / "checkpoints" / "2"
    for table, name, other, says in (
            (cells.CELLS, "mine", users_cells.with_parts(step=relu_step),
             "computes other values"),
            (orders.ORDERS, "cols", columns_right_to_left, "reads other positions of the images"),
            (optim.OPTIMIZERS, "opt", adam_slow_momentum, "computes other values")):
        kind = {"mine": "cell", "cols": "order", "opt": "optimizer"}[name]
        with monkeypatch.context() as m:
            m.setitem(table, name, other)
            with pytest.raises(checkpoint.CheckpointError) as e:
                train(tmp_path, resume=True, steps=4, **registered)
            message = str(e.value)
            assert message.startswith(
                f"checkpoint {step_dir} was trained with --{kind} {name} = "), message
            assert f"and --{kind} {name} here (" in message and says in message, message
            assert "register " in message and f" as {name} before you resume or evaluate it" \
                in message, message
            assert "\n" not in message
    assert checkpoint.list_steps(tmp_path / "checkpoints") == [2]  # nothing written
    # The same computations as other functions (and a cell of another initialiser): on.
    monkeypatch.setitem(cells.CELLS, "mine", users_cells.with_parts(init=uniform_init))
    monkeypatch.setitem(orders.ORDERS, "cols", columns_again)
    monkeypatch.setitem(optim.OPTIMIZERS, "opt", chained_adam)
    assert int(train(tmp_path, resume=True, steps=4, **registered).state.step) == 4


def test_eval_and_predict_refuse_a_cell_or_order_changed_but_not_an_optimizer(
        trained, registered, monkeypatch, capsys):
    tmp_path = trained  # read only
    monkeypatch.setitem(optim.OPTIMIZERS, "opt", adam_slow_momentum)  # evaluation runs none
    assert inference.load(tmp_path).config.cell == "mine"
    monkeypatch.setitem(orders.ORDERS, "cols", columns_right_to_left)
    with pytest.raises(checkpoint.CheckpointError, match=r"--order cols = test_probes:columns"):
        inference.load(tmp_path)
    edited = types.FunctionType(columns_right_to_left.__code__, globals(), "columns")
    edited.__qualname__ = columns.__qualname__  # columns, its code edited since it trained
    monkeypatch.setitem(orders.ORDERS, "cols", edited)
    with pytest.raises(checkpoint.CheckpointError, match=(
            r"test_probes:columns computes otherwise than when it trained: give it back the "
            r"code it was trained with before you resume or evaluate it, or train into")):
        inference.load(tmp_path)
    monkeypatch.setitem(orders.ORDERS, "cols", columns)
    monkeypatch.setitem(cells.CELLS, "mine", users_cells.with_parts(step=relu_step))
    capsys.readouterr()
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--cell mine = tests.users_cells:elman" in err and "computes other values" in err
    assert len(err.splitlines()) == 1, err


def simple_relu(hidden):
    """rnnjax's simple_rnn with relu for tanh: its parameters, another computation."""
    return cells._elman(hidden, "relu", cells.orthogonal)


def test_a_cell_over_a_built_in_name_is_compared_with_rnnjaxs_own(monkeypatch, tmp_path):
    # trained as the user's over simple_rnn, read where simple_rnn is rnnjax's again
    with monkeypatch.context() as m:
        m.setitem(cells.CELLS, "simple_rnn", simple_relu)
        train(tmp_path / "users")
    with pytest.raises(checkpoint.CheckpointError, match=(
            r"trained with --cell simple_rnn = test_probes:simple_relu, and --cell simple_rnn "
            r"here \(rnnjax's own\) computes other values .*: register "
            r"test_probes:simple_relu as simple_rnn before you resume or evaluate it")):
        inference.load(tmp_path / "users")
    # trained as rnnjax's own, read where the user's is registered over it
    train(tmp_path / "own")
    assert checkpoint.read_meta(tmp_path / "own" / "checkpoints" / "2")["probes"] == {}
    monkeypatch.setitem(cells.CELLS, "simple_rnn", simple_relu)
    with pytest.raises(checkpoint.CheckpointError, match=(
            r"trained with --cell simple_rnn = rnnjax's own, and --cell simple_rnn here "
            r"\(test_probes:simple_relu\) .*: register yours under another name than "
            r"simple_rnn")):
        train(tmp_path / "own", resume=True, steps=4)
    # parameters of another layout: the restore names them, and the function trained with
    monkeypatch.setitem(cells.CELLS, "simple_rnn", users_cells.elman)
    with pytest.raises(checkpoint.CheckpointError, match=(
            r"holds the parameters of another model .* run the code it was trained with "
            r"\(--cell simple_rnn = test_probes:simple_relu\)")):
        inference.load(tmp_path / "users")


def lstm_copy(hidden):
    """rnnjax's LSTM registered as one's own (project, sequence, last_output and all)."""
    return cells.BUILT_IN["lstm"](hidden)


def lstm_reading_c(hidden):
    """The same, its last_output reading the cell state c for h: the model's head reads it."""
    return dataclasses.replace(lstm_copy(hidden), last_output=lambda carry: carry[1])


def lstm_scaling_its_sequence(hidden):
    """The same, its sequence (the fused forward that trains and evaluates) scaling its
    outputs and final carry by 1.01: step, project and last_output unchanged."""
    cell = lstm_copy(hidden)

    def sequence(params, xs, carry, *args, **kwargs):
        final, ys = cell.sequence(params, xs, carry, *args, **kwargs)
        return (jax.tree.map(lambda c: c * 1.01, final),
                None if ys is None else ys * 1.01)

    return dataclasses.replace(cell, sequence=sequence)


@pytest.mark.parametrize("changed", [lstm_reading_c, lstm_scaling_its_sequence])
def test_a_changed_last_output_or_sequence_is_refused(monkeypatch, tmp_path, changed):
    """A cell whose ``last_output`` or ``sequence`` alone computes otherwise (its step the
    same) is refused: the probe runs each part the model runs."""
    monkeypatch.setitem(cells.CELLS, "mine", lstm_copy)
    train(tmp_path, cell="mine")
    monkeypatch.setitem(cells.CELLS, "mine", changed)
    with pytest.raises(checkpoint.CheckpointError, match=(
            rf"--cell mine = test_probes:lstm_copy, and --cell mine here "
            rf"\(test_probes:{changed.__name__}\) computes other values")):
        inference.load(tmp_path)


def test_a_checkpoint_without_probes_is_read_and_one_with_broken_ones_is_corrupt(
        trained, registered, monkeypatch, tmp_path):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    monkeypatch.setitem(cells.CELLS, "mine", users_cells.with_parts(step=relu_step))
    meta_file = tmp_path / "checkpoints" / "2" / "meta" / checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    for probes_saved, error in ((None, None), ([1, 2], "is corrupt"),
                                ({"cell": {"probe": []}}, "is corrupt")):
        if probes_saved is None:  # written before rnnjax recorded probes: not compared
            meta.pop("probes")
        else:
            meta["probes"] = probes_saved
        meta_file.write_text(json.dumps(meta))
        if error is None:
            assert inference.load(tmp_path).config.cell == "mine"
        else:
            with pytest.raises(checkpoint.CheckpointError, match=error + ".*probes do not load"):
                inference.load(tmp_path)


def test_built_in_runs_record_nothing_and_probes_are_stable(monkeypatch):
    spec = DataSpec()
    assert probes.record(CONFIG, spec, make_model(CONFIG).param_shapes()) == {}
    monkeypatch.setitem(cells.CELLS, "mine", users_cells.elman)
    monkeypatch.setitem(optim.OPTIMIZERS, "opt", adam)
    config = CONFIG.replace(cell="mine", optimizer="opt")
    shapes = make_model(config).param_shapes()
    first = probes.record(config, spec, shapes)
    assert set(first) == {"cell", "optimizer"}
    assert json.loads(json.dumps(first)) == first == probes.record(config, spec, shapes)
    # a Flax cell class is the user's too
    flax_config = CONFIG.replace(cell="flax.linen:GRUCell")
    assert probes.record(flax_config, spec, make_model(flax_config).param_shapes())[
        "cell"]["function"] == "flax.linen:GRUCell"


def test_a_permuted_run_records_numpys_draw_and_refuses_another(monkeypatch, tmp_path, capsys):
    """``--order permuted`` is rnnjax's own, but NumPy draws its pixel order, and does not
    promise ``Generator.permutation``'s stream across its versions: each checkpoint records
    the draw and the NumPy that made it, and a resume, eval or predict where NumPy draws
    another order from the seed is refused in one line naming that version; nothing is
    written. A checkpoint written before rnnjax recorded the draw is read as it was."""
    train(tmp_path, order="permuted", seed=7)
    step_dir = tmp_path / "checkpoints" / "2"
    meta_file = step_dir / "meta" / checkpoint.META_FILE
    then = np.__version__
    assert checkpoint.read_meta(step_dir)["probes"] == {"order": {
        "function": None, "probe": probes._digest(model.pixel_permutation(7, 784)),
        "numpy": then}}
    assert probes._digest(model.pixel_permutation(7, 784)) != probes._digest(
        model.pixel_permutation(1337, 784))
    assert inference.load(tmp_path).config.order == "permuted"  # the same draw: read
    drawn = model.pixel_permutation
    monkeypatch.setattr(model, "pixel_permutation",  # as another NumPy might draw it
                        lambda seed, size: drawn(seed, size)[::-1].copy())
    monkeypatch.setattr(np, "__version__", "9.0.0")
    message = (f"checkpoint {step_dir} was trained with --order permuted drawn from --seed 7 "
               f"by NumPy {then}, and NumPy 9.0.0 here draws another pixel order from that "
               f"seed: evaluate or resume it under NumPy {then} (pip install "
               f"'numpy=={then}'), or train into another --workdir (the checkpoint is kept "
               "as it is)")
    with pytest.raises(checkpoint.CheckpointError) as e:
        inference.load(tmp_path)
    assert str(e.value) == message
    with pytest.raises(checkpoint.CheckpointError) as e:
        train(tmp_path, resume=True, steps=4, order="permuted", seed=7)
    assert str(e.value) == message
    assert checkpoint.list_steps(tmp_path / "checkpoints") == [2]  # nothing written
    capsys.readouterr()
    assert main(["eval", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(message)
    meta = json.loads(meta_file.read_text())
    del meta["probes"]["order"]  # as a checkpoint of an earlier rnnjax
    meta_file.write_text(json.dumps(meta))
    assert inference.load(tmp_path).config.order == "permuted"


@pytest.mark.parametrize(("new", "differs"), [
    ([1.0, 0.5, -0.25], False),
    ([1.0, 0.5 + 5e-5, -0.25], False),  # within RTOL of the scale (1.0)
    ([1.0, 0.5 + 5e-4, -0.25], True),
    ([1.0, 0.5, -0.25, 0.1], True),
    ([1.0, "nan", -0.25], True),
    (None, True),
])
def test_probes_differ_beyond_their_tolerance(new, differs):
    assert (probes._differ("cell", [1.0, 0.5, -0.25], new) is not None) is differs
    assert probes._differ("cell", [1.0, "nan", "inf"], [1.0, "nan", "inf"]) is None
