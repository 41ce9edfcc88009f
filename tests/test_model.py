"""The classifier: exact parameter counts, sequence orders, and Keras 3 as an oracle."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax.cells import scan_cell
from rnnjax.config import Config, ConfigError
from rnnjax.data.pipeline import normalize_host
from rnnjax.model import count_params, make_model, pixel_permutation, to_sequence


def test_seed_model_has_4460_parameters():
    model = make_model(Config())
    params = model.init(jax.random.key(0))
    assert count_params(params) == 4460  # 28*50 + 50*50 + 50 + 50*10 + 10


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"cell": "lstm", "hidden_size": 128}, 4 * (28 * 128 + 128 * 128 + 128) + 1290),
        ({"cell": "gru", "hidden_size": 32}, 3 * (28 * 32 + 32 * 32 + 2 * 32) + 330),
        ({"num_layers": 2}, 3950 + (50 * 50 + 50 * 50 + 50) + 510),
        ({"bidirectional": True}, 2 * 3950 + 100 * 10 + 10),
        ({"order": "pixels"}, (50 + 2500 + 50) + 510),
    ],
)
def test_parameter_counts(changes, expected):
    params = make_model(Config(**changes)).init(jax.random.key(0))
    assert count_params(params) == expected


@pytest.mark.parametrize(("other", "message"), [
    ({"cell": "lstm"}, r"\['rnn'\]\[0\]\['bias'\] of shape \[200\], not \[50\]"),
    ({"hidden_size": 64}, r"\['head'\]\['kernel'\] of shape \[64, 10\], not \[50, 10\]"),
    ({"num_layers": 3}, r"extra \['rnn'\]\[1\]\['bias'\], \['rnn'\]\[1\]\['kernel'\], "
                        r"\['rnn'\]\[1\]\['recurrent_kernel'\] and 3 more"),
    ({"num_classes": 20}, r"\['head'\]\['bias'\] of shape \[20\], not \[10\]"),
    ({"bidirectional": True}, r"no \['rnn'\]\[0\]\['bias'\], .*; extra \['rnn'\]\[0\]"
                              r"\['bwd'\]\['bias'\]"),
])
def test_params_of_another_model_are_one_line(other, message):
    """Another cell or width failed deep inside JAX; more layers or classes than the model
    has ran silently, the model's own num_layers and num_classes ignored."""
    model = make_model(Config())
    params = make_model(Config(**other)).param_shapes()
    images = jax.ShapeDtypeStruct((2, 28, 28), jnp.float32)
    with pytest.raises(ValueError, match=r"^Model: params that are not this model's \("
                                         + message):
        jax.eval_shape(model.apply, params, images)
    assert jax.eval_shape(model.apply, model.param_shapes(), images).shape == (2, 10)


def test_sequence_orders():
    images = jnp.arange(2 * 28 * 28, dtype=jnp.float32).reshape(2, 28, 28)
    rows = to_sequence(images, "rows")
    assert rows.shape == (28, 2, 28)
    np.testing.assert_array_equal(rows[3, 1], images[1, 3])
    pixels = to_sequence(images, "pixels")
    assert pixels.shape == (784, 2, 1)
    np.testing.assert_array_equal(pixels[:, 1, 0], images[1].reshape(-1))
    perm = pixel_permutation(1337)
    np.testing.assert_array_equal(np.sort(perm), np.arange(784))
    np.testing.assert_array_equal(perm, pixel_permutation(1337))
    assert not np.array_equal(perm, pixel_permutation(1))
    permuted = to_sequence(images, "permuted", jnp.asarray(perm))
    np.testing.assert_array_equal(permuted[:, 0, 0], images[0].reshape(-1)[perm])


@pytest.mark.parametrize("order", ["rows", "pixels", "permuted"])
def test_model_sequences_are_what_apply_reads(order):
    """``Model.sequences`` (train_steps' whole-dataset form) is ``to_sequence`` in the
    model's order, permutation included, and ``apply_sequences`` of it gives apply's bits."""
    model = make_model(Config(order=order, hidden_size=8))
    params = model.init(jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (3, 28, 28))
    perm = jnp.asarray(pixel_permutation(1337)) if order == "permuted" else None
    xs = model.sequences(images)
    np.testing.assert_array_equal(xs, to_sequence(images, order, perm))
    assert xs.shape == ((28, 3, 28) if order == "rows" else (784, 3, 1))
    np.testing.assert_array_equal(model.apply(params, images), model.apply_sequences(params, xs))


