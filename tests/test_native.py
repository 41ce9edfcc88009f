"""``rnnjax.native``: the backward 'native' of simple_rnn, lstm and gru, their passes as
XLA:CPU custom calls built here with the machine's C++ compiler, trains as the hand-written
form does."""

from __future__ import annotations

import dataclasses
import errno
import functools
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import optax
import pytest
from conftest import normal

from benchmarks.native_kernels import first_step_difference
from rnnjax import cells, native, train
from rnnjax.config import NATIVE_LANES, Config, ConfigError
from rnnjax.data.pipeline import batch_indices, normalize_host, to_device
from rnnjax.model import Model, evaluation_model, make_model


@pytest.fixture(scope="module")
def device_data(mnist):
    return to_device(mnist)


NATIVE_CELLS = ("simple_rnn", "lstm", "gru")


@pytest.mark.parametrize("cell", NATIVE_CELLS)
@pytest.mark.parametrize(("hidden", "batch", "more"), [
    (20, 7, {}),  # no whole vector of 8, one part (fewer than two row blocks of 4)
    (32, 4, {"num_layers": 2}),  # the lower layer's outputs have a gradient
    (16, 9, {"bidirectional": True, "chunks": 3}),  # reversed, in chunks; parts of 4 and 5
    (50, 50, {"order": "pixels"}),  # 784 steps of one pixel
    (16, 130, {}),  # parts of at most 64 rows: more parts than threads
])
def test_native_takes_the_hand_written_forms_first_step(device_data, cell, hidden, batch,
                                                        more):
    images, labels = device_data.train_images[:batch], device_data.train_labels[:batch]
    reference = Config(cell=cell, hidden_size=hidden, batch_size=batch,
                       backward="hand_written", **more)
    assert first_step_difference(reference.replace(backward="native"), reference, images,
                                 labels) <= 1e-5


@pytest.mark.parametrize("cell", NATIVE_CELLS)
@pytest.mark.parametrize(("hidden", "batch"), [
    (20, 7),  # one whole vector of 16 and 4 floats of the next
    (50, 130),  # the seed's width: 3 whole vectors and 2 floats; more parts than threads
])
def test_native_at_16_lanes_takes_the_hand_written_forms_first_step(device_data, cell, hidden,
                                                                    batch):
    """--native-lanes 16, the other build the tuner times (512-bit vectors): each gate's
    block padded to a multiple of 16 floats."""
    images, labels = device_data.train_images[:batch], device_data.train_labels[:batch]
    reference = Config(cell=cell, hidden_size=hidden, batch_size=batch, backward="hand_written")
    assert first_step_difference(reference.replace(backward="native", native_lanes=16),
                                 reference, images, labels) <= 1e-5


def test_native_lanes_are_8_or_16():
    with pytest.raises(ConfigError, match="--native-lanes 12 is not one of 8, 16"):
        Config(native_lanes=12)
    model = make_model(Config(backward="native", native_lanes=16))
    assert model.native_lanes == 16
    with pytest.raises(ValueError, match="native lanes 4; choose one of 8, 16"):
        cells.simple_rnn(8).native({}, jax.numpy.zeros((2, 1, 1)), None, 4)


@pytest.mark.parametrize("cell", NATIVE_CELLS)
def test_native_gradients_are_the_same_bits_in_every_call(device_data, cell):
    """Each part of the batch sums its own weight gradients, and the parts' sums are added
    in their order: which thread runs which part, and when, changes no bit."""
    config = Config(cell=cell, batch_size=50, backward="native")
    model = make_model(config)
    params = model.init(jax.random.key(0))
    images, labels = device_data.train_images[:50], device_data.train_labels[:50]

    def loss(p):
        logits = model.apply(p, images)
        return -jax.numpy.mean(jax.nn.log_softmax(logits)[np.arange(50), labels])

    grad = jax.jit(jax.grad(loss))
    first = jax.tree.leaves(grad(params))
    for _ in range(20):
        assert all(np.array_equal(a, b) for a, b in zip(first, jax.tree.leaves(grad(params)),
                                                        strict=True))


@pytest.mark.parametrize("cell", NATIVE_CELLS)
def test_native_gradients_are_as_close_to_float64_as_xlas(device_data, cell):
    """Every gradient of the native form's first pixels step is about as close to a float64
    autodiff's as the hand-written form's (relative norm error at most 1.25x its; 1.06x
    the most measured, at 8 lanes and 16 alike). Each part of the batch sums its weight
    gradients over the steps in blocks (native_common.h's BlockSums), then the blocks'
    sums: summed in one run, over 784 steps of 25 rows a part, the bias gradients were
    7.7x (LSTM) and 5.8x (GRU) as far from float64's. A step's rows are summed before
    they are added to a block (add_row_sums): the GRU's bias gradients had been 1.8x. The
    GRU's g = dv @ recurrent^T + dh * z sums the product's terms first: added one by one
    to dh * z, its kernel's gradient was 3.6x (1.4e-6 against 3.9e-7)."""
    images, labels = device_data.train_images[:50], device_data.train_labels[:50]
    config = Config(cell=cell, order="pixels", batch_size=50)

    def gradients(model):
        params = jax.tree.map(lambda p: p.astype(model.compute_dtype), model.init(
            jax.random.key(0)))
        loss = functools.partial(train.loss_fn, model=model, images=images, labels=labels)
        grads = jax.jit(jax.grad(lambda p: loss(p)[0]))(params)
        return {jax.tree_util.keystr(path): np.asarray(leaf, np.float64)
                for path, leaf in jax.tree_util.tree_leaves_with_path(grads)}

    with jax.enable_x64(True):
        exact = gradients(dataclasses.replace(make_model(config.replace(backward="autodiff")),
                                              compute_dtype=jax.numpy.float64))
    xla, ours = (gradients(make_model(config.replace(backward=backward)))
                 for backward in ("hand_written", "native"))
    assert len(exact) == {"simple_rnn": 5, "lstm": 5, "gru": 6}[cell]  # the layer's, the head's

    def error(grads, name):
        return np.linalg.norm(grads[name] - exact[name]) / np.linalg.norm(exact[name])

    for name in exact:
        assert error(ours, name) <= 1.25 * error(xla, name), name


