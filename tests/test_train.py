"""The train step: every parameter moves, nothing recompiles, feeds agree, Keras agrees."""

from __future__ import annotations

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnnjax import loop, parallel, train
from rnnjax.config import Config, ConfigError
from rnnjax.data.pipeline import batch_indices, normalize_host
from rnnjax.model import gather_sequences, make_model
from rnnjax.optim import make_optimizer
from tests.jaxprs import equations


def _setup(config: Config):
    model = make_model(config)
    optimizer = make_optimizer(config)
    state = train.create_state(jax.random.key(config.seed), model, optimizer)
    return model, optimizer, state


def _batch(mnist, start, size):
    return (jnp.asarray(normalize_host(mnist.train_images[start : start + size])),
            jnp.asarray(mnist.train_labels[start : start + size]))


@pytest.mark.parametrize("cell", ["simple_rnn", "lstm", "gru", "irnn"])
def test_every_parameter_changes_after_one_step(mnist, cell):
    model, optimizer, state = _setup(Config(cell=cell, hidden_size=16))
    before = jax.tree.map(np.array, state.params)
    step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer))
    new_state, metrics = step(state, *_batch(mnist, 0, 50))
    # Any array left unchanged would mean a parameter cut off from the loss. (Elements
    # can legitimately stay put: input-kernel rows of pixel columns blank in every image.)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, new_state.params)
    assert all(jax.tree.leaves(changed)), changed
    assert int(new_state.step) == 1
    assert int(metrics["count"]) == 50 and np.isfinite(float(metrics["loss_sum"]))


def test_no_recompilation_on_second_step(mnist, xla_compiles):
    """The second and third steps compile nothing, counted in XLA compilations (and the
    jitted function's executables), not in Python traces: one trace compiles again when the
    first call's state is not laid out as the step's outputs are (e.g. not yet committed
    to the devices). Placed and jitted as ``rnnjax.loop`` does: state replicated over the
    mesh, batches split over it, outputs replicated, state donated."""
    config = Config()
    model, optimizer, state = _setup(config)
    dp = parallel.DataParallel.from_config(config)
    state = dp.replicate(state)
    batches = [dp.global_batch(tuple(map(np.asarray, _batch(mnist, start, 50))), 50)
               for start in (0, 50, 100)]
    step = loop._compiled_train(train.train_step, model, optimizer, dp).jitted  # the loop's jit
    state, _ = step(state, *batches[0])
    first = list(xla_compiles)
    assert "jit(train_step)" in first  # the counter sees the step's compilation
    for batch in batches[1:]:
        state, _ = step(state, *batch)
    jax.block_until_ready(state)
    assert xla_compiles == first
    assert step._cache_size() == 1


@pytest.mark.parametrize("fn", ["train_step", "train_steps"])
def test_the_loops_compiled_step_donates_the_state(mnist, fn):
    """The train step as ``rnnjax.loop`` compiles it for every feed
    (``loop._compiled_train``) donates the state: the new state takes its buffers. (The
    test had jitted a step of its own with ``donate_argnums``, which held the loop to
    nothing.)"""
    config = Config()
    model, optimizer, state = _setup(config)
    dp = parallel.DataParallel.from_config(config)
    state = dp.replicate(state)
    kernel = state.params["head"]["kernel"]
    step = loop._compiled_train(getattr(train, fn), model, optimizer, dp)
    images, labels = _batch(mnist, 0, 50)
    if fn == "train_step":
        args = dp.global_batch((np.asarray(images), np.asarray(labels)), 50)
    else:
        args = (model.sequences(images), labels, np.arange(50, dtype=np.int32)[None])
    (new, _), _ = step(state, *args)
    jax.block_until_ready(new)
    assert kernel.is_deleted()