@pytest.mark.parametrize("fields", [
    {},  # gathered first (the hand-written form)
    {"backward": "native"},  # read where they are by the native layer
    {"backward": "native", "num_layers": 2},  # the first layer's; the second reads its hs
    {"backward": "native", "cell": "lstm", "order": "pixels"},  # 784 steps of 1 feature
    {"backward": "native", "chunks": 3},  # gathered first: a part's steps would be a copy
    {"backward": "native", "bidirectional": True},  # gathered first: read both ways
])
def test_a_batchs_rows_of_the_sequences_give_the_batchs_logits(fields):
    """``apply_sequences(p, xs, rows)`` is ``apply_sequences(p, xs[:, rows])``, bit for bit,
    however the first layer reads them (``Model.reads_rows``)."""
    model = make_model(Config(hidden_size=8, **fields))
    reads = fields == {"backward": "native"} or "num_layers" in fields or "order" in fields
    assert model.reads_rows(5) is reads
    params = model.init(jax.random.key(0))
    xs = model.sequences(jax.random.uniform(jax.random.key(1), (30, 28, 28)))
    rows = jnp.asarray([29, 3, 3, 0, 17], jnp.int32)
    np.testing.assert_array_equal(model.apply_sequences(params, xs, rows),
                                  model.apply_sequences(params, xs[:, rows]))
    with pytest.raises(ValueError, match=r"rows int32 of shape \(5, 1\).*int32 \[B\]"):
        model.apply_sequences(params, xs, rows[:, None])
    with pytest.raises(ValueError, match=r"rows float32 of shape \(5,\)"):
        model.apply_sequences(params, xs, rows.astype(jnp.float32))
    if model.backward != "native" or model.chunks > 1:  # scan_cell itself refuses them
        with pytest.raises(ValueError, match="read by the native form in one part only"):
            scan_cell(model.cell, params["rnn"][0], xs, rows=rows, chunks=model.chunks,
                      backward=model.backward)


def test_bad_shapes_name_what_the_model_reads():
    model = make_model(Config(hidden_size=8))
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"images of shape \(3, 28, 27\).*\[B, 28, 28, 1\]"):
        model.apply(params, jnp.zeros((3, 28, 27)))
    with pytest.raises(ValueError, match=r"sequences of shape \(3, 28, 28\).*\[28, B, 28\]"):
        model.apply_sequences(params, jnp.zeros((3, 28, 28)))  # batch-major
    with pytest.raises(ValueError, match=r"sequences of shape \(28, 3, 1\).*\[28, B, 28\]"):
        model.apply_sequences(params, jnp.zeros((28, 3, 1)))
    # uint8 pixels not yet scaled: trained on as 0..255, silently (rnnjax.flax refused them)
    for apply in (model.apply, jax.jit(model.apply)):
        with pytest.raises(ValueError, match=r"^Model: images of dtype uint8; give floats in "
                                             r"\[0, 1\] \(uint8 pixels through rnnjax.data."
                                             r"pipeline.normalize_host, or / 255\)"):
            apply(params, jnp.zeros((3, 28, 28), jnp.uint8))


def test_chunks_beyond_the_sequence_are_a_config_error():
    assert make_model(Config(chunks=28)).chunks == 28
    assert make_model(Config(order="pixels", chunks=784)).chunks == 784
    with pytest.raises(ConfigError, match="--chunks 29 exceeds the 28 time steps of --order "
                                          "rows; choose 1 to 28"):
        make_model(Config(chunks=29))
    with pytest.raises(ConfigError, match="--chunks must be at least 1, got 0"):
        Config(chunks=0)


@pytest.mark.parametrize("order", ["rows", "pixels", "permuted"])
def test_apply_shapes_for_every_order(order):
    model = make_model(Config(order=order, hidden_size=8))
    params = model.init(jax.random.key(0))
    logits = model.apply(params, jnp.zeros((3, 28, 28)))
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32


@pytest.mark.parametrize("cell", ["simple_rnn", "lstm", "gru"])
def test_bfloat16_compute_keeps_float32_parameters(cell):
    model = make_model(Config(cell=cell, compute_dtype="bfloat16"))
    params = model.init(jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x = jnp.asarray(np.random.default_rng(0).random((4, 28, 28)), jnp.float32)
    low = model.apply(params, x)
    high = make_model(Config(cell=cell)).apply(params, x)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, high, atol=0.1)
    assert not np.array_equal(low, high)
    # Gradients (the hand-written backward passes included) come back float32, and point
    # where the float32 ones do.
    def loss(m, p):
        return (m.apply(p, x) * jnp.arange(10.0)).sum()

    g_low = jax.grad(lambda p: loss(model, p))(params)
    g_high = jax.grad(lambda p: loss(make_model(Config(cell=cell)), p))(params)
    for a, b in zip(jax.tree.leaves(g_low), jax.tree.leaves(g_high), strict=True):
        assert a.dtype == jnp.float32 and np.isfinite(a).all()
        cosine = float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
        assert cosine > 0.98