LAYERS = {  # a native layer, its weights' shapes [F = 3, H = 6], its carry's arrays
    "simple_rnn": (native.elman_layer, [(3, 6), (6, 6), (6,)], 1),
    "gru": (native.gru_layer, [(3, 18), (18,), (6, 18), (18,)], 1),
    "lstm": (native.lstm_layer, [(3, 24), (6, 24), (24,)], 2),
}


@pytest.mark.parametrize("cell", NATIVE_CELLS)
def test_no_input_gradient_is_written_where_none_is_asked_for(cell):
    """The backward call's [T, B, ...] gradient for the inputs (dzs, dus) is asked for with
    time dimension 0 where the inputs are data, and the kernel writes none; the weights'
    gradients are the same bits either way."""
    make, shapes, carries = LAYERS[cell]
    layer = make()
    keys = jax.random.split(jax.random.key(0), len(shapes) + 2)
    xs = jax.random.normal(keys[0], (5, 7, 3))
    carry = [jax.random.normal(keys[1], (7, 6))] * carries
    weights = [jax.random.normal(k, s) * 0.3 for k, s in zip(keys[2:], shapes, strict=True)]

    def loss(xs, *weights):
        return jax.numpy.sum(jax.numpy.sin(layer(xs, *weights, *carry)[1]))

    of_weights = jax.jit(jax.grad(lambda *w: loss(xs, *w), range(len(weights))))
    of_all = jax.jit(jax.grad(loss, range(len(weights) + 1)))
    with_inputs = of_all(xs, *weights)
    for a, b in zip(of_weights(*weights), with_inputs[1:], strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.abs(with_inputs[0]).max() > 0

    def first_result(text):  # the backward call's first result type
        call = next(line for line in text.splitlines() if "_backward_" in line)
        return call.split("-> (")[1].split(",")[0]

    assert first_result(of_weights.lower(*weights).as_text()).startswith("tensor<0x7x")
    assert first_result(of_all.lower(xs, *weights).as_text()).startswith("tensor<5x7x")


XLA_LAYERS = {  # the XLA form of each of LAYERS, its arguments in the same order
    "simple_rnn": lambda *args: cells.elman_layer(*args, "tanh", 1),
    "gru": lambda *args: cells.gru_layer(*args, unroll=1),
    "lstm": lambda *args: cells.lstm_layer(*args, unroll=1),
}


@pytest.mark.parametrize("lanes", NATIVE_LANES)
@pytest.mark.parametrize("cell", NATIVE_CELLS)
def test_an_infinite_input_spoils_only_the_gradients_it_spoils_in_xla(cell, lanes):
    """An input of +-inf makes the kernel's gradient NaN in that input's row, in XLA's
    forms and the native ones alike, and leaves every other gradient finite and as XLA's:
    the gates' padding to whole vectors (H = 6 is not a multiple of 8 or 16) stays zero
    where x @ kernel's padding would be inf * 0."""
    make, shapes, carries = LAYERS[cell]
    keys = jax.random.split(jax.random.key(2), len(shapes) + 2)
    xs = jax.random.normal(keys[0], (5, 7, 3)).at[1, 2, 0].set(np.inf)
    carry = [jax.random.normal(keys[1], (7, 6)) * 0.5] * carries
    weights = [jax.random.normal(k, s) * 0.3 for k, s in zip(keys[2:], shapes, strict=True)]

    def gradients(layer):
        def loss(*args):
            hs, *last = layer(*args)
            return jax.numpy.sum(jax.numpy.sin(hs)) + sum(jax.numpy.sum(c) for c in last)

        return jax.jit(jax.grad(loss, range(1 + len(weights) + carries)))(
            xs, *weights, *carry)

    ours, theirs = gradients(make(lanes)), gradients(XLA_LAYERS[cell])
    kernel_row = np.zeros(shapes[0], bool)
    kernel_row[0] = True  # the input's feature 0 was inf
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        spoiled = kernel_row if i == 1 else np.zeros(a.shape, bool)
        np.testing.assert_array_equal(~np.isfinite(b), spoiled)
        np.testing.assert_array_equal(~np.isfinite(a), spoiled, err_msg=f"gradient {i}")
        np.testing.assert_allclose(np.where(spoiled, 0, a), np.where(spoiled, 0, b),
                                   rtol=1e-4, atol=1e-5, err_msg=f"gradient {i}")


@pytest.mark.parametrize("lanes", NATIVE_LANES)
@pytest.mark.parametrize("cell", NATIVE_CELLS)
def test_an_infinite_initial_state_spoils_only_what_it_spoils_in_xla(cell, lanes):
    """An h0 of +-inf (given by a caller: a model starts from zeros) made every gradient of
    the native LSTM NaN, where XLA's form spoils some of the recurrent kernel's: the gates'
    padding of h0 @ recurrent was inf * 0. The same gradients are non-finite as in XLA's
    form, and the others as XLA's."""
    make, shapes, carries = LAYERS[cell]
    keys = jax.random.split(jax.random.key(3), len(shapes) + 2)
    xs = jax.random.normal(keys[0], (5, 7, 3))
    carry = [(jax.random.normal(keys[1], (7, 6)) * 0.5).at[2, 1].set(np.inf)] + \
        [jax.random.normal(keys[1], (7, 6)) * 0.5] * (carries - 1)
    weights = [jax.random.normal(k, s) * 0.3 for k, s in zip(keys[2:], shapes, strict=True)]

    def gradients(layer):
        def loss(*args):
            hs = layer(*args)[0]
            return jax.numpy.sum(jax.numpy.sin(jax.numpy.where(jax.numpy.isfinite(hs), hs, 0)))

        return jax.jit(jax.grad(loss, range(1 + len(weights) + carries)))(
            xs, *weights, *carry)

    ours, theirs = gradients(make(lanes)), gradients(XLA_LAYERS[cell])
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        spoiled = ~np.isfinite(b)
        np.testing.assert_array_equal(~np.isfinite(a), spoiled, err_msg=f"gradient {i}")
        np.testing.assert_allclose(np.where(spoiled, 0, a), np.where(spoiled, 0, b),
                                   rtol=1e-4, atol=1e-5, err_msg=f"gradient {i}")


@pytest.mark.parametrize("lanes", NATIVE_LANES)
@pytest.mark.parametrize("cell", NATIVE_CELLS)
def test_a_batchs_rows_read_in_a_table_are_the_gathered_batchs_bits(cell, lanes):
    """``layer(table, ..., rows=rows)`` reads the batch ``table[:, rows]`` where it is: the
    same outputs and gradients, bit for bit, as the layer on the gathered batch, the
    table's gradient included (added into the rows read, twice where a row is read twice);
    consecutive rows are read in place, others copied part by part."""
    make, shapes, carries = LAYERS[cell]
    layer = make(lanes)
    keys = jax.random.split(jax.random.key(1), len(shapes) + 2)
    table = jax.random.normal(keys[0], (5, 40, 3))
    carry = [jax.random.normal(keys[1], (9, 6))] * carries
    weights = [jax.random.normal(k, s) * 0.3 for k, s in zip(keys[2:], shapes, strict=True)]

    def loss(table, weights, rows, gathered):
        xs, rows = (table[:, rows], None) if gathered else (table, rows)
        hs, *last = layer(xs, *weights, *carry, rows=rows)
        return jax.numpy.sum(hs**2) + sum(jax.numpy.sum(jax.numpy.sin(c)) for c in last)

    of_weights = jax.jit(jax.grad(loss, 1), static_argnums=3)
    of_all = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=3)
    for rows in ([30, 31, 32, 33, 34, 35, 36, 37, 38],  # in order: read in place
                 [4, 39, 4, 0, 17, 18, 2, 25, 4],  # copied, a row read three times
                 [10, 11, 12, 13, 14, 3, 30, 31, 5],  # in order, then not
                 [-3, 1, 2, 3, 4, 5, 6, 7, 99]):  # outside the table: clamped into it
        rows = jax.numpy.asarray(rows, jax.numpy.int32)
        clamped = jax.numpy.clip(rows, 0, 39)  # what gather_sequences reads
        for got, want in ((of_weights(table, weights, rows, False),
                           of_weights(table, weights, clamped, True)),
                          (of_all(table, weights, rows, False),
                           of_all(table, weights, clamped, True))):
            jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize(("xs", "rows", "message"), [
    ((5, 40, 3), (8,), r"rows int32\[8\] for a carry of 9 rows"),
    ((5, 40, 3), None, r"inputs \(5, 40, 3\) for a carry of 9 rows"),
    ((5, 0, 3), (9,), "rows of an empty table"),
    ((40, 3), (9,), r"inputs of shape \(40, 3\)"),
])
def test_rows_that_do_not_fit_the_inputs_are_clear_errors(xs, rows, message):
    make, shapes, _ = LAYERS["simple_rnn"]
    weights = [jax.numpy.zeros(s) for s in shapes]
    rows = None if rows is None else jax.numpy.zeros(rows, jax.numpy.int32)
    with pytest.raises(ValueError, match=message):
        make()(jax.numpy.zeros(xs), *weights, jax.numpy.zeros((9, 6)), rows=rows)
    with pytest.raises(ValueError, match="rows float32"):
        make()(jax.numpy.zeros((5, 40, 3)), *weights, jax.numpy.zeros((9, 6)),
               rows=jax.numpy.zeros(9))