@pytest.mark.parametrize("shuffle, form", [
    (False, {}), (True, {}),
    # Fully unrolled, read a step at a time: each batch gathered step by step.
    (True, {"unroll": 0, "projection": "in_loop", "weight_grad": "per_step"}),
])
def test_k_steps_per_call_equals_one_step_per_call(mnist, shuffle, form):
    config = Config(shuffle=shuffle, seed=3, **form)
    model, optimizer, state = _setup(config)
    assert model.reads_steps_alone(50) == bool(form)
    n = len(mnist.train_labels)
    idx = batch_indices(n, 50, 0, 12, shuffle=shuffle, seed=3)

    step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer))
    one = state
    for row in idx:
        one, _ = step(one, jnp.asarray(normalize_host(mnist.train_images[row])),
                      jnp.asarray(mnist.train_labels[row]))

    chunk = jax.jit(functools.partial(train.train_steps, model=model, optimizer=optimizer))
    sequences = model.sequences(jnp.asarray(normalize_host(mnist.train_images)))
    labels = jnp.asarray(mnist.train_labels)
    many = state
    for part in np.split(idx, [5]):  # 5 then 7 steps per call
        many, sums = chunk(many, sequences, labels, part)
    assert int(many.step) == 12 and int(sums["count"]) == 7 * 50
    # The same bits: each batch gathered time-major from the dataset's sequences is the
    # batch's own images made into sequences, and the step is the same program.
    jax.tree.map(np.testing.assert_array_equal, one.params, many.params)


def test_k_steps_take_numpy_indices_unjitted_and_never_run_past_their_rows(mnist):
    """``train_steps`` as its docstring says, unjitted: NumPy indices from ``batch_indices``
    failed (indexed by the loop's traced row); a count above the K rows ran the last batch
    again, silently, under jit, and is refused where known."""
    model, optimizer, state = _setup(Config(hidden_size=8, batch_size=8))
    sequences = model.sequences(jnp.asarray(normalize_host(mnist.train_images[:64])))
    labels = mnist.train_labels[:64]
    idx = batch_indices(64, 8, 0, 3, shuffle=False, seed=0)  # NumPy int32 [3, 8]
    steps = functools.partial(train.train_steps, model=model, optimizer=optimizer)
    eager, sums = steps(state, sequences, labels, idx)
    assert int(eager.step) == 3 and int(sums["count"]) == 24
    jitted, sums = jax.jit(steps)(state, sequences, jnp.asarray(labels), idx, 7)
    assert int(jitted.step) == 3 and int(sums["count"]) == 24  # a traced count: K at most
    jax.tree.map(np.testing.assert_array_equal, jitted.params, eager.params)
    with pytest.raises(ValueError, match=r"count 4, but indices has 3 rows .* 0 to 3"):
        steps(state, sequences, labels, idx, 4)


def test_indices_out_of_range_are_clamped_for_the_images_and_labels_alike(mnist):
    """``train_steps`` clamps indices outside [0, N) for the labels as the sequences' gather
    clamps them: a -1 had trained image 0 with the label of example N - 1 (jnp wraps a
    negative index), silently."""
    model, optimizer, state = _setup(Config(hidden_size=8, batch_size=3))
    images, labels = normalize_host(mnist.train_images[:100]), mnist.train_labels[:100]
    assert labels[0] != labels[99]
    steps = jax.jit(functools.partial(train.train_steps, model=model, optimizer=optimizer))
    _, sums = steps(state, model.sequences(jnp.asarray(images)), jnp.asarray(labels),
                    np.array([[-1, 5, 200]], np.int32))
    step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer))
    _, clamped = step(state, jnp.asarray(images[[0, 5, 99]]), jnp.asarray(labels[[0, 5, 99]]))
    np.testing.assert_allclose(float(sums["loss_sum"]), float(clamped["loss_sum"]), rtol=1e-6)
    assert int(sums["correct"]) == int(clamped["correct"])


def test_chunked_evaluation_equals_one_pass(mnist):
    model, _, state = _setup(Config())
    images = jnp.asarray(normalize_host(mnist.test_images[:1000]))
    labels = jnp.asarray(mnist.test_labels[:1000])
    whole = train.evaluate(state.params, images, labels, model=model, chunk=1000)
    ragged = train.evaluate(state.params, images, labels, model=model, chunk=300)
    assert int(whole["count"]) == int(ragged["count"]) == 1000
    assert int(whole["correct"]) == int(ragged["correct"])
    np.testing.assert_allclose(float(whole["loss_sum"]), float(ragged["loss_sum"]), rtol=1e-5)


