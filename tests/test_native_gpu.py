"""rnnjax.native_gpu: the Elman layer's Pallas kernels, the 'native' form on a GPU.

There is no GPU here: the same kernels run in Pallas' interpreter (``native_gpu.interpreted``),
and a 'native' layer is told it runs on a GPU (``native_gpu.runs_here``) to train with them.
What only a GPU shows (that Triton lowers them, and their speed) is measured by
``benchmarks/gpu.sh``.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.native_kernels import first_step_difference
from rnnjax import cells, native, native_gpu, train
from rnnjax.config import Config, ConfigError
from rnnjax.data.pipeline import batch_indices, to_device
from rnnjax.model import make_model
from tests.jaxprs import equations, primitives
from tests.test_native import train_steps_read_rows_as_train_step


@pytest.fixture
def on_gpu(monkeypatch):
    """'native' layers run the GPU's kernels, interpreted (on a real GPU too: these tests
    check the kernels' logic against the hand-written form's float32 sums to 1e-5; on a
    GPU, ``benchmarks.native_kernels`` checks its own sums' first step)."""
    monkeypatch.setattr(native_gpu, "runs_here", lambda: True)
    monkeypatch.setattr(native_gpu, "interpreted", lambda: True)


def test_the_padded_width_is_a_power_of_two_of_at_least_16():
    assert [native_gpu.width(h) for h in (1, 16, 17, 50, 64, 65, 128)] == \
        [16, 16, 32, 64, 64, 128, 128]


def loss(layer, params, xs, h0, weight):
    """A loss of the layer's last state and, with ``weight``, of all its outputs."""
    hs, h_last = layer(params, xs, h0)
    return (h_last * jnp.arange(h_last.shape[1])).sum() + weight * (hs ** 2).sum()


def hand_written(cell, params, xs, h0):
    h_last, hs = cells.scan_cell(cell, params, xs, h0, backward="hand_written")
    return hs, h_last


def kernels(params, xs, h0):
    return native_gpu.elman_layer()(xs, params["kernel"], params["recurrent_kernel"],
                                    params["bias"], h0)


@pytest.mark.parametrize(("hidden", "batch", "weight"), [
    (50, 37, 0.0),  # the seed's width, padded to 64; 3 blocks of rows, the last padded
    (50, 37, 0.1),  # every output has a gradient
    (16, 16, 0.1),  # no padding: one block, a width of 16
    (20, 70, 0.0),  # 5 blocks, width 32
])
def test_the_kernels_compute_the_hand_written_layers_sums(hidden, batch, weight):
    """The outputs, the loss and every gradient (the parameters', the inputs', the initial
    state's) as the hand-written form computes them, to float rounding."""
    cell = cells.CELLS["simple_rnn"](hidden)
    params = cell.init(jax.random.key(0), 28)
    xs = jax.random.normal(jax.random.key(1), (28, batch, 28))
    h0 = 0.3 * jax.random.normal(jax.random.key(2), (batch, hidden))
    grad = jax.value_and_grad(loss, argnums=(1, 2, 3))
    value, grads = grad(kernels, params, xs, h0, weight)
    want_value, want = grad(functools.partial(hand_written, cell), params, xs, h0, weight)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        assert got.shape == expected.shape
        scale = float(jnp.abs(expected).max()) or 1.0
        assert float(jnp.abs(got - expected).max()) <= 1e-5 * scale
    hs, h_last = kernels(params, xs, h0)
    assert hs.shape == (28, batch, hidden) and h_last.shape == (batch, hidden)
    np.testing.assert_array_equal(hs[-1], h_last)


def test_a_pass_over_time_is_one_kernel_call():
    """A train step's gradient holds two Pallas calls (the forward, the backward) and no
    loop over time of XLA's: the kernels loop over the steps themselves."""
    cell = cells.CELLS["simple_rnn"](50)
    params = cell.init(jax.random.key(0), 28)
    xs, h0 = jnp.ones((28, 50, 28)), jnp.zeros((50, 50))
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, kernels)))(params, xs, h0, 0.0)
    names = primitives(jaxpr.jaxpr)
    assert names.count("pallas_call") == 2
    assert not {"scan", "while"} & set(names)
    hand = jax.make_jaxpr(jax.grad(functools.partial(loss, functools.partial(
        hand_written, cell))))(params, xs, h0, 0.0)
    assert {"scan", "while"} & set(primitives(hand.jaxpr))  # the walk finds XLA's loops


