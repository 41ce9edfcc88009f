"""The pure function behind both Flax ``RNN`` modules: Flax's calling convention over
:func:`rnnjax.cells.scan_cell`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cells import (
    Carry,
    Cell,
    Params,
    carry_is_output,
    cast_floats,
    layout_mismatch,
    resolve_form,
    scan_cell,
)


def check_named(cell: Any, params: Any, kept_as: str) -> None:
    """ValueError naming the fix unless ``params`` (a cell's, or their shapes) is a mapping
    of names, each of which rnnjax.flax's modules keep as a param of their own (how:
    ``kept_as``); ``cell``: the cell's name, for the message."""
    if not isinstance(params, Mapping) or not all(isinstance(name, str) for name in params):
        raise ValueError(f"cell {cell!r}: its params are a {type(params).__name__}; "
                         f"rnnjax.flax's modules {kept_as}: return a dict from the cell's init")


def run(
    cell: Cell,
    params: Params,
    inputs: jax.Array,
    initial_carry: Carry | None = None,
    *,
    seq_lengths: jax.Array | None = None,
    return_carry: bool = True,
    unroll: int | bool = 1,
    chunks: int = 1,
    backward: str = "auto",
    reverse: bool = False,
    keep_order: bool = False,
    time_major: bool = False,
) -> tuple[Carry | None, jax.Array]:
    """Run ``cell`` over a sequence the way ``flax.linen.RNN`` does: ``(final carry, outputs)``
    (the carry None unless ``return_carry``).

    inputs: ``[B, T, F]`` (``[T, B, F]`` when ``time_major``), any float dtype; outputs
    ``[B, T, H]`` (``[T, B, H]``) in the same dtype (T may be 0: no outputs, and the
    initial carry, as Flax's). ``initial_carry`` is in the cell's own
    layout (rnnjax's LSTM: ``(h, c)``, each ``[B, H]``); default: the cell's zeros.
    ``unroll``: ``lax.scan``'s unroll factor, 0 or True for all T steps (False: 1, as
    ``lax.scan`` reads it). A given ``initial_carry``'s floating leaves are cast to the
    inputs' dtype.
    ``chunks``: the sequence scanned in that many consecutive parts
    (``rnnjax.cells.scan_cell``). ``backward``: the form of the cell's backward pass
    (``rnnjax.cells.resolve_form``): 'auto' (the cell's own: hand-written for simple_rnn,
    irnn and lstm), 'hand_written', 'autodiff' or 'native'. The hand-written and native
    forms are ``jax.custom_vjp`` functions, reverse mode only: forward-mode autodiff
    (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) needs 'autodiff'.
    ``reverse`` reads the sequence last step first and, as Flax, returns the outputs in that
    processed order unless ``keep_order``.
    ``seq_lengths`` (int ``[B]``, each in ``[0, T]``): sequence b is its first
    ``seq_lengths[b]`` steps, the rest padding, as in Flax: ``reverse`` reverses only those
    steps (the padding stays last), and the final carry is the one after step
    ``seq_lengths[b]`` (the initial carry for length 0; Flax reads step T's there). The
    outputs of padding steps are computed over the padding and mean nothing. A cell whose
    carry is its output (simple_rnn, irnn, gru) reads that carry from the outputs; any
    other keeps every step's carry, as Flax does, in the autodiff form of its step, and
    with ``return_carry`` needs the batch axis first in every carry array (ValueError).
    """
    if inputs.ndim != 3:
        raise ValueError(f"RNN expects inputs [batch, time, features] (or [time, batch, "
                         f"features] with time_major=True), got shape {inputs.shape}")
    xs = inputs if time_major else jnp.swapaxes(inputs, 0, 1)
    time, batch = xs.shape[:2]
    _check_call(cell, params, xs, initial_carry)
    # Every call checks the module's form, the calls that run autodiff (no steps; a cell
    # keeping each step's carry for seq_lengths) too: a form it cannot run is an error there.
    resolve_form(cell, batch, backward)
    lengths = None if seq_lengths is None else _checked_lengths(seq_lengths, batch, time)
    flip = _flip if lengths is None else functools.partial(_flip_valid, lengths=lengths)
    if reverse:
        xs = flip(xs)
    unroll = 0 if unroll is True else 1 if unroll is False else int(unroll)
    carry = (cell.initial_carry(batch, xs.dtype) if initial_carry is None
             else cast_floats(initial_carry, inputs.dtype))
    if time == 0:  # no steps, as Flax's RNN reads them: the initial carry, no outputs
        final, ys = carry, jnp.zeros((0, batch, cell.hidden_size), xs.dtype)
    elif lengths is None or not return_carry:
        final, ys = scan_cell(cell, params, xs, carry, unroll=unroll, chunks=chunks,
                              backward=backward)
    elif carry_is_output(cell):
        _, ys = scan_cell(cell, params, xs, carry, unroll=unroll, chunks=chunks,
                          backward=backward)
        final = _at_lengths(ys, carry, lengths)
    else:
        _check_batched(carry, batch)
        _, (carries, ys) = scan_cell(_keeping_carries(cell), params, xs, carry, unroll=unroll,
                                     chunks=chunks)
        final = jax.tree.map(functools.partial(_at_lengths, lengths=lengths),
                             carries, carry)
    if reverse and keep_order:
        ys = flip(ys)
    return final if return_carry else None, ys if time_major else jnp.swapaxes(ys, 0, 1)