def test_an_empty_set_evaluates_to_zero_sums_and_a_chunk_below_one_is_refused():
    model, _, state = _setup(Config())
    images, labels = jnp.zeros((0, 28, 28)), jnp.zeros((0,), jnp.int32)
    sums = train.evaluate(state.params, images, labels, model=model, chunk=100)
    assert {name: float(value) for name, value in sums.items()} == {
        "loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    with pytest.raises(ValueError, match="chunk 0, the examples evaluated at a time: give "
                                         "at least 1"):
        train.evaluate(state.params, jnp.zeros((3, 28, 28)), labels[:0].repeat(3) + 1,
                       model=model, chunk=0)


@pytest.mark.parametrize("labels, message", [
    (np.zeros((4, 1), np.int32), r"labels of shape \[4, 1\] for 4 examples of 10 classes: "
                                 r"give one integer class per example, int32 \[4\]"),
    (np.eye(10, dtype=np.int32)[[1, 2, 3, 4]],  # Keras' to_categorical, the tutorial's labels
     r"labels of shape \[4, 10\] .* \[4\]: one-hot labels \[N, C\] become classes by "
     r"labels.argmax\(-1\)"),
    (np.zeros(3, np.int32), r"labels of shape \[3\] for 4 examples"),
    (np.zeros(4, np.float32), r"labels of dtype float32: give integer classes, int32 \[4\]"),
])
@pytest.mark.parametrize("call", ["loss_fn", "train_step", "train_steps", "eval_step",
                                  "evaluate"])
def test_labels_that_are_not_one_class_per_example_are_one_line_when_traced(
        labels, message, call):
    """Traced abstractly (``jax.eval_shape``): the error comes before anything compiles;
    int32 [4] passes."""
    model, optimizer, state = _setup(Config())
    images = jnp.zeros((4, 28, 28))

    def traced(labels):
        return jax.eval_shape({
            "loss_fn": lambda: train.loss_fn(state.params, model, images, labels),
            "train_step": lambda: train.train_step(state, images, labels, model=model,
                                                   optimizer=optimizer),
            "train_steps": lambda: train.train_steps(
                state, model.sequences(images), labels, jnp.zeros((2, 4), jnp.int32),
                model=model, optimizer=optimizer),
            "eval_step": lambda: train.eval_step(state.params, images, labels, model=model),
            "evaluate": lambda: train.evaluate(state.params, images, labels, model=model,
                                               chunk=3),
        }[call])

    with pytest.raises(ValueError, match=message):
        traced(labels)
    traced(np.arange(4, dtype=np.int32))


@pytest.mark.parametrize("order", ["rows", "permuted"])
def test_evaluating_sequences_equals_evaluating_images(mnist, order):
    """The loop evaluates the test set's sequences, made once: the same bits as evaluating
    the images, whole or in chunks (the last one padded and masked)."""
    model, _, state = _setup(Config(order=order, hidden_size=8))
    images = jnp.asarray(normalize_host(mnist.test_images[:700]))
    labels = jnp.asarray(mnist.test_labels[:700])
    sequences = model.sequences(images)
    for chunk in (700, 300):
        ours = jax.jit(functools.partial(train.evaluate_sequences, model=model, chunk=chunk))(
            state.params, sequences, labels)
        theirs = train.evaluate(state.params, images, labels, model=model, chunk=chunk)
        assert int(ours["count"]) == 700
        jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    one_batch = train.eval_step(state.params, images[:300], labels[:300], model=model)
    first = train.evaluate_sequences(state.params, sequences[:, :300], labels[:300],
                                     model=model, chunk=300)
    jax.tree.map(np.testing.assert_array_equal, first, one_batch)


