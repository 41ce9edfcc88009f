"""The pure function behind both Flax ``RNN`` modules: Flax's calling convention over
:func:`rnnjax.cells.scan_cell`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rnnjax.cells import Carry, Cell, Params, scan_cell
from rnnjax.flax.cells import cast_floats


def run(
    cell: Cell,
    params: Params,
    inputs: jax.Array,
    initial_carry: Carry | None = None,
    *,
    unroll: int | bool = 1,
    chunks: int = 1,
    reverse: bool = False,
    keep_order: bool = False,
    time_major: bool = False,
) -> tuple[Carry, jax.Array]:
    """Run ``cell`` over a sequence the way ``flax.linen.RNN`` does: ``(final carry, outputs)``.

    inputs: ``[B, T, F]`` (``[T, B, F]`` when ``time_major``), any float dtype; outputs
    ``[B, T, H]`` (``[T, B, H]``) in the same dtype. ``initial_carry`` is in the cell's own
    layout (rnnjax's LSTM: ``(h, c)``, each ``[B, H]``); default: the cell's zeros.
    ``unroll``: ``lax.scan``'s unroll factor, 0 or True for all T steps (False: 1, as
    ``lax.scan`` reads it). A given ``initial_carry``'s floating leaves are cast to the
    inputs' dtype.
    ``chunks``: the sequence scanned in that many consecutive parts
    (``rnnjax.cells.scan_cell``).
    ``reverse`` reads the sequence last step first and, as Flax, returns the outputs in that
    processed order unless ``keep_order``.
    """
    if inputs.ndim != 3:
        raise ValueError(f"RNN expects inputs [batch, time, features] (or [time, batch, "
                         f"features] with time_major=True), got shape {inputs.shape}")
    xs = inputs if time_major else jnp.swapaxes(inputs, 0, 1)
    if reverse:
        xs = xs[::-1]
    unroll = 0 if unroll is True else 1 if unroll is False else int(unroll)
    if initial_carry is not None:
        initial_carry = cast_floats(initial_carry, inputs.dtype)
    carry, ys = scan_cell(cell, params, xs, initial_carry, unroll=unroll, chunks=chunks)
    if reverse and keep_order:
        ys = ys[::-1]
    return carry, ys if time_major else jnp.swapaxes(ys, 0, 1)

