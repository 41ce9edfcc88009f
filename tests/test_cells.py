"""Cells against NumPy references, scan against a Python loop, gradients against float64."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rnnjax import cells
from rnnjax.cells import Cell, scan_cell
from tests import users_cells
from tests.jaxprs import equations

T, B, F, H = 7, 3, 5, 4


def _inputs(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(T, B, F)).astype(dtype)


def _numpy_params(params):
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def numpy_simple_rnn(p, xs, act=np.tanh):
    h = np.zeros((xs.shape[1], p["recurrent_kernel"].shape[0]))
    out = []
    for x in xs:
        h = act(x @ p["kernel"] + p["bias"] + h @ p["recurrent_kernel"])
        out.append(h)
    return np.stack(out)


def numpy_lstm(p, xs):
    hidden = p["recurrent_kernel"].shape[0]
    h = c = np.zeros((xs.shape[1], hidden))
    out = []
    for x in xs:
        z = x @ p["kernel"] + p["bias"] + h @ p["recurrent_kernel"]
        i, f, g, o = np.split(z, 4, axis=-1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        out.append(h)
    return np.stack(out)


def numpy_gru(p, xs):
    hidden = p["recurrent_kernel"].shape[0]
    h = np.zeros((xs.shape[1], hidden))
    out = []
    for x in xs:
        u = x @ p["kernel"] + p["bias"]
        r_all = h @ p["recurrent_kernel"] + p["recurrent_bias"]
        uz, ur, uh = np.split(u, 3, axis=-1)
        rz, rr, rh = np.split(r_all, 3, axis=-1)
        z, r = _sigmoid(uz + rz), _sigmoid(ur + rr)
        h = z * h + (1 - z) * np.tanh(uh + r * rh)
        out.append(h)
    return np.stack(out)


REFERENCES = {
    "simple_rnn": numpy_simple_rnn,
    "irnn": functools.partial(numpy_simple_rnn, act=lambda v: np.maximum(v, 0)),
    "lstm": numpy_lstm,
    "gru": numpy_gru,
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_cell_matches_numpy_reference(name):
    cell = cells.get_cell(name, H)
    params = cell.init(jax.random.key(1), F)
    if name in ("gru",):  # make the zero-initialised bias terms matter
        params = {**params, "recurrent_bias": jnp.linspace(-0.5, 0.5, 3 * H)}
    params = {**params, "bias": params["bias"] + jnp.linspace(-0.3, 0.3, params["bias"].size)}
    xs = _inputs()
    _, ys = scan_cell(cell, params, jnp.asarray(xs))
    expected = REFERENCES[name](_numpy_params(params), xs.astype(np.float64))
    np.testing.assert_allclose(ys, expected, rtol=2e-5, atol=2e-6)


def test_a_hidden_size_that_is_not_a_positive_int_is_refused_where_the_cell_is_made():
    """'50' made a kernel of shape (28, '50505050') deep in JAX (a string times the gates);
    a NumPy integer is taken, as a Python int."""
    for hidden, error, message in (("50", TypeError, r"hidden_size '50' \(str\); give a "
                                    r"positive int"), (50.0, TypeError, "hidden_size 50.0"),
                                   (True, TypeError, "hidden_size True"),
                                   (0, ValueError, "hidden_size 0")):
        for name in ("simple_rnn", "lstm", "gru"):
            with pytest.raises(error, match=rf"^Cell: {message}"):
                cells.get_cell(name, hidden)
    cell = cells.lstm(np.int64(8))
    assert cell.hidden_size == 8 and type(cell.hidden_size) is int


def test_keras_initialisers():
    cell = cells.simple_rnn(50)
    p = cell.init(jax.random.key(0), 28)
    assert p["kernel"].shape == (28, 50) and p["recurrent_kernel"].shape == (50, 50)
    limit = np.sqrt(6 / (28 + 50))  # glorot uniform
    assert np.abs(p["kernel"]).max() <= limit and np.abs(p["kernel"]).max() > 0.9 * limit
    np.testing.assert_allclose(p["recurrent_kernel"] @ p["recurrent_kernel"].T, np.eye(50),
                               atol=1e-5)  # orthogonal
    np.testing.assert_array_equal(p["bias"], 0)
    np.testing.assert_array_equal(cells.irnn(8).init(jax.random.key(0), 3)["recurrent_kernel"],
                                  np.eye(8))
    lstm_bias = cells.lstm(8).init(jax.random.key(0), 3)["bias"]
    np.testing.assert_array_equal(lstm_bias, np.r_[np.zeros(8), np.ones(8), np.zeros(16)])


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("unroll", [1, 3, 0])
def test_scan_matches_python_loop(name, unroll):
    """The scan (any unroll; the Elman cells' fused path) equals stepping by hand."""
    cell = cells.get_cell(name, H)
    params = cell.init(jax.random.key(2), F)
    xs = jnp.asarray(_inputs(1))
    carry, ys = scan_cell(cell, params, xs, unroll=unroll)
    us = cell.project(params, xs)
    c = cell.initial_carry(B, jnp.float32)
    loop = []
    for u in us:
        c, y = cell.step(params, c, u)
        loop.append(y)
    np.testing.assert_allclose(ys, jnp.stack(loop), rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), carry, c)