@pytest.mark.parametrize("cell", NATIVE_CELLS)
def test_weights_that_do_not_fit_the_inputs_and_carry_are_clear_errors(cell):
    """The kernels read the features from the inputs and the units from the carry, and
    trust the weights to fit them: a kernel of 5 features where the inputs had 3 was read
    past its end, and its gradient written past its buffer, which crashed the process. Each
    weight's shape is checked first, and so are the carries and an empty batch or
    sequence (an empty batch crashed the backward with a division by zero)."""
    make, shapes, carries = LAYERS[cell]
    xs, carry = jax.numpy.zeros((5, 9, 3)), [jax.numpy.zeros((9, 6))] * carries
    weights = [jax.numpy.zeros(shape) for shape in shapes]
    for layer in (make(), make(final=True)):
        layer(xs, *weights, *carry)  # fits
        for i, shape in enumerate(shapes):
            wrong = (5, *shape[1:]) if i == 0 else (*shape[:-1], shape[-1] + 1)
            bad = [*weights[:i], jax.numpy.zeros(wrong), *weights[i + 1:]]
            with pytest.raises(ValueError, match=rf"of shape \({wrong[0]}, ?.*a carry of 6 "
                                                 rf"units need \({shape[0]}, ?"):
                layer(xs, *bad, *carry)
        other = "pass \\[B, H\\] each" if carries > 1 else "a carry of 7 units need"
        with pytest.raises(ValueError, match=other):  # c0 unlike h0; or a wider h0
            layer(xs, *weights, *carry[:-1], jax.numpy.zeros((9, 7)))
        for empty_xs, empty_carry in (((0, 9, 3), (9, 6)), ((5, 0, 3), (0, 6))):
            with pytest.raises(ValueError, match="at least one step and one row"):
                layer(jax.numpy.zeros(empty_xs), *weights,
                      *[jax.numpy.zeros(empty_carry)] * carries)