def call(module: Any, cell: Cell, params: Params, inputs: jax.Array,
         initial_carry: Carry | None, seq_lengths: jax.Array | None,
         **overrides: bool | None) -> Any:
    """A Flax ``RNN`` module's ``__call__`` (Flax's ``RNNBase`` protocol, which
    ``nn.Bidirectional`` and ``nnx.Bidirectional`` call): :func:`run` with the module's
    ``unroll``, ``chunks`` and ``backward``, and ``overrides`` (``return_carry``, ``time_major``,
    ``reverse``, ``keep_order``) each the module's attribute of that name where None.
    Returns the outputs, or ``(final carry, outputs)`` with ``return_carry``."""
    options = {name: getattr(module, name) if value is None else value
               for name, value in overrides.items()}
    carry, outputs = run(cell, params, inputs, initial_carry, seq_lengths=seq_lengths,
                         unroll=module.unroll, chunks=module.chunks,
                         backward=module.backward, **options)
    return (carry, outputs) if options["return_carry"] else outputs


def _check_call(cell: Cell, params: Params, xs: jax.Array, initial_carry: Carry | None
                ) -> None:
    """A ValueError naming the fix, at trace time, unless :func:`run`'s time-major inputs
    ``xs [T, B, F]`` are floats of the features ``params`` were made for (the shapes of
    the cell's init at F) and ``initial_carry`` (where given) is in the cell's layout for a
    batch of B."""
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise ValueError(f"RNN: inputs of dtype {xs.dtype}; give floats (images as float32 "
                         "in [0, 1], e.g. / 255)")
    features, batch = xs.shape[2], xs.shape[1]
    made = jax.eval_shape(lambda: cell.init(jax.random.key(0), features))
    mismatch = layout_mismatch(params, made)
    if mismatch is not None:
        raise ValueError(f"RNN: inputs of {features} features a step, which the layer's "
                         f"params do not read ({mismatch}): give the inputs the layer was "
                         "made for, [batch, time, in_features]")
    if initial_carry is not None:
        mismatch = layout_mismatch(initial_carry,
                                   jax.eval_shape(lambda: cell.initial_carry(batch, xs.dtype)))
        if mismatch is not None:
            raise ValueError(f"RNN: initial_carry is not the cell's carry for a batch of "
                             f"{batch} ({mismatch}): give it in the cell's layout, as "
                             "its initial_carry(batch, dtype) makes it (rnnjax's LSTM: "
                             "(h, c), each [batch, hidden_size])")


def _check_batched(carry: Carry, batch: int) -> None:
    """A ValueError naming the fix unless every array of ``carry`` is ``[B, ...]``, its
    first axis the batch of ``B``: :func:`run` with ``seq_lengths`` and ``return_carry``
    reads row b of each at sequence b's length (a step counter ``[]`` has no row b)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(carry)[0]:
        shape = list(jnp.shape(leaf))
        if not shape or shape[0] != batch:
            where = jax.tree_util.keystr(path) or "(one array)"
            raise ValueError(
                f"RNN: seq_lengths reads each sequence's final carry at its own length, row "
                f"b of every carry array, but the cell's carry {where} has shape {shape}, "
                f"not [{batch}, ...]: give each carry array the batch axis first, or call "
                "with return_carry=False (the outputs need no final carry)")


def _checked_lengths(seq_lengths: jax.Array, batch: int, time: int) -> jax.Array:
    """``seq_lengths`` as int32 ``[B]``; ValueError for another shape or dtype, or (when
    its values are known, not traced) a length outside ``[0, T]``."""
    lengths = jnp.asarray(seq_lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"seq_lengths must be integers [batch] = [{batch}], got "
                         f"{lengths.dtype} {lengths.shape}")
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        if values.size and (values.min() < 0 or values.max() > time):  # size: an empty batch
            raise ValueError(f"seq_lengths must lie in [0, {time}] (the sequence's steps), "
                             f"got {values.min()}..{values.max()}")
    return lengths.astype(jnp.int32)


def _flip(xs: jax.Array) -> jax.Array:
    """Time-major ``xs [T, B, ...]`` last step first."""
    return xs[::-1]


def _flip_valid(xs: jax.Array, lengths: jax.Array) -> jax.Array:
    """Each sequence b of time-major ``xs [T, B, ...]`` with its first ``lengths[b]`` steps
    reversed, and its padding after them reversed too, as ``flax.linen.flip_sequences``:
    step t reads step ``(lengths[b] - 1 - t) mod T``; its own inverse."""
    time = xs.shape[0]
    index = (lengths[None, :] - 1 - jnp.arange(time)[:, None]) % time  # [T, B]
    return jnp.take_along_axis(xs, index.reshape(index.shape + (1,) * (xs.ndim - 2)), axis=0)


def _at_lengths(steps: jax.Array, first: jax.Array, lengths: jax.Array) -> jax.Array:
    """Row b of ``steps [T, B, ...]`` at step ``lengths[b] - 1``; ``first [B, ...]``'s row
    where the length is 0."""
    last = steps[jnp.maximum(lengths - 1, 0), jnp.arange(steps.shape[1])]
    return jnp.where((lengths > 0).reshape((-1,) + (1,) * (last.ndim - 1)), last,
                     first.astype(last.dtype))


def _keeping_carries(cell: Cell) -> Cell:
    """``cell`` whose every step outputs its carry too, ``y_t`` as ``(carry_t, y_t)``: run
    by :func:`~rnnjax.cells.scan_cell` in the autodiff form (its hand-written and native
    forms output no carries)."""
    def step(params: Params, carry: Carry, u: jax.Array) -> tuple[Carry, tuple[Carry, jax.Array]]:
        carry, y = cell.step(params, carry, u)
        return carry, (carry, y)

    return dataclasses.replace(cell, step=step, sequence=None, native=None, last_output=None,
                               backward="autodiff", options=())