def _generic(cell: Cell) -> Cell:
    """The same cell without its fused sequence (plain lax.scan of step, autodiff) and
    without reading its last output from the carry."""
    return Cell(cell.init, cell.step, cell.initial_carry, cell.hidden_size, cell.project)


# (weight_grad, PER_STEP_WEIGHT_GRADIENT_BATCH): each explicit form, and 'auto' on each side
# of its untuned threshold.
WEIGHT_GRAD_CASES = [("product", 512), ("per_step", 512), ("auto", 1), ("auto", 10_000)]


@pytest.mark.parametrize("name", ["simple_rnn", "irnn"])
@pytest.mark.parametrize(("weight_grad", "threshold"), WEIGHT_GRAD_CASES)
def test_fused_backward_matches_autodiff(name, weight_grad, threshold, monkeypatch):
    monkeypatch.setattr(cells, "PER_STEP_WEIGHT_GRADIENT_BATCH", threshold)
    cell = cells.get_cell(name, H)
    params = cell.init(jax.random.key(3), F)
    params = {**params, "bias": params["bias"] + 0.1}
    xs = jnp.asarray(_inputs(2))
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(T, B, H)), jnp.float32)

    def loss(c, p, x):
        return (scan_cell(c, p, x, weight_grad=weight_grad)[1] * weights).sum()

    fused = jax.grad(loss, argnums=(1, 2))(cell, params, xs)
    plain = jax.grad(loss, argnums=(1, 2))(_generic(cell), params, xs)
    # The same sums in other orders: the bias's gradient adds T x B terms of about 1 to
    # -0.063, so their rounding shows at its size (1.8e-6 apart, the product form against
    # autodiff, under jax 0.11.2 on a 2-core AVX2 EPYC): atol at 1e-5, not 1e-6.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), fused, plain)


def test_weight_grad_selects_the_backward_form(monkeypatch):
    """'product' and 'per_step' are two programs; 'auto' is one of them by batch size."""
    monkeypatch.setattr(cells, "PER_STEP_WEIGHT_GRADIENT_BATCH", B)  # B itself: per step
    cell = cells.get_cell("simple_rnn", H)
    params = cell.init(jax.random.key(3), F)
    xs = jnp.asarray(_inputs(2))

    def program(weight_grad, x=xs):
        grad = jax.grad(lambda p: scan_cell(cell, p, x, weight_grad=weight_grad)[1].sum())
        return str(jax.make_jaxpr(grad)(params))

    product, per_step = program("product"), program("per_step")
    assert product != per_step
    assert program("auto") == per_step
    assert program("auto", xs[:, : B - 1]) == program("product", xs[:, : B - 1])


