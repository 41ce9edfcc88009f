"""Recurrent cells as pure functions: the body of a ``jax.lax.scan`` over time.

A :class:`Cell` is a handful of pure functions, no state:

* ``init(key, input_size) -> params`` (a pytree of float32 arrays);
* ``initial_carry(batch, dtype) -> carry``;
* ``step(params, carry, x_t) -> (carry, y_t)``: one time step, x_t ``[B, F]``, y_t ``[B, H]``;
* optional ``project(params, xs) -> us``: the input projection of *all* time steps at once
  (``xs [T, B, F] -> us [T, B, G]``), hoisted out of the scan into one large matrix
  product; when present, ``step`` receives ``u_t`` instead of ``x_t``;
* optional ``sequence(params, xs, carry, unroll, weight_grad) -> (carry, ys)``: a faster
  equivalent of projecting and scanning ``step`` over raw ``xs [T, B, F]`` (the Elman cells
  use it for a hand-written backward pass); ``weight_grad`` ('auto', 'product' or
  'per_step', ``rnnjax.config.WEIGHT_GRADS``) is the form of the weight gradient where a
  cell has several (the Elman cells), ignored by the others.

A new cell needs only ``init``, ``step``, ``initial_carry`` and ``hidden_size``. Initialisers
follow Keras so results compare with it: glorot-uniform input kernels, orthogonal recurrent
kernels, zero biases (LSTM: forget-gate bias 1; IRNN: identity recurrent kernel).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

Params = Any
Carry = Any

glorot_uniform = jax.nn.initializers.glorot_uniform()
orthogonal = jax.nn.initializers.orthogonal()


@dataclass(frozen=True, eq=False)
class Cell:
    """A recurrent cell: pure functions plus its width. See the module docstring."""

    init: Callable[[jax.Array, int], Params]
    step: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
    initial_carry: Callable[[int, Any], Carry]
    hidden_size: int
    project: Callable[[Params, jax.Array], jax.Array] | None = None
    sequence: Callable[[Params, jax.Array, Carry, int, str], tuple[Carry, jax.Array]] | None = None


def scan_cell(
    cell: Cell, params: Params, xs: jax.Array, carry: Carry | None = None, unroll: int = 1,
    weight_grad: str = "auto",
) -> tuple[Carry, jax.Array]:
    """Run ``cell`` over time-major ``xs [T, B, F]``: ``(final carry, ys [T, B, H])``.

    ``unroll`` is ``lax.scan``'s unroll factor; 0 unrolls all T steps. ``weight_grad``
    ('auto', 'product', 'per_step') goes to the cell's ``sequence``.
    """
    time, batch = xs.shape[0], xs.shape[1]
    if carry is None:
        carry = cell.initial_carry(batch, xs.dtype)
    unroll = unroll or time
    if cell.sequence is not None:
        return cell.sequence(params, xs, carry, unroll, weight_grad)
    us = cell.project(params, xs) if cell.project is not None else xs
    return jax.lax.scan(functools.partial(cell.step, params), carry, us, unroll=unroll)


def _dense_projection(params: Params, xs: jax.Array) -> jax.Array:
    """``xs [T, B, F] @ kernel [F, G] + bias [G] -> [T, B, G]``."""
    return xs @ params["kernel"].astype(xs.dtype) + params["bias"].astype(xs.dtype)


def _zeros_carry(hidden: int) -> Callable[[int, Any], jax.Array]:
    return lambda batch, dtype: jnp.zeros((batch, hidden), dtype)


def _time_batch_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``sum_t a_t^T b_t``: ``[T, B, M] x [T, B, N] -> [M, N]`` in one product, accumulated
    in float32 or wider.

    Contracted over time *and* batch in one dot_general, with no ``[T*B]`` reshape: with the
    batch sharded over devices (rnnjax.parallel) XLA then computes each device's partial
    product and all-reduces it, where merging T and a sharded B made it all-gather the
    activations.
    """
    acc = jnp.promote_types(a.dtype, jnp.float32)
    return jax.lax.dot_general(a, b, (((0, 1), (0, 1)), ((), ())), preferred_element_type=acc)


def _previous(first: jax.Array, seq: jax.Array) -> jax.Array:
    """``[first, seq_0, ..., seq_{T-2}]``: the value before each time step, ``[T, ...]``."""
    return jnp.concatenate([first[None], seq[:-1]], axis=0)


# --- Elman cells (SimpleRNN, IRNN) and their fused backward pass --------------------------

_ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    # activation, and its derivative written in terms of the activation's *output*.
    "tanh": (jnp.tanh, lambda h: 1 - h * h),
    "relu": (jax.nn.relu, lambda h: (h > 0).astype(h.dtype)),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def elman_layer(
    xs: jax.Array,
    kernel: jax.Array,
    recurrent: jax.Array,
    bias: jax.Array,
    h0: jax.Array,
    activation: str,
    unroll: int,
    weight_grad: str = "auto",
) -> jax.Array:
    """One Elman layer over time: ``h_t = act(x_t @ kernel + bias + h_{t-1} @ recurrent)``.

    xs [T, B, F], kernel [F, H], recurrent [H, H], bias [H], h0 [B, H] -> hs [T, B, H].
    The input projection of all T steps is one product before the scan. The custom VJP
    keeps the backward loop to what is truly sequential, ``dz_t = (dh_t + g) * act'``
    and ``g = dz_t @ recurrent^T``; the kernel and recurrent-kernel gradients are then
    one product over all steps, ``[x_t, h_{t-1}]^T dz``, instead of T small
    accumulations inside the loop (what autodiff of the scan does); ``weight_grad``
    'per_step' accumulates them in the loop instead, 'auto' picks by batch size.
    """
    return _elman_forward(xs, kernel, recurrent, bias, h0, activation, unroll)


def _elman_forward(xs, kernel, recurrent, bias, h0, activation, unroll):
    act = _ACTIVATIONS[activation][0]
    dtype = xs.dtype
    us = xs @ kernel.astype(dtype) + bias.astype(dtype)
    recurrent = recurrent.astype(dtype)

    def step(h, u):
        h = act(u + h @ recurrent)
        return h, h

    return jax.lax.scan(step, h0, us, unroll=unroll)[1]


def _elman_fwd(xs, kernel, recurrent, bias, h0, activation, unroll, weight_grad):
    hs = _elman_forward(xs, kernel, recurrent, bias, h0, activation, unroll)
    return hs, (xs, hs, kernel, recurrent, bias, h0)


# From this batch size up, the weight gradient is accumulated step by step inside the
# backward loop (off its critical path) instead of as one product after it: XLA:CPU's
# transpose of the [T, B, F + H] activations for the one product grows to dominate the
# step. Measured on a 2-core AMD EPYC, jax 0.10.2, ms/step one product / per step:
# batch 50 0.98 / 1.41, 256 4.5 / 5.3, 1024 18.7 / 16.2, 4096 113 / 87 (unroll 1).
# Only the untuned fallback (weight_grad 'auto'): rnnjax.tune measures both forms.
PER_STEP_WEIGHT_GRADIENT_BATCH = 512


def _elman_bwd(activation, unroll, weight_grad, residuals, dhs):
    xs, hs, kernel, recurrent, bias, h0 = residuals
    features = xs.shape[-1]
    deriv = _ACTIVATIONS[activation][1](hs)
    rec_t = recurrent.astype(hs.dtype).T
    h_prev = _previous(h0, hs)

    if weight_grad == "per_step" or (
        weight_grad == "auto" and xs.shape[1] >= PER_STEP_WEIGHT_GRADIENT_BATCH
    ):

        def step(carry, inputs_t):
            g, dkernel, drecurrent = carry
            dh, d, x, h = inputs_t
            dz = (dh + g) * d
            dkernel = dkernel + jnp.matmul(x.T, dz, preferred_element_type=jnp.float32)
            drecurrent = drecurrent + jnp.matmul(h.T, dz, preferred_element_type=jnp.float32)
            return (dz @ rec_t, dkernel, drecurrent), dz

        zeros = (jnp.zeros(kernel.shape, jnp.float32), jnp.zeros(recurrent.shape, jnp.float32))
        (dh0, *dweights), dzs = jax.lax.scan(
            step, (jnp.zeros_like(h0), *zeros), (dhs, deriv, xs, h_prev), reverse=True,
            unroll=unroll,
        )
        dweights = jnp.concatenate(dweights, axis=0)
    else:

        def step(g, inputs_t):
            dh, d = inputs_t
            dz = (dh + g) * d
            return dz @ rec_t, dz

        dh0, dzs = jax.lax.scan(step, jnp.zeros_like(h0), (dhs, deriv), reverse=True,
                                unroll=unroll)
        # [x_t, h_{t-1}]^T dz over all steps in one product.
        dweights = _time_batch_product(jnp.concatenate([xs, h_prev], axis=-1), dzs)
    dxs = dzs @ kernel.astype(dzs.dtype).T
    dbias = dzs.sum(axis=(0, 1), dtype=jnp.float32)
    return (
        dxs,
        dweights[:features].astype(kernel.dtype),
        dweights[features:].astype(recurrent.dtype),
        dbias.astype(bias.dtype),
        dh0,
    )