def test_the_kernels_refuse_rows_that_do_not_fit_the_batch():
    """Called past the layer's checks, the kernels check the rows again before they read
    anything: an error naming them, not a read outside the operands."""
    native.register()
    weights = [jax.numpy.zeros(s) for s in LAYERS["simple_rnn"][1]]
    call = jax.ffi.ffi_call(native.targets()["RnnjaxElmanForward"],
                            jax.ShapeDtypeStruct((5, 9, 6), jax.numpy.float32))
    for xs, rows in (((5, 40, 3), 8), ((5, 40, 3), 0), ((5, 0, 3), 9)):
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"rows .* disagree with xs and h0"):
            jax.block_until_ready(call(jax.numpy.zeros(xs), weights[0], weights[2], weights[1],
                                       jax.numpy.zeros((9, 6)),
                                       jax.numpy.zeros(rows, jax.numpy.int32)))


def train_steps_read_rows_as_train_step(mnist, model, optimizer, idx):
    """Checks that ``train.train_steps`` of ``model`` (one that reads its rows,
    ``Model.reads_rows``) over the batches ``idx`` of the set's sequences gives the same
    bits as ``train.train_step`` on each batch's images; ``(state, sequences, labels)``."""
    assert model.reads_rows(idx.shape[1])
    state = train.create_state(jax.random.key(0), model, optimizer)
    step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer))
    one = state
    for row in idx:
        one, _ = step(one, jax.numpy.asarray(normalize_host(mnist.train_images[row])),
                      jax.numpy.asarray(mnist.train_labels[row]))
    steps = jax.jit(functools.partial(train.train_steps, model=model, optimizer=optimizer))
    sequences = model.sequences(jax.numpy.asarray(normalize_host(mnist.train_images)))
    labels = jax.numpy.asarray(mnist.train_labels)
    many, _ = steps(state, sequences, labels, idx)
    jax.tree.map(np.testing.assert_array_equal, one.params, many.params)
    return state, sequences, labels


@pytest.mark.parametrize("shuffle", [False, True])
def test_native_train_steps_read_each_batch_in_the_datasets_sequences(mnist, shuffle):
    """``train.train_steps`` hands the native layer the dataset's sequences and the batch's
    indices (``Model.reads_rows``): the same bits as ``train.train_step`` on each batch's
    images, and the compiled steps hold no gathered [T, B, F] batch."""
    config = Config(backward="native", shuffle=shuffle, seed=3, batch_size=50)
    model, optimizer = make_model(config), optax.adam(1e-3)
    idx = batch_indices(len(mnist.train_labels), 50, 0, 6, shuffle=shuffle, seed=3)
    state, sequences, labels = train_steps_read_rows_as_train_step(mnist, model, optimizer, idx)

    def batches(reads_rows):
        with mock.patch.object(Model, "reads_rows", lambda self, batch: reads_rows):
            fresh = functools.partial(train.train_steps, model=model, optimizer=optimizer)
            text = jax.jit(fresh).lower(state, sequences, labels, idx).compile().as_text()
        # Nothing but the set's own buffer holds its sequences: no copy of them either.
        table = f"= f32[28,{sequences.shape[1]},28]"
        copies = [line for line in text.splitlines() if table in line
                  and not any(op in line for op in ("parameter(", "get-tuple-element(",
                                                    "bitcast("))]
        return text.count("f32[28,50,28]"), copies

    assert batches(True) == (0, [])
    assert batches(False)[0] >= 1