def test_keras_adam_trains_like_keras(mnist):
    """Five steps of Keras 3's Adam on its JAX backend and of rnnjax's keras_adam agree."""
    keras = pytest.importorskip("keras")
    config = Config(optimizer="keras_adam")  # Keras' epsilon, 1e-7, by default
    model, optimizer, state = _setup(config)
    cell, head = state.params["rnn"][0], state.params["head"]

    inputs = keras.Input((28, 28))
    rnn = keras.layers.SimpleRNN(50)
    dense = keras.layers.Dense(10, activation="softmax")
    reference = keras.Model(inputs, dense(rnn(inputs)))
    rnn.set_weights([np.asarray(cell[k]) for k in ("kernel", "recurrent_kernel", "bias")])
    dense.set_weights([np.asarray(head["kernel"]), np.asarray(head["bias"])])
    reference.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")

    step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer))
    for i in range(5):
        x, y = _batch(mnist, 50 * i, 50)
        reference.train_on_batch(np.asarray(x), keras.utils.to_categorical(np.asarray(y), 10))
        state, _ = step(state, x, y)
    kernel, recurrent, bias = rnn.get_weights()
    np.testing.assert_allclose(state.params["rnn"][0]["kernel"], kernel, atol=2e-6)
    np.testing.assert_allclose(state.params["rnn"][0]["recurrent_kernel"], recurrent, atol=2e-6)
    np.testing.assert_allclose(state.params["rnn"][0]["bias"], bias, atol=2e-6)
    np.testing.assert_allclose(state.params["head"]["kernel"], dense.get_weights()[0], atol=2e-6)


def test_keras_adams_update_is_called_as_optaxs():
    """optax's protocol names update's arguments (updates, state, params); keras Adam's
    named the first grads, so update(updates=...) was a TypeError."""
    from rnnjax.optim import scale_by_keras_adam

    params = {"w": jnp.array([1.0, -2.0])}
    for tx in (scale_by_keras_adam(), optax.scale_by_adam()):
        updates, state = tx.update(updates=params, state=tx.init(params), params=params)
        assert updates["w"].shape == (2,) and int(state.count if hasattr(state, "count")
                                                   else state[0].count) == 1


def test_keras_adam_differs_from_optax_adam_only_through_epsilon():
    params = {"w": jnp.array([1e-4, -2.0, 3.0])}
    grads = {"w": jnp.array([1e-6, 0.5, -2.0])}
    keras_opt = make_optimizer(Config(optimizer="keras_adam", adam_eps=1e-7))
    optax_opt = optax.adam(1e-3, eps=1e-7)
    k_updates, _ = keras_opt.update(grads, keras_opt.init(params), params)
    o_updates, _ = optax_opt.update(grads, optax_opt.init(params), params)
    np.testing.assert_allclose(k_updates["w"][1:], o_updates["w"][1:], rtol=1e-3)
    assert not np.allclose(k_updates["w"][0], o_updates["w"][0], rtol=1e-2)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optimizer": "nope"}, "not an optax optimizer"),
        ({"optimizer": "adam", "optimizer_kwargs": "{bad"}, "not valid JSON"),
        ({"optimizer": "sgd", "optimizer_kwargs": '{"b9": 1}'}, "has no argument"),
        ({"optimizer": "global_norm"}, "takes no learning_rate"),
        # Failed inside the first compiled step, a traceback: values of the wrong type, an
        # update that needs the loss function.
        ({"optimizer": "sgd", "optimizer_kwargs": '{"momentum": "0.9"}'},
         "cannot update parameters"),
        ({"optimizer": "adamw", "optimizer_kwargs": '{"weight_decay": null}'},
         "cannot update parameters"),
        ({"optimizer": "lbfgs"}, "cannot update parameters .*'value_fn'"),
        ({"optimizer_kwargs": '{"learning_rate": 0.1}'},  # was 'got multiple values'
         "learning_rate is set by --learning-rate"),
        ({"optimizer": "noisy_sgd", "optimizer_kwargs": '{"key": 5}'},
         r"key is drawn from --seed .*; remove it and set --seed"),
        # Arithmetic in optax's own code, a traceback and exit 1 from the CLI.
        ({"optimizer": "radam", "optimizer_kwargs": '{"b2": 1}'},
         r"cannot be built \(ZeroDivisionError: .*\); give each option a value of the type "
         "it takes, within its range"),
        ({"optimizer": "sgd", "optimizer_kwargs": '{"momentum": ' + "1" + "0" * 32 + "}"},
         r"cannot update parameters \(OverflowError"),
        ({"optimizer": "lbfgs", "optimizer_kwargs": '{"linesearch": "x"}'},
         r"cannot be built \(AttributeError"),
        # Infinity was refused by name, 1e400 (the same float) was not.
        ({"optimizer_kwargs": '{"b1": 1e400}'}, "1e400 is inf as a float; give finite numbers"),
        # A mask is true, false or the parameters' tree of them (a string masked all in).
        ({"optimizer": "adamw", "optimizer_kwargs": '{"mask": "no-biases"}'},
         'mask "no-biases" is not true, false or a tree of them'),
        ({"optimizer": "adamw", "optimizer_kwargs": '{"mask": {"kernel": true}}'},
         r'mask \{"kernel": true\} is not the parameters\' tree nor a prefix of it; give '
         r'true/false, or the model\'s parameters\' tree with true/false at its leaves: '
         r'\{"head": \{"bias": true, "kernel": true\}, "rnn": \[\{"bias": true, '
         r'"kernel": true, "recurrent_kernel": true\}\]\}$'),
        ({"optimizer": "adamw", "optimizer_kwargs": '{"mask": {"rnn": "yes"}}'},
         "has leaves other than true and false"),
    ],
)
def test_bad_optimizer_settings_are_clear_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        make_optimizer(Config(**changes))