def _cell(name: str, hidden: int) -> Cell:
    """A registered cell, or ``gru_hand_written``: the GRU with its hand-written backward."""
    if name == "gru_hand_written":
        return cells.gru(hidden, backward="hand_written")
    return cells.get_cell(name, hidden)


@pytest.mark.parametrize("unroll", [1, 0])
@pytest.mark.parametrize("name", ["lstm", "gru_hand_written", "simple_rnn"])
def test_fused_backward_matches_autodiff_through_carries(name, unroll):
    """Through the outputs, the final carry (h, and the LSTM's c) and a non-zero initial
    carry alike."""
    cell = _cell(name, H)
    assert cell.sequence is not None
    rng = np.random.default_rng(5)
    params = jax.tree.map(
        lambda p: p + jnp.asarray(rng.normal(scale=0.3, size=p.shape), p.dtype),
        cell.init(jax.random.key(5), F),
    )
    xs = jnp.asarray(_inputs(5))
    carry0 = jax.tree.map(lambda c: jnp.asarray(rng.normal(size=c.shape), c.dtype),
                          cell.initial_carry(B, jnp.float32))
    weights = jnp.asarray(rng.normal(size=(T, B, H)), jnp.float32)

    def loss(c, p, x, carry):
        carry, ys = scan_cell(c, p, x, carry, unroll=unroll)
        return (ys * weights).sum() + sum(jnp.sin(leaf).sum() for leaf in jax.tree.leaves(carry))

    fused = jax.grad(loss, argnums=(1, 2, 3))(cell, params, xs, carry0)
    plain = jax.grad(loss, argnums=(1, 2, 3))(_generic(cell), params, xs, carry0)
    assert jax.tree.structure(fused) == jax.tree.structure(plain)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), fused, plain)


@pytest.mark.parametrize("weight_grad", ["product", "per_step"])
@pytest.mark.parametrize("name", ["lstm", "gru_hand_written", "simple_rnn", "irnn"])
def test_rows_written_in_place_are_bitwise_the_stacked_ones(monkeypatch, name, weight_grad):
    """On XLA:CPU at unroll 1 the hand-written layers write each step's rows over the rows
    they read (cells._scan_rows); stacked as scan outputs instead, the same outputs and
    gradients, bit for bit."""
    cell = _cell(name, H)
    params = cell.init(jax.random.key(6), F)
    xs = jnp.asarray(_inputs(6))

    def value_and_grad():
        def loss(p, x):
            carry, ys = scan_cell(cell, p, x, weight_grad=weight_grad, projection="hoisted")
            return jnp.sin(ys).sum() + sum(jnp.cos(c).sum() for c in jax.tree.leaves(carry))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs)

    in_place = value_and_grad()
    scan_rows = cells._scan_rows
    monkeypatch.setattr(cells, "_scan_rows",
                        lambda *args, **kw: scan_rows(*args, **{**kw, "in_place": False}))
    jax.tree.map(np.testing.assert_array_equal, in_place, value_and_grad())