def triton_kernels(fn, *args) -> list[str]:
    """The names of the Triton kernels the jitted ``fn`` calls on ``args``, in order:
    traced and lowered for CUDA with an H200 as the target (:func:`for_an_h200`) where this
    jaxlib can without a GPU (:func:`cross_lowers`; XLA's Triton custom call as jaxlib
    0.10.2 and 0.11.2 lower them, or the Triton kernel call of one that compiles them as
    it lowers), else its Pallas calls' names."""
    with for_an_h200():
        traced = fn.trace(*args)
        if not cross_lowers():
            return [eqn.params["name"] for eqn in equations(traced.jaxpr.jaxpr)
                    if eqn.primitive.name == "pallas_call"]
        return re.findall(r'custom_call @(?:__gpu\$xla\.gpu\.triton|triton_kernel_call_ffi)'
                          r'.*?name = "(\w+)"',
                          traced.lower(lowering_platforms=("cuda",)).as_text())


def for_an_h200():
    """A context whose abstract mesh names an NVIDIA H200: the GPU that Pallas (from JAX
    0.11) lowers Triton kernels for where none is at hand; 0.10.2 lowers them for none."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    h200 = AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
    return use_abstract_mesh(AbstractMesh((1,), ("batch",), (AxisType.Auto,),
                                          abstract_device=h200))


def cross_lowers() -> bool:
    """Whether Pallas lowers Triton kernels for CUDA here without a GPU: a jaxlib that hands
    XLA the Triton IR does (0.10.2 and 0.11.2); one that compiles them as it lowers (it has
    ``has_compilation_handler``) needs the CUDA plugin's Triton compiler."""
    from jax._src.lib import triton

    handler = getattr(triton, "has_compilation_handler", None)
    return handler is None or handler("cuda")


def test_the_kernels_lower_to_triton_for_a_gpu(on_gpu, monkeypatch):
    """Cross-lowered for CUDA on this CPU (``lowering_platforms``), compiled as on a GPU (not
    interpreted): Pallas lowers both kernels to Triton, the backward in its two variants,
    and a whole native train_steps program calls the forward and the backward once a step,
    its rows gathered by XLA. (Triton's own compile to PTX happens on the GPU. A jaxlib
    that compiles Triton as it lowers needs the CUDA plugin: without it, the same
    programs' Pallas calls are checked, not lowered.)"""
    monkeypatch.setattr(native_gpu, "interpreted", lambda: False)
    cell = cells.CELLS["simple_rnn"](50)
    params = cell.init(jax.random.key(0), 28)
    xs, h0 = jnp.ones((28, 50, 28)), jnp.zeros((50, 50))
    for weight, backward in ((0.1, "rnnjax_backward"), (None, "rnnjax_backward_last")):
        def last(params, xs, h0, weight=weight):
            hs, h_last = kernels(params, xs, h0)
            return h_last.sum() + (0.0 if weight is None else weight * (hs ** 2).sum())

        grad = jax.jit(jax.grad(last, argnums=(0, 1, 2)))
        assert triton_kernels(grad, params, xs, h0) == ["rnnjax_forward", backward]
    model, optimizer = make_model(Config(backward="native")), optax.adam(1e-3)
    state = jax.eval_shape(lambda: train.create_state(jax.random.key(0), model, optimizer))
    sequences = jax.ShapeDtypeStruct((28, 1000, 28), jnp.float32)
    labels = jax.ShapeDtypeStruct((1000,), jnp.int32)
    idx = jax.ShapeDtypeStruct((3, 50), jnp.int32)
    steps = jax.jit(functools.partial(train.train_steps, model=model, optimizer=optimizer))
    assert triton_kernels(steps, state, sequences, labels, idx) == \
        ["rnnjax_forward", "rnnjax_backward_last"]