def test_a_mask_shaped_as_the_models_parameters_is_taken_and_decays_what_it_names():
    """adamw's mask was checked on a made-up tree of two arrays, so a mask of the model's
    own tree was refused: it is checked on the parameters it will update."""
    mask = {"rnn": [{"kernel": True, "recurrent_kernel": True, "bias": False}],
            "head": {"kernel": True, "bias": False}}
    config = Config(hidden_size=4, optimizer="adamw",
                    optimizer_kwargs=json.dumps({"weight_decay": 0.5, "mask": mask}))
    model = make_model(config)
    for optimizer in (make_optimizer(config), make_optimizer(config, model.param_shapes())):
        params = model.init(jax.random.key(0))
        params["head"]["bias"] = jnp.ones_like(params["head"]["bias"])
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = optimizer.update(zeros, optimizer.init(params), params)
        assert not np.any(updates["head"]["bias"])  # not decayed
        assert np.all(updates["head"]["kernel"] == -1e-3 * 0.5 * params["head"]["kernel"])
    with pytest.raises(ConfigError, match="not the parameters' tree"):  # another model's tree
        make_optimizer(config.replace(num_layers=2))
    prefix = config.replace(optimizer_kwargs='{"mask": {"rnn": true, "head": {"kernel": true, '
                            '"bias": false}}}')
    make_optimizer(prefix)  # a prefix of the tree masks whole subtrees
    make_optimizer(config.replace(optimizer_kwargs='{"mask": null}'))  # optax's default: none


def test_a_checkpoints_optimizer_is_rebuilt_with_the_options_its_run_took():
    """eval and predict rebuild a checkpoint's optimizer for its state's tree only: options
    a run took before they were checked (a mask given as a string) do not stop them."""
    from rnnjax.inference import state_shapes

    config = Config(hidden_size=4, optimizer="adamw", optimizer_kwargs='{"mask": "biases"}')
    with pytest.raises(ConfigError, match="is not true, false or a tree of them"):
        make_optimizer(config)
    shapes, _ = state_shapes(config)
    assert jax.tree.structure(shapes.params) == jax.tree.structure(
        make_model(config).param_shapes())


def test_an_optimizers_random_keys_are_drawn_from_the_seed_apart_from_the_parameters():
    """noisy_sgd's noise key was optax's default, 0 whatever --seed (every run drew the same
    noise; optax warns that it will require a key): now the second half of the seed's key
    split, the parameters drawn from the first as before."""
    from rnnjax.loop import initial_state

    model = make_model(Config(hidden_size=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = make_optimizer(Config(optimizer="noisy_sgd"))
    noise = {}
    for seed in (0, 1):
        state = jax.jit(functools.partial(initial_state, model, optimizer))(seed)
        (key,) = [leaf for leaf in jax.tree.leaves(state.opt_state)
                  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)]
        model_key, optimizer_key = jax.random.split(jax.random.key(seed))
        jax.tree.map(np.testing.assert_array_equal, state.params, model.init(model_key))
        noise[seed] = np.asarray(jax.random.key_data(key))
        assert not np.array_equal(noise[seed], jax.random.key_data(model_key))
        assert not np.array_equal(noise[seed], jax.random.key_data(optimizer_key))
    assert not np.array_equal(noise[0], noise[1])


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop", "lion", "adam"])
def test_optimizers_by_name_with_schedule_and_clipping(mnist, name):
    config = Config(optimizer=name, schedule="warmup_cosine", warmup_steps=2, steps=10,
                    clip_norm=1.0, hidden_size=8)
    model, optimizer, state = _setup(config)
    step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer))
    x, y = _batch(mnist, 0, 50)
    first, _ = step(state, x, y)
    # Warmup starts at learning rate 0: the first update changes nothing.
    jax.tree.map(np.testing.assert_array_equal, first.params, state.params)
    second, _ = step(first, x, y)
    assert not np.array_equal(second.params["head"]["kernel"], state.params["head"]["kernel"])