@pytest.mark.parametrize("name", [*sorted(REFERENCES), "gru_hand_written"])
def test_gradients_against_float64_finite_differences(name):
    with jax.enable_x64(True):
        cell = _cell(name, H)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), cell.init(jax.random.key(4), F))
        params = {**params, "bias": params["bias"] + 0.05}
        xs = jnp.asarray(_inputs(3, np.float64))

        def f(p, x):
            return jnp.sin(scan_cell(cell, p, x)[1]).sum()

        check_grads(f, (params, xs), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("weight_grad", ["product", "per_step"])
@pytest.mark.parametrize("name", [*sorted(REFERENCES), "gru_hand_written"])
def test_float64_weight_gradients_are_float64_in_either_form(name, weight_grad):
    """The hand-written backward in float64 against autodiff of the plain steps: both
    weight-gradient forms to float64's rounding (the per-step one summed in float32, 1e-7
    off)."""
    with jax.enable_x64(True):
        cell = _cell(name, H)
        plain = Cell(cell.init, cell.step, cell.initial_carry, cell.hidden_size, cell.project)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), cell.init(jax.random.key(4), F))
        xs = jnp.asarray(_inputs(3, np.float64))

        def f(p, c, **form):
            return jnp.sin(scan_cell(c, p, xs, **form)[1]).sum()

        expected = jax.grad(f)(params, plain)
        got = jax.grad(f)(params, cell, backward="hand_written", weight_grad=weight_grad)
        for key, value in expected.items():
            assert got[key].dtype == jnp.float64
            np.testing.assert_allclose(got[key], value, rtol=1e-12, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("name", ["simple_rnn", "irnn"])
def test_elman_forward_without_gradient_is_bitwise_the_trained_forward(name):
    """Evaluation projects x_t inside the loop, training before it: the same outputs, bit
    for bit, at a batch where the two products differ in shape by far."""
    cell = cells.get_cell(name, 50)
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(scale=0.3, size=p.shape), p.dtype),
                          cell.init(jax.random.key(7), 28))
    xs = jnp.asarray(rng.random((28, 1000, 28)), jnp.float32)
    evaluate = lambda p, x: scan_cell(cell, p, x)  # noqa: E731
    # jax.vjp runs the forward rule that training runs (projection before the loop).
    train = lambda p, x: jax.vjp(lambda q: scan_cell(cell, q, x), p)[0]  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, jax.jit(evaluate)(params, xs),
                 jax.jit(train)(params, xs))
    # Two programs, not one: the [T, B, H] projection before the loop in training's alone.
    projection = (28, 1000, 50)
    assert projection not in _products_outside_loops(jax.make_jaxpr(evaluate)(params, xs).jaxpr)
    assert projection in _products_outside_loops(jax.make_jaxpr(train)(params, xs).jaxpr)


def _products_outside_loops(jaxpr):
    """The output shapes of the matrix products of ``jaxpr`` outside every loop's body
    (nested jaxprs, a custom_vjp's, included)."""
    return [tuple(eqn.outvars[0].aval.shape) for eqn in equations(jaxpr, into_loops=False)
            if eqn.primitive.name == "dot_general"]


def test_user_defined_cell_needs_only_the_protocol():
    """A cell written here, with no projection and no fused path, scans and trains."""

    def init(key, input_size):
        return {"w": jax.random.normal(key, (input_size + 6, 6)) * 0.1}

    def step(params, h, x):
        h = jnp.tanh(jnp.concatenate([x, h], axis=-1) @ params["w"])
        return h, h

    cell = Cell(init=init, step=step, initial_carry=lambda b, d: jnp.zeros((b, 6), d),
                hidden_size=6)
    params = cell.init(jax.random.key(0), F)
    _, ys = scan_cell(cell, params, jnp.asarray(_inputs()))
    assert ys.shape == (T, B, 6)
    grads = jax.grad(lambda p: scan_cell(cell, p, jnp.asarray(_inputs()))[1].sum())(params)
    assert np.abs(grads["w"]).min() > 0


def test_registered_user_cell_trains_through_the_config(mnist):
    """The README's recipe: add a cell to the registry, name it in the config."""
    from rnnjax import train
    from rnnjax.config import Config
    from rnnjax.data.pipeline import normalize_host
    from rnnjax.model import make_model
    from rnnjax.optim import make_optimizer

    cells.CELLS["test_cell"] = users_cells.elman
    try:
        config = Config(cell="test_cell", hidden_size=12)
        model, optimizer = make_model(config), make_optimizer(config)
        state = train.create_state(jax.random.key(0), model, optimizer)
        x = jnp.asarray(normalize_host(mnist.train_images[:32]))
        y = jnp.asarray(mnist.train_labels[:32])
        new, _ = jax.jit(functools.partial(train.train_step, model=model,
                                                 optimizer=optimizer))(state, x, y)
        assert new.params["rnn"][0]["w"].shape == (28 + 12, 12)
        assert not np.array_equal(new.params["rnn"][0]["w"], state.params["rnn"][0]["w"])
    finally:
        del cells.CELLS["test_cell"]