@pytest.mark.parametrize("lanes", NATIVE_LANES)
def test_the_native_tanh_is_within_5_ulps_and_saturates_at_1(lanes):
    """The Elman layer with an identity kernel and no recurrence gives tanh of its inputs
    (the products add exact zeros): within 5 units in the last place of float64's tanh
    (XLA:CPU's approximation: 4.4 at most), and exactly +-1 where tanh rounds to it. Its
    clamp at 7.905, the one for CPUs without FMA, had given 0.99999976 for every larger
    input."""
    hidden = 20  # one whole vector of 16 and 4 floats of the next: tanh_vec and its scalar
    xs = np.linspace(-20, 20, 8 * 25 * hidden, dtype=np.float32).reshape(8, 25, hidden)
    xs[0, 0] = np.geomspace(1e-6, 1e-2, hidden)  # below 4e-4, tanh(x) is x
    hs, _ = native.elman_layer(lanes)(xs, np.eye(hidden, dtype=np.float32),
                                      np.zeros((hidden, hidden), np.float32),
                                      np.zeros(hidden, np.float32),
                                      np.zeros((25, hidden), np.float32))
    hs, exact = np.asarray(hs, np.float64), np.tanh(xs.astype(np.float64))
    ulps = np.abs(hs - exact) / np.spacing(exact.astype(np.float32))
    assert ulps.max() <= 5, (ulps.max(), xs.flat[ulps.argmax()])
    saturated = np.abs(xs) >= 9.02  # tanh's float32 rounding is +-1 from 9.011 on
    np.testing.assert_array_equal(hs[saturated], np.sign(xs[saturated]))


@pytest.mark.parametrize("lanes", NATIVE_LANES)
def test_every_leftover_block_of_the_products_sums_as_the_scan_does(lanes):
    """The products run in register blocks of R rows by V vectors (3 x 7 or 6 x 4 on
    AVX-512, 2 x 7 on AVX2), and the rows and vectors left over as one smaller block: batches
    of 1 to 11 rows (one part each where a part holds fewer than two blocks: every leftover
    row count) at the seed's 50 units, and 1 to 7 vectors of columns at 7 rows, against the
    Elman layer's scan: outputs and every gradient."""
    def loss(xs, kernel, recurrent, bias, h0, run):
        hs, h_last = run(xs, kernel, recurrent, bias, h0)
        return jax.numpy.sum(jax.numpy.sin(hs)) + jax.numpy.sum(h_last * h_last)

    def scan(xs, kernel, recurrent, bias, h0):
        return cells.elman_layer(xs, kernel, recurrent, bias, h0, "tanh", 1)

    layer = native.elman_layer(lanes)
    value_and_grads = jax.jit(jax.value_and_grad(loss, range(5)), static_argnums=5)
    shapes = [(batch, 50) for batch in range(1, 12)]
    shapes += [(7, hidden) for hidden in (3, 12, 20, 28, 37, 45)]
    for batch, hidden in shapes:
        seed = 10 * (batch * 100 + hidden)
        xs = normal(seed, (4, batch, 5))
        params = (normal(seed + 1, (5, hidden), 0.4), normal(seed + 2, (hidden, hidden), 0.2),
                  normal(seed + 3, (hidden,), 0.1), normal(seed + 4, (batch, hidden), 0.5))
        ours, theirs = (value_and_grads(xs, *params, run) for run in (layer, scan))
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, err_msg=f"{batch} x {hidden}")
        for a, b in zip(ours[1], theirs[1], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{batch} x {hidden}")


def test_the_form_and_its_limits():
    for cell in (cells.simple_rnn(8), cells.lstm(8), cells.gru(8)):
        assert cells.resolve_form(cell, 50, "native") == cells.Form("native", "hoisted",
                                                                    "product")
    with pytest.raises(ValueError, match="no native kernels"):
        cells.resolve_form(cells.irnn(8), 50, "native")
    with pytest.raises(ConfigError, match="--cell irnn has no native kernels"):
        make_model(Config(cell="irnn", backward="native"))
    with pytest.raises(ConfigError, match="runs float32, not --compute-dtype bfloat16"):
        make_model(Config(backward="native", compute_dtype="bfloat16"))


def test_without_a_compiler_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "g++" in native.unavailable()
    with pytest.raises(ConfigError, match=r"install g\+\+ .* or choose another --backward"):
        make_model(Config(backward="native"))


def test_the_evaluations_run_the_native_form_or_xlas_at_eval_unroll():
    config = Config(backward="native")
    model = make_model(config)
    assert evaluation_model(config, model) is model
    xla = config.replace(eval_native=False)
    assert evaluation_model(xla, model).backward == "hand_written"
    assert evaluation_model(xla.replace(eval_unroll=0), model).unroll == 0




@pytest.mark.parametrize("lanes", NATIVE_LANES)
@pytest.mark.parametrize("cell", NATIVE_CELLS)
def test_the_final_form_writes_the_last_step_alone_with_the_same_bits(cell, lanes):
    """A layer's ``final`` form (``native.<layer>(lanes, final=True)``, a classifier's last
    layer where no gradient is taken): its forward call's results hold the last step alone,
    [1, B, ...], each step written over the one before, and its carry is the layer's, bit
    for bit, with a batch's rows of a table too; its gradient is the layer's."""
    make, shapes, _ = LAYERS[cell]
    gates = shapes[0][1] // 6  # of LAYERS' H = 6
    steps, batch, features, hidden = 9, 70, 5, 13  # 70 rows: two parts, one past 64 rows
    keys = iter(jax.random.split(jax.random.key(lanes), 9))

    def draw(shape, scale=1.0):
        return jax.random.normal(next(keys), shape) * scale

    xs, table = draw((steps, batch, features)), draw((steps, 200, features))
    rows = jax.random.randint(next(keys), (batch,), 0, 200)
    kernel = draw((features, gates * hidden), 0.5)
    recurrent = draw((hidden, gates * hidden), 0.3)
    bias, h0 = draw((gates * hidden,), 0.1), draw((batch, hidden), 0.2)
    operands = {"simple_rnn": (kernel, recurrent, bias, h0),
                "gru": (kernel, bias, recurrent, bias * 0.5, h0),
                "lstm": (kernel, recurrent, bias, h0, h0 * 0.5)}[cell]
    full, final = make(lanes), make(lanes, final=True)
    for x, r in ((xs, None), (table, rows)):
        text = jax.jit(lambda x, *o, r=r: final(x, *o, rows=r)).lower(x, *operands).compile(
            ).as_text()
        assert f"f32[1,{batch},{hidden}]" in text and f"f32[{steps},{batch},{hidden}]" \
            not in text
        _, *carry = jax.jit(lambda x, *o, r=r: full(x, *o, rows=r))(x, *operands)
        none, *last = jax.jit(lambda x, *o, r=r: final(x, *o, rows=r))(x, *operands)
        assert none is None
        for a, b in zip(carry, last, strict=True):
            np.testing.assert_array_equal(a, b)

        def loss(operands, layer, r=r, x=x):
            return sum(jax.numpy.sum(c * (i + 1.5))
                       for i, c in enumerate(layer(x, *operands, rows=r)[1:]))

        for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(loss), static_argnums=1)(operands, full)),
                        jax.tree.leaves(jax.jit(jax.grad(loss), static_argnums=1)(operands, final)),
                        strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_forward_call_keeps_every_step_or_the_last():
    """The forward call's results hold every step (T) or the last (1), else its error."""
    native.register(native.LANES)
    xs, h0 = np.ones((5, 3, 2), np.float32), np.zeros((3, 4), np.float32)
    call = jax.ffi.ffi_call(native.targets()["RnnjaxElmanForward"],
                            jax.ShapeDtypeStruct((2, 3, 4), np.float32))
    with pytest.raises(Exception, match="a forward's results hold every step"):
        jax.block_until_ready(call(xs, np.ones((2, 4), np.float32), np.zeros(4, np.float32),
                                   np.zeros((4, 4), np.float32), h0, np.zeros(0, np.int32)))