@pytest.mark.parametrize(("cell", "backward"), [("simple_rnn", "hand_written"),
                                              ("gru", "autodiff")])
def test_bfloat16_logits_and_their_bias_gradient_sum_in_float32(cell, backward):
    """In bfloat16 the head's product sums in float32 and its bias is added in float32: the
    logits are not rounded to bfloat16's 8 bits, and the bias's gradient (the loss's
    cotangents summed over the batch) is their float32 sum, where a bfloat16 sum of 50 was
    off by 3e-3 to 7e-3 relative (simple_rnn, lstm, gru at hidden 16, 2026-12-08)."""
    model = make_model(Config(cell=cell, hidden_size=8, backward=backward,
                              compute_dtype="bfloat16"))
    params = model.init(jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).random((50, 28, 28)), jnp.float32)
    labels = np.arange(50) % 10

    def loss(p):
        return -jnp.mean(jax.nn.log_softmax(model.apply(p, x))[np.arange(50), labels])

    grad = jax.jit(jax.grad(loss))(params)
    logits = np.asarray(jax.jit(model.apply)(params, x))
    assert not np.array_equal(logits, np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32))
    exp = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    cotangents = exp / exp.sum(axis=1, keepdims=True)
    cotangents[np.arange(50), labels] -= 1
    want = cotangents.sum(axis=0) / 50
    np.testing.assert_allclose(grad["head"]["bias"], want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", ["simple_rnn", "lstm", "gru"])
def test_last_output_from_the_carry_is_bitwise_the_last_step(cell, bidirectional):
    """Reading y_T from the final carries (Cell.last_output, which spares storing the last
    layer's outputs) gives the logits that slicing the outputs gives, bit for bit."""
    model = make_model(Config(cell=cell, hidden_size=8, num_layers=2, bidirectional=bidirectional))
    assert model.cell.last_output is not None
    sliced = dataclasses.replace(model, cell=dataclasses.replace(model.cell, last_output=None))
    params = model.init(jax.random.key(3))
    x = jnp.asarray(np.random.default_rng(3).random((5, 28, 28)), jnp.float32)
    np.testing.assert_array_equal(model.apply(params, x), sliced.apply(params, x))

    def loss(m, p):
        return (m.apply(p, x) * jnp.arange(10.0)).sum()

    jax.tree.map(np.testing.assert_array_equal, jax.grad(lambda p: loss(model, p))(params),
                 jax.grad(lambda p: loss(sliced, p))(params))


def test_same_logits_and_loss_as_keras(mnist):
    """Keras 3 SimpleRNN + Dense on its JAX backend, given our weights, is the oracle."""
    keras = pytest.importorskip("keras")
    assert keras.backend.backend() == "jax"
    model = make_model(Config())
    params = model.init(jax.random.key(7))
    cell, head = params["rnn"][0], params["head"]
    # Non-zero biases so that every weight takes part.
    cell = {**cell, "bias": jnp.linspace(-0.2, 0.2, 50)}
    head = {**head, "bias": jnp.linspace(-0.1, 0.1, 10)}
    params = {"rnn": [cell], "head": head}

    inputs = keras.Input((28, 28))
    hidden = keras.layers.SimpleRNN(50)(inputs)
    logits_layer = keras.layers.Dense(10)
    reference = keras.Model(inputs, logits_layer(hidden))
    reference.layers[1].set_weights(
        [np.asarray(cell["kernel"]), np.asarray(cell["recurrent_kernel"]), np.asarray(cell["bias"])]
    )
    logits_layer.set_weights([np.asarray(head["kernel"]), np.asarray(head["bias"])])

    images = normalize_host(mnist.test_images[:500])
    labels = mnist.test_labels[:500]
    expected = np.asarray(reference(images))
    ours = np.asarray(model.apply(params, jnp.asarray(images)))
    np.testing.assert_allclose(ours, expected, atol=1e-5)

    from rnnjax.train import loss_fn

    keras_loss = keras.losses.CategoricalCrossentropy()(
        keras.utils.to_categorical(labels, 10), keras.activations.softmax(expected)
    )
    our_loss, _ = loss_fn(params, model, jnp.asarray(images), jnp.asarray(labels))
    np.testing.assert_allclose(float(our_loss), float(keras_loss), atol=1e-5)