def test_unknown_cell_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown cell 'nope'; choose one of"):
        cells.get_cell("nope", 4)


def _assert_rounding_equal(actual, desired):
    """The same sums computed by another program: equal to float32 rounding.

    Programs that compute the same sums in the same order (another form, the plain scan)
    are bitwise equal on some CPUs and not on others: on the 2-core AVX2 EPYC every form
    matched the plain scan bit for bit; on an AVX-512 EPYC (jax 0.10.2) XLA:CPU's code for
    the different fusions and product shapes rounds a few ulps apart (5e-7 after 7 steps
    here; the LSTM's and GRU's hand-written forwards at batch 50 from the first step). What
    is bitwise by construction is a program against itself (a run against its resume);
    the tests that compare two programs bit for bit (rows written in place against stacked
    ones, above; the Elman forward without a gradient, below) hold on both machines.
    """
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [*sorted(REFERENCES), "gru_hand_written"])
def test_fused_forward_is_the_plain_scan(name):
    """The hand-written layers change only the backward pass: outputs and final carry are
    the plain scan's (to float32 rounding: :func:`_assert_rounding_equal`)."""
    cell = _cell(name, H)
    rng = np.random.default_rng(6)
    params = jax.tree.map(  # non-zero biases too, so the order of every sum shows
        lambda p: p + jnp.asarray(rng.normal(scale=0.3, size=p.shape), p.dtype),
        cell.init(jax.random.key(6), F),
    )
    xs = jnp.asarray(_inputs(6))
    carry0 = jax.tree.map(lambda c: c + 0.5, cell.initial_carry(B, jnp.float32))
    fused = jax.jit(lambda p, x, c: scan_cell(cell, p, x, c))(params, xs, carry0)
    plain = jax.jit(lambda p, x, c: scan_cell(_generic(cell), p, x, c))(params, xs, carry0)
    jax.tree.map(_assert_rounding_equal, fused, plain)