def _global_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                             for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop", "lion", "adam", "keras_adam"])
def test_clip_norm_rescales_large_gradients_for_every_optimizer(name):
    """--clip-norm 1 with gradients of global norm 1e4 then 1e2: the optimizer moves exactly
    as it would on those gradients rescaled to norm 1, and not as on the raw ones."""
    _, _, state = _setup(Config(hidden_size=8))
    keys = jax.random.split(jax.random.key(7), 2)
    raw = []
    for key, norm in zip(keys, (1e4, 1e2), strict=True):
        leaves, tree = jax.tree.flatten(state.params)
        noise = [jax.random.normal(k, x.shape) for k, x in
                 zip(jax.random.split(key, len(leaves)), leaves, strict=True)]
        g = jax.tree.unflatten(tree, noise)
        raw.append(jax.tree.map(lambda x, g=g, norm=norm: x * (norm / _global_norm(g)), g))
    unit = [jax.tree.map(lambda x, g=g: x / _global_norm(g), g) for g in raw]
    assert [round(_global_norm(g)) for g in raw] == [10000, 100]

    @functools.partial(jax.jit, static_argnums=0)
    def updates(optimizer, grads):
        opt_state, out = optimizer.init(state.params), []
        for g in grads:
            u, opt_state = optimizer.update(g, opt_state, state.params)
            out.append(u)
        return out

    base = Config(optimizer=name, learning_rate=1e-3, hidden_size=8)
    clipped = updates(make_optimizer(base.replace(clip_norm=1.0)), raw)
    rescaled = updates(make_optimizer(base), unit)
    unclipped = updates(make_optimizer(base), raw)
    for a, b in zip(clipped, rescaled, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-9), a, b)
    assert not np.allclose(_global_norm(jax.tree.map(jnp.subtract, clipped[1], unclipped[1])),
                           0.0, atol=1e-6)


def test_clip_norm_bounds_the_update_of_a_train_step(mnist):
    """SGD at learning rate 1 with --clip-norm 1e-3: the real loss gradient (global norm
    about 1) needs clipping, and the step moves the parameters by 1e-3 in norm, not more."""
    config = Config(optimizer="sgd", learning_rate=1.0, clip_norm=1e-3, hidden_size=16)
    model, optimizer, state = _setup(config)
    x, y = _batch(mnist, 0, 50)
    grads = jax.grad(lambda p: train.loss_fn(p, model, x, y)[0])(state.params)
    assert _global_norm(grads) > 100 * config.clip_norm  # clipping has work to do
    step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer))
    after, _ = step(state, x, y)
    moved = _global_norm(jax.tree.map(jnp.subtract, after.params, state.params))
    assert moved == pytest.approx(config.learning_rate * config.clip_norm, rel=1e-3)