@pytest.mark.parametrize("cell", NATIVE_CELLS)
def test_a_native_model_reads_its_last_layers_final_carry(device_data, cell):
    """Model.apply_sequences runs its last layer in the final form (no [T, B, H] outputs
    written where no gradient is taken; a lower layer's are read): the logits the train
    step's forward computes, bit for bit."""
    model = make_model(Config(cell=cell, backward="native", num_layers=2, hidden_size=12))
    params = model.init(jax.random.key(0))
    xs = model.sequences(device_data.test_images[:40])
    logits = jax.jit(model.apply_sequences)(params, xs)
    trained = jax.jit(lambda p: jax.vjp(lambda q: model.apply_sequences(q, xs), p)[0])(params)
    np.testing.assert_array_equal(logits, trained)
    text = jax.jit(model.apply_sequences).lower(params, xs).compile().as_text()
    assert "f32[1,40,12]" in text and "f32[28,40,12]" in text  # the top's last; the lower's


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = native.build(native.LANES)
    assert first.parent == tmp_path / "rnnjax" / "native" and first.suffix == ".so"
    content = first.read_bytes()
    os.utime(first, (1.0e9, 1.0e9))

    def compile_again(lanes, out):
        raise AssertionError("built again")

    monkeypatch.setattr(native, "_compile", compile_again)
    assert native.build(native.LANES) == first and first.read_bytes() == content
    assert first.stat().st_mtime > time.time() - 600  # stamped as used
    assert list(first.parent.iterdir()) == [first]  # no partial file left behind


def test_a_build_where_the_cache_cannot_be_written_is_removed_at_exit(tmp_path):
    """Built into a temporary directory of its own, which each such process left behind
    (113 KB a process)."""
    (tmp_path / "file").write_text("")
    script = "from rnnjax import native; print(native.build(native.LANES), flush=True)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "file")})
    assert done.returncode == 0, done.stderr
    built = Path(done.stdout.strip())
    assert built.name.startswith(f"native_{native.LANES}_") and built.parent.name.startswith(
        "rnnjax-native-")
    assert not built.parent.exists()