def _perturbed(cell, seed):
    """``(params, xs, carry0, weights)`` from ``seed``: the cell's parameters with non-zero
    noise (every sum's order shows), inputs ``[T, B, F]``, a non-zero initial carry and
    weights ``[T, B, H]`` for a loss over the outputs."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(scale=0.3, size=p.shape),
                                                    p.dtype), cell.init(jax.random.key(seed), F))
    carry0 = jax.tree.map(lambda c: c + 0.25, cell.initial_carry(B, jnp.float32))
    weights = jnp.asarray(rng.normal(size=(T, B, H)), jnp.float32)
    return params, jnp.asarray(_inputs(seed)), carry0, weights


FORMS = [(b, p, w) for b in ("hand_written", "autodiff") for p in ("hoisted", "in_loop")
         for w in ("product", "per_step") if b == "hand_written" or w == "product"]


@pytest.mark.parametrize(("backward", "projection", "weight_grad"), FORMS)
@pytest.mark.parametrize("name", ["simple_rnn", "lstm", "gru"])
def test_every_form_gives_the_same_values_and_gradients(name, backward, projection,
                                                        weight_grad):
    """Each form the tuner may choose (rnnjax.cells.resolve_form): the forward the plain
    scan's (under jax.vjp too, which runs the training forward) to float32 rounding
    (:func:`_assert_rounding_equal`), the gradients autodiff's, through outputs and
    carries."""
    cell = cells.get_cell(name, H)
    form = dict(backward=backward, projection=projection, weight_grad=weight_grad)
    resolved = cells.resolve_form(cell, B, **form)
    assert (resolved.backward, resolved.projection) == (backward, projection)
    params, xs, carry0, weights = _perturbed(cell, 8)

    def run(c, p, x, carry, **kw):
        return scan_cell(c, p, x, carry, **kw)

    plain = jax.jit(functools.partial(run, _generic(cell), projection="hoisted"))
    ours = jax.jit(functools.partial(run, cell, **form))
    expected = plain(params, xs, carry0)
    jax.tree.map(_assert_rounding_equal, ours(params, xs, carry0), expected)
    trained = jax.jit(lambda p, x, c: jax.vjp(lambda q: run(cell, q, x, c, **form), p)[0])
    jax.tree.map(_assert_rounding_equal, trained(params, xs, carry0), expected)

    def loss(p, x, carry, **kw):
        carry, ys = run(kw.pop("c"), p, x, carry, **kw)
        return (ys * weights).sum() + sum(jnp.sin(leaf).sum() for leaf in jax.tree.leaves(carry))

    got = jax.grad(functools.partial(loss, c=cell, **form), argnums=(0, 1, 2))(params, xs, carry0)
    want = jax.grad(functools.partial(loss, c=_generic(cell), projection="hoisted"),
                    argnums=(0, 1, 2))(params, xs, carry0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


@pytest.mark.parametrize("backward", ["hand_written", "autodiff"])
@pytest.mark.parametrize("name", ["simple_rnn", "lstm", "gru"])
def test_chunks_run_the_same_recurrence(name, backward):
    """A sequence scanned in parts (``chunks``, the carry passed on; 7 steps in 2, 3 or 7
    parts, unrolled or not): the outputs and final carry bitwise the one scan's at the same
    unroll where every part has several steps, the gradients its own up to rounding (one
    sum per part, then added). Parts of one step (7 in 7) are loops XLA removes, compiling
    the step as straight-line code: on a 2-core AVX2 EPYC (Zen 3, jax 0.10.2) the
    SimpleRNN's outputs there were a few ulps apart (1.2e-7), bitwise on an AVX-512 Xeon:
    float32 rounding (:func:`_assert_rounding_equal`)."""
    cell = cells.get_cell(name, H)
    params, xs, carry0, weights = _perturbed(cell, 9)

    def loss(p, x, carry, **kw):
        carry, ys = scan_cell(cell, p, x, carry, backward=backward, **kw)
        return (ys * weights).sum() + sum(jnp.sin(leaf).sum() for leaf in jax.tree.leaves(carry))

    def run(**kw):
        forward = jax.jit(lambda p, x, c: scan_cell(cell, p, x, c, backward=backward, **kw))
        grads = jax.jit(jax.grad(functools.partial(loss, **kw), argnums=(0, 1, 2)))
        return forward(params, xs, carry0), grads(params, xs, carry0)

    wholes = {unroll: run(unroll=unroll) for unroll in (1, 0)}  # the one scan, per unroll
    for chunks, unroll in ((2, 1), (3, 1), (7, 1), (3, 0)):
        whole, whole_grads = wholes[unroll]
        parts, part_grads = run(chunks=chunks, unroll=unroll)
        same = np.testing.assert_array_equal if chunks < T else _assert_rounding_equal
        jax.tree.map(same, parts, whole)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     part_grads, whole_grads)


def test_chunk_bounds_split_the_steps_evenly_and_check_the_count():
    assert cells.chunk_bounds(28, 4) == [0, 7, 14, 21, 28]
    assert cells.chunk_bounds(28, 8) == [0, 3, 7, 10, 14, 17, 21, 24, 28]
    assert cells.chunk_bounds(5, 1) == [0, 5]
    for bad in (0, 29):
        with pytest.raises(ValueError, match=f"chunks {bad}: choose 1 to 28"):
            cells.chunk_bounds(28, bad)


def test_form_choices_are_checked():
    with pytest.raises(ValueError, match="projection 'inside'; choose one of auto, hoisted"):
        cells.resolve_form(cells.get_cell("lstm", H), B, projection="inside")


def test_time_batch_product_merges_time_and_batch_on_one_device():
    """On one device the weight product is one 2-D dot over the merged [T*B] rows (no
    dot_general contracting two dimensions, which XLA:CPU ran after copying an operand);
    ``tests/test_parallel.py`` checks the unmerged form on a mesh: no all-gather."""
    a = jax.random.normal(jax.random.key(0), (7, 5, 3))
    b = jax.random.normal(jax.random.key(1), (7, 5, 4))
    expected = np.einsum("tbm,tbn->mn", np.asarray(a, np.float64), np.asarray(b, np.float64))
    product = jax.jit(cells._time_batch_product)
    np.testing.assert_allclose(product(a, b), expected, rtol=1e-5, atol=1e-5)
    seen = []
    jax.jit(lambda x: seen.append(cells._one_device(x)) or x)(a)
    assert seen == [True]
    text = product.lower(a, b).as_text()
    assert "dot_general" in text and "contracting_dims = [0, 1]" not in text, text


def _scans(jaxpr):
    """Every ``scan`` equation of ``jaxpr`` (a Jaxpr or ClosedJaxpr), nested ones too."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name == "scan":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                    yield from _scans(sub)