def test_the_native_form_trains_with_the_gpus_kernels(on_gpu, mnist):
    """Told it runs on a GPU, the 'native' SimpleRNN takes the hand-written form's first
    step (the tuner's check), reads a batch's rows as the gathered batch, and lstm and gru,
    which have no GPU kernels, say so."""
    device = to_device(mnist)
    images, labels = device.train_images[:37], device.train_labels[:37]
    reference = Config(hidden_size=50, batch_size=37, backward="hand_written")
    assert first_step_difference(reference.replace(backward="native"), reference, images,
                                 labels) <= 1e-5
    model = make_model(Config(backward="native", batch_size=50))
    idx = batch_indices(len(mnist.train_labels), 50, 0, 2, shuffle=True, seed=3)
    train_steps_read_rows_as_train_step(mnist, model, optax.adam(1e-3), idx)
    for cell in ("lstm", "gru"):
        model = make_model(Config(cell=cell, hidden_size=8, backward="native"))
        with pytest.raises(native.NativeError, match=r"only simple_rnn \(tanh\) has GPU kernels"):
            jax.eval_shape(model.apply, model.init(jax.random.key(0)),
                           jnp.zeros((2, 28, 28)))


def test_a_layer_too_wide_for_the_kernels_is_a_clear_error(on_gpu):
    """The kernels hold the [W, W] recurrent kernel on chip: up to 128 padded units (the
    tuner then offers them no candidate)."""
    assert native_gpu.fits(128) and not native_gpu.fits(129)
    model = make_model(Config(hidden_size=200, backward="native"))
    with pytest.raises(native.NativeError, match="--hidden-size 200 pads to 256 units"):
        jax.eval_shape(model.apply, model.init(jax.random.key(0)), jnp.zeros((2, 28, 28)))


def test_without_a_compiler_a_gpu_run_may_still_choose_native(monkeypatch):
    """The CPU's kernels need a C++ compiler, the GPU's do not: where a JAX GPU plugin is
    installed (the backend may be a GPU, not known before it starts), --backward native
    is refused without a compiler only for a cell with no GPU kernels."""
    monkeypatch.setattr(native, "unavailable", lambda: "install g++")
    monkeypatch.setattr(native_gpu, "plugin_installed", lambda: True)
    make_model(Config(backward="native"))
    with pytest.raises(ConfigError, match="install g"):
        make_model(Config(cell="lstm", backward="native"))
    monkeypatch.setattr(native_gpu, "plugin_installed", lambda: False)
    with pytest.raises(ConfigError, match="install g"):
        make_model(Config(backward="native"))
    assert cells.native_backends(cells.CELLS["simple_rnn"](8)) == ("cpu", "gpu")
    assert cells.native_backends(cells.CELLS["lstm"](8)) == ("cpu",)
    assert cells.native_backends(cells.CELLS["irnn"](8)) == ()


def kernel_settings(jaxpr) -> list[tuple[int | None, list]]:
    """Each ``pallas_call`` of ``jaxpr``: its warps (None: interpreted) and its products'
    precisions."""
    return [(None if eqn.params["compiler_params"] is None
             else eqn.params["compiler_params"].num_warps,
             [dot.params["precision"] for dot in equations(eqn.params["jaxpr"], True)
              if dot.primitive.name == "dot_general"])
            for eqn in equations(jaxpr) if eqn.primitive.name == "pallas_call"]


@pytest.mark.parametrize(("hidden", "warps"), [(50, 4), (100, 8)])
def test_on_a_gpu_the_products_run_as_three_tf32_products(on_gpu, monkeypatch, hidden, warps):
    """Compiled for a GPU, each kernel's recurrent product runs at ``PRECISION`` (tf32x3:
    float32's accuracy from the tensor cores; ``test_the_kernels_lower_to_triton_for_a_gpu``
    shows Triton takes it), with 8 warps a program at a width of 128; interpreted, at
    float32 (the CPU refuses the TF32 algorithms)."""
    monkeypatch.setattr(native_gpu, "interpreted", lambda: False)
    cell = cells.CELLS["simple_rnn"](hidden)
    params = cell.init(jax.random.key(0), 28)
    xs, h0 = jnp.ones((28, 20, 28)), jnp.zeros((20, hidden))
    grad = jax.grad(functools.partial(loss, kernels))
    calls = kernel_settings(jax.make_jaxpr(grad)(params, xs, h0, 0.1).jaxpr)
    assert calls == [(warps, [native_gpu.PRECISION])] * 2
    monkeypatch.setattr(native_gpu, "interpreted", lambda: True)
    xs, h0 = jnp.ones((28, 21, 28)), jnp.zeros((21, hidden))  # not JAX's cached trace
    interpreted = jax.make_jaxpr(grad)(params, xs, h0, 0.1).jaxpr
    assert kernel_settings(interpreted) == [(None, [None])] * 2