def test_a_build_that_a_full_cache_cannot_take_is_kept_for_the_process(monkeypatch, tmp_path):
    """A full disk under the cache is found only by a write: the library was linked there,
    and the link's "No space left on device" stopped every native run (where a cache that
    cannot be written at all falls back to a directory of the process's own). Here each
    write into the cache fails so."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "rnnjax" / "native"

    def compile_outside(lanes, out):
        if out.parent == cache:
            raise native.NativeError("building the native kernels failed: No space left")
        out.write_bytes(TINY_ELF)

    def full(source, destination, **kwargs):
        if Path(destination).parent == cache:
            raise OSError(errno.ENOSPC, "No space left on device", str(destination))
        return copyfile(source, destination, **kwargs)

    copyfile = native.shutil.copyfile
    monkeypatch.setattr(native, "_compile", compile_outside)
    monkeypatch.setattr(native.shutil, "copyfile", full)
    built = native.build(native.LANES)
    assert built.parent != cache and native.whole(built)
    assert built.read_bytes() == native.sealed(TINY_ELF)
    assert list(cache.iterdir()) == []  # no partial file left behind


def test_the_builds_key_holds_the_compilers_command_line_not_its_paths(monkeypatch):
    """A build is found again by its key: new compiler options (with the sources as they
    were) make a new key, so the cache never serves a library built otherwise; another
    installation's paths to the same JAX's headers do not."""
    key = native._key(native.LANES)
    assert native._key(16) != key
    monkeypatch.setattr(jax.ffi, "include_dir", lambda: "/elsewhere/jaxlib/include")
    assert native._key(native.LANES) == key
    command = native.compile_command

    def with_option(lanes, source, out, include=None):
        return [*command(lanes, source, out, include), "-fno-math-errno"]

    monkeypatch.setattr(native, "compile_command", with_option)
    assert native._key(native.LANES) != key


# The smallest file native.whole takes for a library: an ELF header placing nothing.
TINY_ELF = b"\x7fELF\x02\x01" + bytes(58)


def test_a_new_build_prunes_the_builds_and_partial_files_unused_for_long(monkeypatch,
                                                                          tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_compile", lambda lanes, out: out.write_bytes(TINY_ELF))
    directory = tmp_path / "rnnjax" / "native"
    directory.mkdir(parents=True)
    day, now = 86400, time.time()
    ages = {"native_8_old.so": native.STALE_DAYS + 1, "native_16_used.so": native.STALE_DAYS - 1,
            "tmpstopped.so": 1.5, "tmpbuilding.so": 0.5, "notes.txt": 400}
    for name, days in ages.items():
        (directory / name).write_bytes(b"x")
        os.utime(directory / name, (now - days * day, now - days * day))
    built = native.build(native.LANES)
    assert sorted(path.name for path in directory.iterdir()) == sorted(
        [built.name, "native_16_used.so", "tmpbuilding.so", "notes.txt"])
    # one found in the cache is stamped, not rebuilt, and prunes nothing
    (directory / "native_8_old.so").write_bytes(b"x")
    os.utime(directory / "native_8_old.so", (now - 99 * day, now - 99 * day))
    os.utime(built, (now - 99 * day, now - 99 * day))
    assert native.build(native.LANES) == built and built.stat().st_mtime > now - 600
    assert (directory / "native_8_old.so").exists()
    assert native.prune(directory, built, now) == [directory / "native_8_old.so"]
    # One another process prunes just as this one finds it is built again, not lost.
    real_utime = os.utime

    def pruned_meanwhile(path, *args, **kwargs):
        if Path(path) == built and built.exists():
            built.unlink()
            raise FileNotFoundError(path)
        return real_utime(path, *args, **kwargs)

    monkeypatch.setattr(os, "utime", pruned_meanwhile)
    assert native.build(native.LANES) == built
    assert built.read_bytes() == native.sealed(TINY_ELF)


def test_a_damaged_build_in_the_cache_is_built_again(monkeypatch, tmp_path):
    """A build cut short (renamed into place before it reached the disk, then a crash) or
    truncated since was loaded as it was: "file too short", a traceback, or SIGBUS, the
    process dead with nothing said; and it stayed, so every native run failed so. One
    damaged within its length (a byte changed, a block zeroed) passed as whole: it loaded
    and ran damaged code, or crashed, and was never built again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = native.build(native.LANES)
    content = built.read_bytes()
    assert native.whole(built)
    body = content[:-len(native.SEAL) - 32]
    assert content == native.sealed(body) and body[:4] == b"\x7fELF"
    middle = len(body) // 2
    damaged = tmp_path / "damaged.so"
    for data in (b"", content[:63], content[:len(content) // 2], content[:-1],
                 bytes(len(content)), b"\x7fELF\x01\x01" + content[6:],
                 content[:54] + b"\x08\x00" + content[56:],  # a program header of 8 bytes
                 content[:middle] + bytes([content[middle] ^ 1]) + content[middle + 1:],
                 content[:middle] + bytes(4096) + content[middle + 4096:],  # a zeroed block
                 body):  # not sealed: a build from before builds were sealed
        damaged.write_bytes(data)
        assert not native.whole(damaged), len(data)
    for data in (content[:len(content) // 2], body[:middle] + b"\xff" + body[middle + 1:]):
        built.write_bytes(data)
        assert native.build(native.LANES) == built and native.whole(built)
        assert built.read_bytes() == content
    # One whole() passes that does not load either: register builds it once more.
    built.write_bytes(native.sealed(TINY_ELF))
    script = ("from rnnjax import native; native.register(native.LANES); "
              "print(native.whole(native.build(native.LANES)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0 and done.stdout == "True\n", done.stderr[-2000:]
    assert built.stat().st_size == len(content)


def test_a_damaged_build_in_a_cache_that_cannot_be_written_is_built_apart(monkeypatch,
                                                                           tmp_path):
    """Where the damaged build could not be removed (a read-only cache), build() went on to
    'found in the cache' and returned it: a segfault or SIGBUS, nothing said. It is built
    in the process's own directory, as for a cache that cannot take a new build."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_compile", lambda lanes, out: out.write_bytes(TINY_ELF))
    target = native.build(native.LANES)
    target.write_bytes(native.sealed(TINY_ELF)[:-1])  # damaged
    unlink = Path.unlink

    def read_only(path, *args, **kwargs):
        if Path(path).parent == target.parent:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return unlink(path, *args, **kwargs)

    def no_copy(built, into):
        raise OSError(errno.EROFS, "Read-only file system", str(into))

    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(native, "_copy_into", no_copy)
    built = native.build(native.LANES)
    assert built != target and native.whole(built) and not native.whole(target)
    assert built.read_bytes() == native.sealed(TINY_ELF)


def test_cxx_is_the_compiler_or_an_error_naming_it(monkeypatch):
    """A $CXX not found was passed over for g++ (another compiler than the one asked for),
    and a $CXX of several words (``ccache g++``) was never found."""
    monkeypatch.setenv("CXX", "/opt/typo/clang++")
    with pytest.raises(native.NativeError, match=r"^\$CXX='/opt/typo/clang\+\+': "
                                                 r"/opt/typo/clang\+\+ is not found; set"):
        native.compiler()
    with pytest.raises(ConfigError, match=r"is not found; .* or choose another --backward$"):
        make_model(Config(backward="native"))
    monkeypatch.setenv("CXX", "env g++")
    assert native.compiler() == ["env", "g++"]
    assert native.compile_command(8, Path("a.cc"), Path("a.o"), "include")[:3] == [
        "env", "g++", "-O3"]
    monkeypatch.setenv("CXX", "'g++")
    with pytest.raises(native.NativeError, match="does not parse"):
        native.compiler()


def test_a_native_run_is_read_without_a_compiler_and_its_resume_says_it_needs_one(
        monkeypatch, tmp_path, capsys):
    """eval and predict of a --backward native checkpoint where no C++ compiler is found
    were refused with "choose another --backward", a flag they do not have (its parameters
    are the same in every form); its resume, which keeps --backward, was told the same."""
    from rnnjax import inference
    from rnnjax.cli import main
    from rnnjax.loop import train_and_evaluate

    work = tmp_path / "run"
    config = Config(cell="gru", backward="native", hidden_size=8, steps=6, eval_every=5,
                    batch_size=16, eval_batch_size=2000)
    done = train_and_evaluate(config, work, out=io.StringIO())
    assert inference.load(work).note == "" and inference.load(work).model.backward == "native"
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    loaded = inference.load(work)
    assert loaded.model.backward == "hand_written" and loaded.config.backward == "native"
    assert loaded.note.startswith("run in XLA's hand-written form, not the native kernels")
    assert native.unavailable() in loaded.note  # the reason, $CXX's where it is that
    capsys.readouterr()
    assert main(["eval", str(work), "--out", str(tmp_path / "cm.png")]) == 0
    out, err = capsys.readouterr()
    assert err == f"rnnjax: note: checkpoint {work / 'checkpoints' / '6'}: {loaded.note}\n"
    loss = float(out.splitlines()[1].split()[2])
    assert loss == pytest.approx(done.summary["final_test_loss"], abs=1e-4)
    assert main(["train", "--resume", "--workdir", str(work), "--steps", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rnnjax: error: --resume: the run in {work} trains with --backward "
                          "native, which its resume keeps (another form rounds apart), and "
                          "the native kernels (--backward native) need a C++17 compiler")
    assert err.endswith("; rnnjax eval and predict read its checkpoints without one\n")
    # --no-eval-native: its evaluations ran XLA's form; they still do, with no note.
    xla, note = inference.model_config(config.replace(eval_native=False))
    assert xla.backward == "hand_written" and note == ""


def test_a_failed_build_shows_the_compilers_error(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", (bad,))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(native.NativeError, match=r"building the native kernels failed"
                                                 r"(.|\n)*bad\.cc"):
        native.build(native.LANES)
    cache = tmp_path / "cache" / "rnnjax" / "native"
    assert not cache.exists() or list(cache.iterdir()) == []  # nothing left behind


@pytest.mark.parametrize(("flags", "message"), [
    (["--cell", "irnn"], "--cell irnn has no native kernels (simple_rnn, lstm and gru have)"),
    (["--compute-dtype", "bfloat16"], "runs float32, not --compute-dtype bfloat16"),
])
def test_the_cli_refuses_what_native_cannot_run(flags, message, tmp_path, capsys):
    from rnnjax.cli import main

    code = main(["train", "--backward", "native", "--steps", "2", "--workdir",
                 str(tmp_path / "run"), *flags])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("cell", NATIVE_CELLS)
def test_the_cli_trains_with_native(tmp_path, capsys, cell):
    from rnnjax.cli import main

    assert main(["train", "--backward", "native", "--cell", cell, "--steps", "3",
                 "--eval-every", "2", "--batch-size", "8", "--workdir",
                 str(tmp_path / "run")]) == 0
    assert "final test accuracy" in capsys.readouterr().out
    assert '"backward": "native"' in (tmp_path / "run" / "config.json").read_text()


def test_the_package_ships_every_native_source():
    """A non-editable install builds the library from the installed package's files."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["rnnjax"]
    assert {path.name for path in (*native.SOURCES, native.HEADER)} <= set(shipped)
    # and the PEP 561 marker, without which type checkers skip an installed rnnjax
    assert "py.typed" in shipped and (Path(native.__file__).parent / "py.typed").is_file()