@pytest.mark.parametrize("projection", ["hoisted", "in_loop"])
@pytest.mark.parametrize("name", ["simple_rnn", "gru"])
def test_autodiff_sums_a_bfloat16_loops_weight_gradients_in_float32(name, projection):
    """JAX's transpose of a scan sums a weight's gradient over the steps in the dtype the
    loop reads the weight in: the autodiff loop reads float32 weights and narrows them each
    step, so the backward loop carries the recurrent kernel's gradient in float32, not
    bfloat16 (the hand-written forms sum theirs in float32 too). GRU at hidden 16,
    bfloat16 compute, in_loop: that gradient 1.5e-2 -> 1.1e-2 off float32's (2026-12-08)."""
    cell = cells.get_cell(name, 8)
    params = cells.cast_floats(cell.init(jax.random.key(0), F), jnp.bfloat16)
    xs = jnp.asarray(_inputs()).astype(jnp.bfloat16)

    def loss(p):
        ys = scan_cell(cell, p, xs, backward="autodiff", projection=projection)[1]
        return ys.astype(jnp.float32).sum()

    recurrent = params["recurrent_kernel"].shape  # [H, G]
    carried = [v.aval.dtype for eqn in _scans(jax.make_jaxpr(jax.grad(loss))(params))
               for v in eqn.outvars if v.aval.shape == recurrent]
    assert carried and set(carried) == {jnp.dtype(jnp.float32)}, carried
    assert jax.grad(loss)(params)["recurrent_kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["simple_rnn", "lstm", "gru"])
def test_a_carry_given_in_another_dtype_is_scanned_in_the_inputs_dtype(name):
    """``scan_cell``'s final carry and outputs are in xs' dtype, a carry given too: one in
    float32 for bfloat16 inputs had carried the whole scan in float32, silently (its floats
    are now cast, as the Flax layers cast an ``initial_carry``)."""
    cell = cells.get_cell(name, 8)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), cell.init(jax.random.key(0), F))
    xs = jnp.asarray(_inputs()).astype(jnp.bfloat16)  # [T, B, F]
    given = jax.tree.map(lambda c: c + 0.5, cell.initial_carry(B, jnp.float32))
    for backward in ("autodiff", "hand_written"):
        final, ys = scan_cell(cell, params, xs, given, backward=backward)
        assert {leaf.dtype for leaf in jax.tree.leaves((final, ys))} == {jnp.dtype("bfloat16")}
        want = scan_cell(cell, params, xs, cells.cast_floats(given, jnp.bfloat16),
                         backward=backward)
        jax.tree.map(np.testing.assert_array_equal, (final, ys), want)