@pytest.mark.parametrize("order, by_step", [
    ("rows", False), ("rows", True), ("pixels", False), ("permuted", False),
    # Step by step is the same gather whatever made the [T, N, F] sequences: one order
    # checks it (784 steps' gathers took 24 s to compile under the suite's load).
])
def test_gather_sequences_is_the_batch_of_each_order(order, by_step):
    """gather_sequences (what apply_sequences runs for a batch's rows, in train_steps) cuts
    each batch time-major from the dataset's sequences, at once or step by step: the same
    bits as the batch's own images made into sequences, in every order; indices outside
    the set clamped into it."""
    model = make_model(Config(order=order, hidden_size=8))
    images = jax.random.uniform(jax.random.key(0), (40, 28, 28))
    idx = jnp.asarray([7, 0, 39, 7, 12], jnp.int32)
    gather = jax.jit(gather_sequences, static_argnums=2)
    got = gather(model.sequences(images), idx, by_step)
    np.testing.assert_array_equal(got, model.sequences(images[idx]))
    outside = gather(model.sequences(images), jnp.asarray([-5, 0, 45, 7, 12]), by_step)
    np.testing.assert_array_equal(outside, model.sequences(images[jnp.asarray([0, 0, 39, 7,
                                                                              12])]))


@pytest.mark.parametrize("fields, batch, alone", [
    ({"unroll": 0, "projection": "in_loop", "weight_grad": "per_step"}, 50, True),
    ({"unroll": 28, "projection": "in_loop", "weight_grad": "per_step"}, 50, True),
    ({"unroll": 0, "projection": "in_loop"}, 4096, True),  # per step from batch 512
    ({"unroll": 0, "projection": "in_loop"}, 50, False),  # one product after the loop
    ({"unroll": 0, "cell": "gru"}, 50, True),  # autodiff, the projection in the loop
    ({"unroll": 0, "cell": "flax.linen:GRUCell"}, 50, True),  # no projection: x_t alone
    ({"unroll": 0, "projection": "hoisted", "weight_grad": "per_step"}, 50, False),
    ({"unroll": 14, "projection": "in_loop", "weight_grad": "per_step"}, 50, False),
    ({"unroll": 0, "projection": "in_loop", "weight_grad": "per_step", "chunks": 4}, 50, False),
    ({"unroll": 0, "projection": "in_loop", "weight_grad": "per_step", "bidirectional": True},
     50, False),
    ({}, 50, False),
])
def test_reads_steps_alone_only_where_no_step_reads_the_whole_sequence(fields, batch, alone):
    """Where a form reads the whole [T, B, F] batch (a hoisted projection, a weight
    gradient as one product, a rolled loop slicing it), a batch gathered step by step would
    be stacked again: one copy more than gathering it at once."""
    assert make_model(Config(**fields)).reads_steps_alone(batch) is alone


def test_a_batch_read_step_by_step_is_never_stacked():
    """Fully unrolled, projected in the loop, its weight gradients step by step: the
    compiled train steps hold no [T, B, F] batch (XLA hands each step's gather to its
    readers), where a rolled loop, which slices the whole batch each step, holds it.
    (Gathered at once, the unrolled form's batch was one array on jax 0.10.2, and not on
    0.11.2, whose XLA hands that gather to the readers too.)"""
    sequences = jnp.zeros((28, 300, 28), jnp.float32)
    labels, idx = jnp.zeros(300, jnp.int32), jnp.zeros((2, 64), jnp.int32)

    def batches(unroll):
        config = Config(unroll=unroll, projection="in_loop", weight_grad="per_step",
                        batch_size=64)
        model, optimizer, state = _setup(config)
        assert model.reads_steps_alone(64) is (unroll == 0)
        steps = jax.jit(functools.partial(train.train_steps, model=model, optimizer=optimizer))
        text = steps.lower(state, sequences, labels, idx).compile().as_text()
        return text.count("f32[28,64,28]")

    assert batches(0) == 0
    assert batches(1) >= 1


def test_gather_sequences_beyond_int32_row_numbers():
    """Row numbers t * N + i of the [T*N, F] table are int32: past 2**31 rows the batch is
    taken along N of [T, N, F] instead (traced only: a 9 GB table)."""
    def gathered_operand(count):
        table = jax.ShapeDtypeStruct((784, count, 1), jnp.float32)
        jaxpr = jax.make_jaxpr(gather_sequences)(table, jnp.zeros(50, jnp.int32))
        gathers = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == "gather"]
        assert len(gathers) == 1
        return gathers[0].invars[0].aval.shape

    assert gathered_operand(60_000) == (784 * 60_000, 1)
    assert gathered_operand(3_000_000) == (784, 3_000_000, 1)