elman_layer.defvjp(_elman_fwd, _elman_bwd)


def _elman(hidden: int, activation: str, recurrent_init: Callable) -> Cell:
    act = _ACTIVATIONS[activation][0]

    def init(key: jax.Array, input_size: int) -> Params:
        k_in, k_rec = jax.random.split(key)
        return {
            "kernel": glorot_uniform(k_in, (input_size, hidden), jnp.float32),
            "recurrent_kernel": recurrent_init(k_rec, (hidden, hidden), jnp.float32),
            "bias": jnp.zeros((hidden,), jnp.float32),
        }

    def step(params: Params, h: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = act(u + h @ params["recurrent_kernel"].astype(u.dtype))
        return h, h

    def sequence(params, xs, h0, unroll, weight_grad="auto"):
        hs = elman_layer(xs, params["kernel"], params["recurrent_kernel"], params["bias"], h0,
                         activation, unroll, weight_grad)
        return hs[-1], hs

    return Cell(init, step, _zeros_carry(hidden), hidden, _dense_projection, sequence)


@functools.cache
def simple_rnn(hidden: int) -> Cell:
    """Keras ``SimpleRNN``: ``h_t = tanh(x_t W + b + h_{t-1} U)``, 3 arrays."""
    return _elman(hidden, "tanh", orthogonal)


def _identity(key, shape, dtype):
    del key
    return jnp.eye(*shape, dtype=dtype)


@functools.cache
def irnn(hidden: int) -> Cell:
    """IRNN (Le, Jaitly & Hinton 2015): ReLU Elman cell, identity recurrent kernel."""
    return _elman(hidden, "relu", _identity)


# --- Gated cells ---------------------------------------------------------------------------


def _gated_init(hidden: int, gates: int, bias: Callable[[], jax.Array]) -> Callable:
    def init(key: jax.Array, input_size: int) -> Params:
        k_in, k_rec = jax.random.split(key)
        return {
            "kernel": glorot_uniform(k_in, (input_size, gates * hidden), jnp.float32),
            # As Keras: one orthogonal [H, gates*H] matrix (orthonormal rows).
            "recurrent_kernel": orthogonal(k_rec, (hidden, gates * hidden), jnp.float32),
            "bias": bias(),
        }

    return init


# The LSTM recurrence, like elman_layer, has a hand-written backward pass: the forward scan
# saves one [B, 4H] array of gate activations per step (autodiff of the scan saved a dozen
# [B, H] pieces, each its own dynamic-update-slice), the backward scan is one elementwise
# fusion and one [B, 4H] x [4H, H] product per step, and the recurrent-kernel gradient is
# one product over all steps; the input projection stays outside (autodiff). Measured on
# the 2-core AMD EPYC, batch 50, median ms per train step, autodiff / fused, in one
# process: rows 7.45 / 6.17, pixels 205 / 183. (The same for the GRU measured no faster,
# 183 / 187 on pixels, so the GRU keeps autodiff.)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lstm_layer(
    us: jax.Array, recurrent: jax.Array, h0: jax.Array, c0: jax.Array, unroll: int
) -> tuple[jax.Array, jax.Array]:
    """The LSTM recurrence over projected inputs (Keras gate order i, f, c, o).

    us [T, B, 4H] (``x_t @ kernel + bias``), recurrent [H, 4H], h0 and c0 [B, H] ->
    (hs [T, B, H], the last cell state c_T [B, H]); computed in ``us.dtype``.
    """
    hs, c_last, _ = _lstm_forward(us, recurrent, h0, c0, unroll)
    return hs, c_last


def _lstm_step(recurrent, carry, u):
    """One LSTM step: ``((h, c), u_t) -> ((h, c), (h, c, gate activations [B, 4H]))``.

    The sigmoid runs over all four gate blocks at once: XLA:CPU vectorises it over the
    contiguous [B, 4H] array, where per-gate slices ran 3-4x slower (measured: the LSTM
    forward step at batch 50 took 100 us with sliced gates, 29 us so). Bitwise the same.
    """
    h, c = carry
    z = u + h @ recurrent.astype(u.dtype)
    i, f, _, o = jnp.split(jax.nn.sigmoid(z), 4, axis=-1)
    hidden = h.shape[-1]
    g = jnp.tanh(z[..., 2 * hidden : 3 * hidden])
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return (h, c), (h, c, jnp.concatenate([i, f, g, o], axis=-1))


def _lstm_forward(us, recurrent, h0, c0, unroll):
    step = functools.partial(_lstm_step, recurrent.astype(us.dtype))
    (_, c_last), (hs, cs, gates) = jax.lax.scan(step, (h0, c0), us, unroll=unroll)
    return hs, c_last, (cs, gates)


def _lstm_fwd(us, recurrent, h0, c0, unroll):
    hs, c_last, (cs, gates) = _lstm_forward(us, recurrent, h0, c0, unroll)
    return (hs, c_last), (recurrent, h0, c0, hs, cs, gates)


def _lstm_bwd(unroll, residuals, cotangents):
    recurrent, h0, c0, hs, cs, gates = residuals
    dhs, dc_last = cotangents
    rec_t = recurrent.astype(hs.dtype).T

    def step(carry, inputs_t):
        dh_next, dc = carry  # from step t + 1: dz_{t+1} @ recurrent^T and dc_{t+1} * f
        dh, c, c_prev, a = inputs_t
        i, f, g, o = jnp.split(a, 4, axis=-1)
        dh = dh + dh_next
        tanh_c = jnp.tanh(c)
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        dz = jnp.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f),
                              dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)], axis=-1)
        return (dz @ rec_t, dc * f), dz

    (dh0, dc0), dzs = jax.lax.scan(
        step, (jnp.zeros_like(h0), dc_last.astype(c0.dtype)),
        (dhs, cs, _previous(c0, cs), gates), reverse=True, unroll=unroll,
    )
    drecurrent = _time_batch_product(_previous(h0, hs), dzs)
    return dzs, drecurrent.astype(recurrent.dtype), dh0, dc0


lstm_layer.defvjp(_lstm_fwd, _lstm_bwd)


@functools.cache
def lstm(hidden: int) -> Cell:
    """Keras ``LSTM`` (gates i, f, c, o; forget bias 1); carry ``(h, c)``."""

    def bias() -> jax.Array:
        return jnp.zeros((4 * hidden,), jnp.float32).at[hidden : 2 * hidden].set(1.0)

    def step(params, carry, u):
        carry, (h, _, _) = _lstm_step(params["recurrent_kernel"], carry, u)
        return carry, h

    def initial_carry(batch, dtype):
        zeros = jnp.zeros((batch, hidden), dtype)
        return zeros, zeros

    def sequence(params, xs, carry, unroll, weight_grad="auto"):
        del weight_grad  # one form: the recurrent-kernel gradient is one product
        h0, c0 = carry
        hs, c_last = lstm_layer(_dense_projection(params, xs), params["recurrent_kernel"],
                                h0, c0, unroll)
        return (hs[-1], c_last), hs

    return Cell(_gated_init(hidden, 4, bias), step, initial_carry, hidden, _dense_projection,
                sequence)


@functools.cache
def gru(hidden: int) -> Cell:
    """Keras ``GRU`` (``reset_after=True``: gates z, r, h; separate recurrent bias)."""

    base = _gated_init(hidden, 3, lambda: jnp.zeros((3 * hidden,), jnp.float32))

    def init(key, input_size):
        params = base(key, input_size)
        params["recurrent_bias"] = jnp.zeros((3 * hidden,), jnp.float32)
        return params

    def step(params, h, u):
        r_all = h @ params["recurrent_kernel"].astype(u.dtype)
        r_all = r_all + params["recurrent_bias"].astype(u.dtype)
        uz, ur, uh = jnp.split(u, 3, axis=-1)
        rz, rr, rh = jnp.split(r_all, 3, axis=-1)
        z = jax.nn.sigmoid(uz + rz)
        r = jax.nn.sigmoid(ur + rr)
        candidate = jnp.tanh(uh + r * rh)
        h = z * h + (1 - z) * candidate
        return h, h

    return Cell(init, step, _zeros_carry(hidden), hidden, _dense_projection)


CELLS: dict[str, Callable[[int], Cell]] = {
    "simple_rnn": simple_rnn,
    "irnn": irnn,
    "lstm": lstm,
    "gru": gru,
}


def get_cell(name: str, hidden: int) -> Cell:
    """The cell ``name`` of width ``hidden``: one registered in :data:`CELLS`, or a Flax cell
    class named ``MODULE:CLASS`` (``rnnjax.flax.cells``)."""
    if name in CELLS:
        return CELLS[name](hidden)
    if ":" in name:
        from rnnjax.flax.cells import flax_cell

        return flax_cell(name, hidden)
    raise ValueError(f"unknown cell {name!r}; choose one of {', '.join(CELLS)}, or a Flax "
                     "cell class as MODULE:CLASS (e.g. flax.linen:GRUCell)")
