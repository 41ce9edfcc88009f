"""Recurrent cells as pure functions: the body of a ``jax.lax.scan`` over time.

A :class:`Cell` is a handful of pure functions, no state:

* ``init(key, input_size) -> params`` (a pytree of float32 arrays);
* ``initial_carry(batch, dtype) -> carry``;
* ``step(params, carry, x_t) -> (carry, y_t)``: one time step, x_t ``[B, F]``, y_t ``[B, H]``;
* optional ``project(params, xs) -> us``: the input projection of *all* time steps at once
  (``xs [T, B, F] -> us [T, B, G]``), hoisted out of the scan into one large matrix
  product; when present, ``step`` receives ``u_t`` instead of ``x_t``. Under autodiff
  with the projection in the loop it is called on each step as ``[1, B, F]``: write a
  dense product so that one step is projected as a 2-D ``[B, F] x [F, G]`` product (as
  ``_dense_projection`` does), or its kernel's gradient each step is a 3-D product that
  XLA:CPU runs several times slower;
* optional ``sequence(params, xs, carry, unroll, weight_grad, projection) -> (carry, ys)``:
  an equivalent of projecting and scanning ``step`` over raw ``xs [T, B, F]`` with a
  hand-written backward pass (the built-in cells); ``weight_grad`` ('product' or
  'per_step': the weight gradient as one product over all steps after the backward loop,
  or accumulated inside it) and ``projection`` ('hoisted' or 'in_loop': ``x_t @ kernel``
  as one product before the forward loop, or inside it) are forms of the same sums, each
  faster on some machines and shapes (``rnnjax.tune`` measures them); a cell lists the
  ones its ``sequence`` honours in ``Cell.options``, and ``Cell.backward`` says whether
  ``sequence`` ('hand_written') or autodiff of the scan ('autodiff') is its default;
* optional ``native(params, xs, carry, lanes, rows=None, outputs=True) -> (carry, ys)``:
  the same as ``sequence`` with native XLA:CPU custom calls for its passes
  (``rnnjax.native``: ``simple_rnn``, ``lstm``, ``gru``), built for vectors of ``lanes``
  floats (8 or 16), the backward 'native' (``outputs`` False: ys may be None, the forward
  writing no [T, B, ...] arrays where no gradient is taken); on a GPU, Pallas kernels
  (``rnnjax.native_gpu``: ``simple_rnn``, :func:`native_backends`);
* optional ``last_output(carry) -> y``: the last step's output ``y_T [B, H]`` read from the
  final carry. A model that only needs ``y_T`` then leaves ``ys`` unused, and XLA drops
  storing it (an evaluation pass writes no ``[T, B, H]`` array).

A new cell needs only ``init``, ``step``, ``initial_carry`` and ``hidden_size``. Initialisers
follow Keras so results compare with it: glorot-uniform input kernels, orthogonal recurrent
kernels, zero biases (LSTM: forget-gate bias 1; IRNN: identity recurrent kernel).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp

from rnnjax import native_gpu, registry
from rnnjax.config import BACKWARDS, NATIVE_LANES, PROJECTIONS, WEIGHT_GRADS, error_line

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
    sequence: Callable[..., tuple[Carry, jax.Array]] | None = None
    last_output: Callable[[Carry], jax.Array] | None = None
    native: Callable[..., tuple[Carry, jax.Array | None]] | None = None
    backward: str = "hand_written"  # what backward 'auto' runs when there is a sequence
    options: tuple[str, ...] = ()  # the forms sequence honours: 'weight_grad', 'projection'

    def __post_init__(self) -> None:
        """A TypeError or ValueError naming the fix unless ``hidden_size`` is a positive
        integer (a string's '50' * 4 would be a shape of '50505050' deep in JAX)."""
        if isinstance(self.hidden_size, bool):
            raise TypeError(f"Cell: hidden_size {self.hidden_size!r}; give a positive int")
        try:
            width = operator.index(self.hidden_size)
        except TypeError:
            raise TypeError(f"Cell: hidden_size {self.hidden_size!r} "
                            f"({type(self.hidden_size).__name__}); give a positive int"
                            ) from None
        if width < 1:
            raise ValueError(f"Cell: hidden_size {width}; give a positive int")
        object.__setattr__(self, "hidden_size", width)  # a NumPy integer as Python's


@dataclass(frozen=True)
class Form:
    """How a layer's train step computes the same sums: each field is a concrete choice
    (none 'auto'; see :func:`resolve_form`).

    backward: 'hand_written' (the cell's ``sequence``), 'autodiff' (of ``lax.scan`` over
    ``step``) or 'native' (the cell's ``native``, which has no other forms: 'hoisted',
    'product'); projection: 'hoisted' (``x_t @ kernel`` of all steps before the loop) or
    'in_loop'; weight_grad: 'product' or 'per_step' (hand-written backward passes only).
    """

    backward: str
    projection: str
    weight_grad: str

    @property
    def reads_inputs_by_step(self) -> bool:
        """Whether a layer in this form reads its input ``xs [T, B, F]`` only a step at a
        time: the projection in the loop and the input kernel's gradient summed step by
        step (autodiff's, or the per-step weight gradient); a hoisted projection and the
        one weight-gradient product read all of ``xs`` at once."""
        return self.projection == "in_loop" and (
            self.backward == "autodiff" or self.weight_grad == "per_step")


# The untuned fallback of weight_grad 'auto' for the cells that honour it: from this batch
# size up, the weight gradient is accumulated step by step inside the backward loop (off
# its critical path) instead of as one product after it: XLA:CPU's transpose of the
# [T, B, F + H] activations for the one product grows to dominate the step. Measured on a
# 2-core AMD EPYC, jax 0.10.2, SimpleRNN ms/step one product / per step: batch 50
# 0.98 / 1.41, 256 4.5 / 5.3, 1024 18.7 / 16.2, 4096 113 / 87 (unroll 1); the LSTM at 1024,
# 68 / 57. rnnjax.tune measures both forms.
PER_STEP_WEIGHT_GRADIENT_BATCH = 512


def backwards_besides_native(cell: Cell) -> str:
    """The backward forms ``cell`` has but 'native', as a refusal lists them: a cell without
    ``sequence`` (a Flax cell, most of one's own) has no hand-written backward."""
    return "hand_written, autodiff or auto" if cell.sequence is not None else "autodiff or auto"


def cast_floats(tree: Any, dtype: Any) -> Any:
    """``tree`` with its floating leaves in ``dtype``; others (a cell's int32 step count)
    as they are, as Flax's RNNs keep them."""
    def cast(leaf: Any) -> Any:
        array = jnp.asarray(leaf)
        return array.astype(dtype) if jnp.issubdtype(array.dtype, jnp.floating) else leaf

    return jax.tree.map(cast, tree)


def resolve_form(cell: Cell, batch: int, backward: str = "auto", projection: str = "auto",
                 weight_grad: str = "auto") -> Form:
    """The concrete :class:`Form` the choices name for ``cell`` at ``batch``.

    'auto': the cell's own backward (``Cell.backward``; autodiff without a ``sequence``;
    never 'native', which only a choice or the tuner makes);
    under a hand-written backward the projection hoisted and the weight gradient per step
    from :data:`PER_STEP_WEIGHT_GRADIENT_BATCH`; under autodiff the projection in the loop
    (measured 1.3-1.6x faster than hoisted for every built-in cell at batch 1024, and for the
    GRU by pixels at 50). A choice the cell cannot make reads as the one it makes ('in_loop'
    for a cell without ``project``).
    """
    for value, choices, name in ((backward, BACKWARDS, "backward"),
                                 (projection, PROJECTIONS, "projection"),
                                 (weight_grad, WEIGHT_GRADS, "weight_grad")):
        if value not in choices:
            raise ValueError(f"{name} {value!r}; choose one of {', '.join(choices)}")
    if backward == "native":
        if cell.native is None:
            raise ValueError("backward 'native': this cell has no native kernels (simple_rnn, "
                             f"lstm and gru have); choose {backwards_besides_native(cell)}")
        return Form("native", "hoisted", "product")
    if cell.sequence is None:
        backward = "autodiff"
    elif backward == "auto":
        backward = cell.backward
    hand = backward == "hand_written"
    has_both = "projection" in cell.options if hand else cell.project is not None
    if projection == "auto" or not has_both:
        projection = "hoisted" if hand else "in_loop"
    if not (hand and "weight_grad" in cell.options):
        weight_grad = "product"  # autodiff's own; the forms are then the same program
    elif weight_grad == "auto":
        weight_grad = _auto_weight_grad(batch)
    return Form(backward, projection, weight_grad)


def unhonoured(cell: Cell, batch: int, **choices: str) -> tuple[Form, list[str]]:
    """The form that ``choices`` (of :class:`Form`'s fields) run as for ``cell`` at ``batch``
    (:func:`resolve_form`), and those of them, 'auto' aside, it does not run as named (a
    choice the cell cannot make reads as the one it makes)."""
    form = resolve_form(cell, batch, **choices)
    return form, [name for name, value in choices.items()
                  if value not in ("auto", getattr(form, name))]


def _auto_weight_grad(batch: int) -> str:
    """What weight_grad 'auto' is at ``batch`` (:data:`PER_STEP_WEIGHT_GRADIENT_BATCH`)."""
    return "per_step" if batch >= PER_STEP_WEIGHT_GRADIENT_BATCH else "product"


def _loop_inputs(xs: jax.Array, kernel: jax.Array, in_loop: bool
                 ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """A forward loop's scanned inputs and what each step does to its slice: ``xs`` and
    ``x_t @ kernel`` when the projection is in the loop, else the projection of all steps
    (``xs @ kernel``, one product) and nothing. The same sums either way."""
    if in_loop:
        return xs, lambda x_t: x_t @ kernel
    return xs @ kernel, lambda xw_t: xw_t


def chunk_bounds(time: int, chunks: int) -> list[int]:
    """Where ``chunks`` consecutive parts of ``time`` steps start, and the end: as equal as
    whole steps allow (28 steps in 8 parts: 3 or 4 each)."""
    if not 1 <= chunks <= time:
        raise ValueError(f"chunks {chunks}: choose 1 to {time}, the sequence's steps")
    return [time * i // chunks for i in range(chunks + 1)]


@overload
def scan_cell(
    cell: Cell, params: Params, xs: jax.Array, carry: Carry | None = ..., unroll: int = ...,
    weight_grad: str = ..., projection: str = ..., backward: str = ..., chunks: int = ...,
    native_lanes: int = ..., rows: jax.Array | None = ..., outputs: Literal[True] = ...,
    mesh: jax.sharding.Mesh | None = ...,
) -> tuple[Carry, jax.Array]: ...
@overload
def scan_cell(
    cell: Cell, params: Params, xs: jax.Array, carry: Carry | None = ..., unroll: int = ...,
    weight_grad: str = ..., projection: str = ..., backward: str = ..., chunks: int = ...,
    native_lanes: int = ..., rows: jax.Array | None = ..., outputs: bool = ...,
    mesh: jax.sharding.Mesh | None = ...,
) -> tuple[Carry, jax.Array | None]: ...
def scan_cell(
    cell: Cell, params: Params, xs: jax.Array, carry: Carry | None = None, unroll: int = 1,
    weight_grad: str = "auto", projection: str = "auto", backward: str = "auto",
    chunks: int = 1, native_lanes: int = NATIVE_LANES[0], rows: jax.Array | None = None,
    outputs: bool = True, mesh: jax.sharding.Mesh | None = None,
) -> tuple[Carry, jax.Array | None]:
    """Run ``cell`` over time-major ``xs [T, B, F]`` (float, the params' dtype):
    ``(final carry, ys [T, B, H])``, both in xs' dtype; the carry in the cell's layout
    (``initial_carry``'s, e.g. the LSTM's ``(h, c)``, each ``[B, H]``).

    ``mesh``: the batch is split over its ``"data"`` axis, and the native form runs each
    device's rows there (:func:`split_rows`); the other forms are XLA's, which XLA splits.

    ``outputs`` False: only the final carry is read (a classifier's last layer), and ys may
    be None: the native form's forward then writes no [T, B, ...] arrays where no gradient
    is taken (XLA's forms drop the unread ys themselves).

    ``rows`` (int [B], the native form in one part only): ``xs`` is a table [T, N, F], a
    whole set's sequences, and the batch ``xs[:, rows]``, which the native kernels read
    where it is (``rnnjax.model.Model.apply_sequences`` gathers it first for the others).

    ``unroll`` is ``lax.scan``'s unroll factor; 0 unrolls all T steps. ``backward``,
    ``projection`` and ``weight_grad`` choose the form of the computation
    (:func:`resolve_form`; ``native_lanes``: the floats per vector of the backward
    'native''s kernels); every form computes the same sums in the same order: the same
    values, bit for bit where XLA generates the same rounding for them (it did on an AVX2
    CPU), else a few ulps apart (an AVX-512 one; ``tests/test_cells.py``).

    ``chunks`` > 1 scans the sequence in that many consecutive parts (:func:`chunk_bounds`),
    the carry passed from one to the next: the same recurrence, bit for bit where each part
    has several steps (a part of one step is a loop XLA removes, its step compiled as
    straight-line code: a few ulps apart on an AVX2 EPYC), but the gradient of the weights
    a sum of one sum per part. A part's products that no loop
    waits on (its weight gradients, its input projection) are then separate ops, which
    XLA:CPU runs on another core beside another part's loop (in
    turns in one process on a 2-core AVX-512 EPYC, pixels at batch 50: the GRU's train step
    1.17x faster in 8 parts, the SimpleRNN's 1.09x and the LSTM's 1.05x in 4; rows at batch
    1024, unroll 1, 1.07-1.09x; fully unrolled, which has no loop, level or slower).
    """
    time, batch = xs.shape[0], xs.shape[1] if rows is None else rows.shape[0]
    # A carry given in another float dtype would carry the whole scan in it (bfloat16
    # inputs computed in float32): its floats in xs' dtype, as the initial carry's.
    carry = (cell.initial_carry(batch, xs.dtype) if carry is None
             else cast_floats(carry, xs.dtype))
    bounds = chunk_bounds(time, chunks)
    form = resolve_form(cell, batch, backward, projection, weight_grad)
    if rows is not None and (form.backward != "native" or chunks > 1):
        raise ValueError(f"scan_cell: rows of a table are read by the native form in one "
                         f"part only, not {form.backward} in {chunks} part(s); gather the "
                         "batch first (rnnjax.model.gather_sequences)")
    if chunks > 1:
        parts = []
        for start, stop in itertools.pairwise(bounds):
            carry, ys = scan_cell(cell, params, xs[start:stop], carry, unroll, weight_grad,
                                  projection, backward, native_lanes=native_lanes, mesh=mesh)
            parts.append(ys)
        return carry, jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=0), *parts)
    unroll = unroll or time
    if form.backward == "native":
        native = cell.native if mesh is None else split_rows(cell.native, mesh)
        return native(params, xs, carry, native_lanes, rows, outputs=outputs)
    if form.backward == "hand_written":
        return cell.sequence(params, xs, carry, unroll, form.weight_grad, form.projection)
    # Autodiff sums a weight's gradient over the steps in the dtype the loop reads the weight
    # in (JAX's transpose of a scan): the loop reads a weight narrower than float32
    # (bfloat16) as float32 and narrows it back each step, so its gradient sums over time
    # in float32, as the hand-written forms' do. The same values forward; a loop of float32
    # weights is unchanged.
    dtypes = jax.tree.map(lambda p: jnp.asarray(p).dtype, params)
    narrow = {d for d in jax.tree.leaves(dtypes)
              if jnp.issubdtype(d, jnp.floating) and jnp.finfo(d).bits < 32}
    looped = jax.tree.map(lambda p, d: p.astype(jnp.float32) if d in narrow else p, params,
                          dtypes)

    def read(weights: Params) -> Params:
        return jax.tree.map(lambda w, d: w.astype(d), weights, dtypes) if narrow else weights

    if cell.project is None or form.projection == "hoisted":
        us = xs if cell.project is None else cell.project(params, xs)

        def projected(carry: Carry, u_t: jax.Array) -> tuple[Carry, jax.Array]:
            return cell.step(read(looped), carry, u_t)

        return jax.lax.scan(projected, carry, us, unroll=unroll)

    def step(carry: Carry, x_t: jax.Array) -> tuple[Carry, jax.Array]:
        weights = read(looped)
        return cell.step(weights, carry, cell.project(weights, x_t[None])[0])

    return jax.lax.scan(step, carry, xs, unroll=unroll)


def _dense_projection(params: Params, xs: jax.Array) -> jax.Array:
    """``xs [T, B, F] @ kernel [F, G] + bias [G] -> [T, B, G]``. (The hand-written layers
    add the bias inside their loop's elementwise op: the same sum, in the same order,
    without a pass of its own over [T, B, G].)

    One step (``[1, B, F]``: the projection inside an autodiff loop) is projected as the
    2-D ``[B, F] x [F, G]`` product, the same values bit for bit. As a 3-D product, its
    transpose (the kernel's gradient, each step) contracted both leading dimensions, and
    XLA:CPU copied the step's ``[B, G]`` gradient into a transposed layout and ran a slower
    product: a backward op more per step, and in turns in one process on a 2-core AVX-512
    EPYC (the Flax benchmark's harness) the GRU's autodiff train step 1.31-1.34x slower at
    rows batch 1024 (unroll 1 and full) and 1.12x at batch 50.
    """
    kernel, bias = params["kernel"].astype(xs.dtype), params["bias"].astype(xs.dtype)
    if xs.shape[0] == 1:
        return (xs[0] @ kernel + bias)[None]
    return xs @ kernel + bias


def _identity_output(h: jax.Array) -> jax.Array:
    return h


def carry_is_output(cell: Cell) -> bool:
    """Whether ``cell``'s carry is its output ``h`` (each step's carry is that step's y_t:
    simple_rnn, irnn, gru), so a carry at any step can be read from ``ys``."""
    return cell.last_output is _identity_output


def layout_mismatch(tree: Any, expected: Any) -> str | None:
    """Where the arrays of ``tree`` (params, a carry) differ from ``expected`` (arrays, or
    their ``jax.ShapeDtypeStruct`` as ``jax.eval_shape`` gives them) in their entries or
    shapes, in a few words; None where they match. Container types (dict, FrozenDict,
    list, tuple) and dtypes are not compared."""
    def entries(tree: Any) -> dict[str, tuple[int, ...]]:
        return {jax.tree_util.keystr(path) or "(one array)": tuple(jnp.shape(leaf))
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    have, want = entries(tree), entries(expected)
    missing = [key for key in want if key not in have]
    extra = [key for key in have if key not in want]
    if missing or extra:
        return "; ".join(f"{what} {listed(keys)}" for what, keys
                         in (("no", missing), ("extra", extra)) if keys)
    for key, shape in want.items():
        if have[key] != shape:
            return f"{key} of shape {list(have[key])}, not {list(shape)}"
    return None


def _zeros_carry(hidden: int) -> Callable[[int, Any], jax.Array]:
    return lambda batch, dtype: jnp.zeros((batch, hidden), dtype)


def _time_batch_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``sum_t a_t^T b_t``: ``[T, B, M] x [T, B, N] -> [M, N]`` in one product, accumulated
    in float32 or wider.

    On one device, T and B are merged (a free reshape) and the product is one 2-D dot
    contracting the rows of both operands, which XLA:CPU runs on the operands as they lie.
    A dot_general contracting (T, B) instead makes XLA copy an operand into [M, T*B] first
    and run a slower product: in turns in one process on a 2-core AVX-512 EPYC the merged
    form made the train step 1.09-1.15x faster for the seed (rows, batch 50, unroll 1 and
    full) and 1.2x / 1.10-1.16x / 1.04x for the pixels SimpleRNN / LSTM / GRU.

    With the arrays on a mesh of several devices (the batch sharded, rnnjax.parallel)
    merging T with a sharded B would make XLA all-gather the activations, so there the
    dot_general contracts (T, B) unmerged: each device computes its partial product and
    XLA all-reduces it.
    """
    acc = jnp.promote_types(a.dtype, jnp.float32)
    if _one_device(a):
        rows = a.shape[0] * a.shape[1]
        return jnp.matmul(a.reshape(rows, -1).T, b.reshape(rows, -1),
                          preferred_element_type=acc)
    return jax.lax.dot_general(a, b, (((0, 1), (0, 1)), ((), ())), preferred_element_type=acc)


def _one_device(x: jax.Array) -> bool:
    """Whether ``x`` (a traced value) lives on one device: its abstract mesh, which JAX
    carries from the jitted function's arguments as they are placed, has at most one
    device. Arguments not yet on the mesh (numpy arrays given to a function jitted with
    ``in_shardings``) carry none: place them first (``rnnjax.parallel``, as the loop does),
    or the product's merged form makes XLA all-gather the batch (slower, the same sums)."""
    try:
        return jax.typeof(x).sharding.mesh.size <= 1
    except AttributeError:  # a JAX without sharding in its types: assume it may be split
        return False


def _weight_gradients(dzs: jax.Array, *inputs: jax.Array) -> tuple[jax.Array, ...]:
    """``sum_t [inputs_t..., 1]^T dz_t``: the gradient of each input's weights and, last, of
    the bias (the sum of dz), from one product over time and batch.

    inputs [T, B, M_k] each, dzs [T, B, N] -> ([M_k, N] each, [N]), in float32 or wider.
    One product in place of a product per input and a reduction: XLA:CPU ran the [1, T*B]
    x [T*B, N] product of a one-pixel input at a few GFLOP/s and the sum over T*B rows no
    faster, 7-8 ms of a pixels train step at batch 50, where the extra rows of one product
    cost next to nothing.
    """
    ones = jnp.ones((*dzs.shape[:2], 1), dzs.dtype)
    stacked = jnp.concatenate([*inputs, ones], axis=-1)
    product = _time_batch_product(stacked, dzs)
    sizes = [x.shape[-1] for x in inputs]
    *grads, bias = jnp.split(product, [sum(sizes[: i + 1]) for i in range(len(sizes))])
    return (*grads, bias[0])


def _values(*primals: Any) -> list[jax.Array]:
    """The arrays of a ``custom_vjp`` forward rule's primals (passed as
    ``CustomVJPPrimal`` under ``symbolic_zeros=True``)."""
    return [p.value for p in primals]


def _dense(cotangent: Any, like: jax.Array | None = None) -> jax.Array | None:
    """A cotangent as an array, or, for a symbolic zero (an output the loss never reads),
    zeros like ``like``, or None without ``like``: a backward loop then reads nothing for
    it (the classifier reads only the final carry, so the outputs' gradient is all zeros
    and was written as a [T, B, H] array and read back, each step)."""
    if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
        return None if like is None else jnp.zeros(like.shape, like.dtype)
    return cotangent


def _previous(first: jax.Array, seq: jax.Array) -> jax.Array:
    """``[first, seq_0, ..., seq_{T-2}]``: the value before each time step, ``[T, ...]``."""
    return jnp.concatenate([first[None], seq[:-1]], axis=0)


def _scan_rows(step: Callable, carry: Carry, rows: jax.Array, xs: Any = None, *,
               in_place: bool = True, reverse: bool = False, unroll: int = 1
               ) -> tuple[Carry, jax.Array, Any]:
    """``lax.scan`` over ``rows [T, ...]`` (and ``xs``, a pytree of ``[T, ...]``) whose step
    also returns a new row: ``step(carry, row_t, x_t) -> (carry, new_row_t, y_t)``; the new
    row may be a tuple of its column blocks (their concatenation along the last axis), each
    then written alone, with no concatenate.

    Returns ``(carry, new_rows [T, ...], ys)``; the same values, bit for bit, however run.
    A scan's stacked output is a new array that XLA fills with zeros before the loop, a
    pass over all of it in every call (three of the pixels LSTM's [784, 50, 4H]-sized
    arrays: about a tenth of its train step on XLA:CPU). With ``in_place`` (the new rows of
    the rows' shape and dtype, ``rows`` not read again by the caller), on XLA:CPU and in a
    loop of one step per iteration, each new row is instead written over the row just read,
    into ``rows``' buffer: no new array, no zeros. XLA keeps that write in place only where
    every reader of the row comes before the write in the dataflow; a reader it places
    after (a cheap elementwise op it recomputes for another consumer) makes it copy the
    whole array every step. ``tests/test_hlo.py`` checks the compiled loops for such copies
    in every form the tuner times; other backends and unrolled loops keep stacked outputs.
    """
    def stacked(carry, rows, xs):
        def body(carry, inputs):
            carry, new_row, y = step(carry, *inputs)
            if isinstance(new_row, tuple):
                new_row = jnp.concatenate(new_row, axis=-1)
            return carry, (new_row, y)

        carry, (new_rows, ys) = jax.lax.scan(body, carry, (rows, xs), reverse=reverse,
                                             unroll=unroll)
        return carry, new_rows, ys

    if not in_place or unroll != 1:
        return stacked(carry, rows, xs)

    def written_over(carry, rows, xs):
        def body(state, inputs):
            carry, rows = state
            t, x_t = inputs
            carry, new_row, y = step(carry, jax.lax.dynamic_index_in_dim(rows, t, keepdims=False),
                                     x_t)
            if isinstance(new_row, tuple):  # column blocks of the row, each written alone
                offset = 0
                for block in new_row:
                    start = (t, *[jnp.uint32(0)] * (rows.ndim - 2), jnp.uint32(offset))
                    rows = jax.lax.dynamic_update_slice(rows, block[None], start)
                    offset += block.shape[-1]
                return (carry, rows), y
            return (carry, jax.lax.dynamic_update_index_in_dim(rows, new_row, t, 0)), y

        # Unsigned indices: a signed one is wrapped if negative, an op of its own per step.
        times = jnp.arange(rows.shape[0], dtype=jnp.uint32)
        (carry, rows), ys = jax.lax.scan(body, (carry, rows), (times, xs), reverse=reverse)
        return carry, rows, ys

    return jax.lax.platform_dependent(carry, rows, xs, cpu=written_over, default=stacked)


# --- Elman cells (SimpleRNN, IRNN) and their fused backward pass --------------------------

_ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    # activation, and its derivative written in terms of the activation's *output*.
    "tanh": (jnp.tanh, lambda h: 1 - h * h),
    "relu": (jax.nn.relu, lambda h: (h > 0).astype(h.dtype)),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def elman_layer(
    xs: jax.Array,
    kernel: jax.Array,
    recurrent: jax.Array,
    bias: jax.Array,
    h0: jax.Array,
    activation: str,
    unroll: int,
    weight_grad: str = "auto",
    projection: str = "hoisted",
) -> tuple[jax.Array, jax.Array]:
    """One Elman layer over time: ``h_t = act(x_t @ kernel + bias + h_{t-1} @ recurrent)``.

    xs [T, B, F], kernel [F, H], recurrent [H, H], bias [H], h0 [B, H] ->
    (hs [T, B, H], h_T [B, H]: the loop's final carry, equal to hs[-1]).
    The input projection of all T steps is one product before the scan. The custom VJP
    keeps the backward loop to what is truly sequential, ``dz_t = (dh_t + g) * act'``
    and ``g = dz_t @ recurrent^T``; the kernel, recurrent-kernel and bias gradients are
    then one product over all steps, ``[x_t, h_{t-1}, 1]^T dz``, instead of T small
    accumulations inside the loop (what autodiff of the scan does); ``weight_grad``
    'per_step' accumulates them in the loop instead, 'auto' picks by batch size.
    ``projection`` 'in_loop' multiplies each x_t by the kernel inside the forward loop
    under a gradient too (the same sums).

    Without a gradient (evaluation, inference) each step multiplies its own x_t by the
    kernel inside the loop instead: the [T, B, H] projection is then never written and
    read back (evaluating the test set at batch 10,000 measured 1.25x faster so), and
    the sums are the same, bit for bit (tests/test_cells.py).
    """
    return _elman_forward(xs, kernel, recurrent, bias, h0, activation, unroll,
                          input_in_loop=True)


def _elman_forward(xs, kernel, recurrent, bias, h0, activation, unroll, input_in_loop=False):
    act = _ACTIVATIONS[activation][0]
    dtype = xs.dtype
    kernel = kernel.astype(dtype)
    bias, recurrent = bias.astype(dtype), recurrent.astype(dtype)
    inputs, project = _loop_inputs(xs, kernel, input_in_loop)

    def step(h, x_t, _unused):
        # (x_t W + b) + h U, as ever: the bias is added in the loop's one elementwise op
        # instead of in a pass of its own over the whole [T, B, H] projection.
        h = act(project(x_t) + bias + h @ recurrent)
        return h, h, None

    # h_t is written over the hoisted projection's row t (_scan_rows); not with relu, which
    # XLA:CPU recomputes in the write's fusion, after the carry's read of the row.
    h_last, hs, _ = _scan_rows(step, h0, inputs, unroll=unroll,
                               in_place=not input_in_loop and activation == "tanh")
    return hs, h_last


def _elman_fwd(xs, kernel, recurrent, bias, h0, activation, unroll, weight_grad, projection):
    xs, kernel, recurrent, bias, h0 = _values(xs, kernel, recurrent, bias, h0)
    hs, h_last = _elman_forward(xs, kernel, recurrent, bias, h0, activation, unroll,
                                input_in_loop=projection == "in_loop")
    return (hs, h_last), (xs, hs, kernel, recurrent, bias, h0)


def _per_step(weight_grad: str, batch: int) -> bool:
    """Whether a hand-written backward accumulates the weight gradient inside its loop."""
    return (_auto_weight_grad(batch) if weight_grad == "auto" else weight_grad) == "per_step"


def _elman_bwd(activation, unroll, weight_grad, projection, residuals, cotangents):
    xs, hs, kernel, recurrent, bias, h0 = residuals
    # h_T's gradient enters as the recurrent gradient of step T; dhs None: not read.
    dhs, dh_last = _dense(cotangents[0]), _dense(cotangents[1], h0)
    derivative = _ACTIVATIONS[activation][1]  # of h_t, in the loop's one fusion
    rec_t = recurrent.astype(hs.dtype).T
    h_prev = _previous(h0, hs)

    def local(g, dh, h):
        return (g if dh is None else dh + g) * derivative(h)

    # dz_t is written over h_t, the row it is computed from (_scan_rows).
    if _per_step(weight_grad, xs.shape[1]):
        acc = jnp.promote_types(xs.dtype, jnp.float32)  # float32, or wider inputs'

        def step(carry, h, inputs_t):
            g, dkernel, drecurrent = carry
            dh, x, hp = inputs_t
            dz = local(g, dh, h)
            dkernel = dkernel + jnp.matmul(x.T, dz, preferred_element_type=acc)
            drecurrent = drecurrent + jnp.matmul(hp.T, dz, preferred_element_type=acc)
            return (dz @ rec_t, dkernel, drecurrent), dz, None

        zeros = (jnp.zeros(kernel.shape, acc), jnp.zeros(recurrent.shape, acc))
        (dh0, dkernel, drecurrent), dzs, _ = _scan_rows(
            step, (dh_last, *zeros), hs, (dhs, xs, h_prev), reverse=True, unroll=unroll)
        dbias = dzs.sum(axis=(0, 1), dtype=acc)
    else:

        def step(g, h, dh):
            dz = local(g, dh, h)
            return dz @ rec_t, dz, None

        dh0, dzs, _ = _scan_rows(step, dh_last, hs, dhs, reverse=True, unroll=unroll)
        # [x_t, h_{t-1}, 1]^T dz over all steps in one product, the bias's gradient with
        # them: unrolled at batch 50, XLA split a sum of its own into a reduction per step
        # (56 ops of a 216-op step).
        dkernel, drecurrent, dbias = _weight_gradients(dzs, xs, h_prev)
    dxs = dzs @ kernel.astype(dzs.dtype).T
    return (
        dxs,
        dkernel.astype(kernel.dtype),
        drecurrent.astype(recurrent.dtype),
        dbias.astype(bias.dtype),
        dh0,
    )


elman_layer.defvjp(_elman_fwd, _elman_bwd, symbolic_zeros=True)


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

    def sequence(params, xs, h0, unroll, weight_grad="auto", projection="hoisted"):
        hs, h_last = elman_layer(xs, params["kernel"], params["recurrent_kernel"],
                                 params["bias"], h0, activation, unroll, weight_grad,
                                 projection)
        return h_last, hs

    return Cell(init, step, _zeros_carry(hidden), hidden, _dense_projection, sequence,
                last_output=_identity_output, options=("weight_grad", "projection"),
                native=elman_native if activation == "tanh" else None)


def _native(layer: str, weights: tuple[str, ...]
            ) -> Callable[..., tuple[Carry, jax.Array | None]]:
    """A cell's ``native(params, xs [T, B, F], carry, lanes=8, rows=None, outputs=True) ->
    (carry, hs [T, B, H])``: the layer ``rnnjax.native.<layer>`` (``layer(xs, *(params[w]
    for w in weights), *carry, rows=rows) -> (hs, *carry)``, the carry h or (h, c)), built
    for ``lanes`` floats per vector (``Config.native_lanes``). With ``rows`` (int [B]),
    ``xs`` is a table [T, N, F] whose batch is ``xs[:, rows]``, read where it is. With
    ``outputs`` False, hs None on a CPU: the layer's ``final`` form, whose forward writes
    the last step alone. float32 only."""
    def native(params: Params, xs: jax.Array, carry: Carry, lanes: int = NATIVE_LANES[0],
               rows: jax.Array | None = None, outputs: bool = True
               ) -> tuple[Carry, jax.Array | None]:
        from rnnjax import native as kernels

        if xs.dtype != jnp.float32:
            raise ValueError(f"backward 'native' runs float32, not {xs.dtype}: drop "
                             "--compute-dtype or choose another --backward")
        if lanes not in NATIVE_LANES:
            raise ValueError(f"native lanes {lanes}; choose one of "
                             f"{', '.join(map(str, NATIVE_LANES))}")
        pair = isinstance(carry, tuple)
        operands = (*(params[name] for name in weights), *(carry if pair else (carry,)))
        if native_gpu.runs_here():
            if not hasattr(native_gpu, layer):
                raise kernels.NativeError(
                    "--backward native on a GPU: only simple_rnn (tanh) has GPU kernels "
                    "(rnnjax.native_gpu); choose hand_written, autodiff or auto")
            if rows is not None:  # a gather is one kernel here
                from rnnjax.model import gather_sequences

                xs = gather_sequences(xs, rows)
            hs, *last = getattr(native_gpu, layer)()(xs, *operands)
        else:
            hs, *last = getattr(kernels, layer)(lanes, not outputs)(xs, *operands, rows=rows)
        return (tuple(last) if pair else last[0]), hs

    native.layer = layer  # type: ignore[attr-defined]  (for native_backends)
    return native


def split_rows(native: Callable[..., tuple[Carry, jax.Array | None]], mesh: jax.sharding.Mesh
               ) -> Callable[..., tuple[Carry, jax.Array | None]]:
    """A cell's ``native`` (same arguments) with the batch's rows split over ``mesh``'s
    ``"data"`` axis (``jax.shard_map``): each device's kernels run its own rows. A custom
    call has no sharding rule, and XLA gave every device the whole batch (an all-gather of
    the inputs, the same work on each). The parameters are whole on every device, and
    shard_map's transpose sums their gradients over the devices; the inputs are the
    batch's ``[T, B, F]``, split on B, or a table ``[T, N, F]``, whole, with the ``rows``
    split. ``check_vma`` is off: the kernels' ``custom_vjp`` gives cotangents that do
    not say they vary over the devices."""
    from jax.sharding import PartitionSpec

    rows_of, whole = PartitionSpec("data"), PartitionSpec()

    def call(params: Params, xs: jax.Array, carry: Carry, lanes: int = NATIVE_LANES[0],
             rows: jax.Array | None = None, outputs: bool = True
             ) -> tuple[Carry, jax.Array | None]:
        carry_specs = jax.tree.map(lambda _: rows_of, carry)
        ys_spec = PartitionSpec(None, "data") if outputs else whole
        if rows is None:
            def local(p, x, c):
                return native(p, x, c, lanes, None, outputs=outputs)
            specs, operands = (whole, PartitionSpec(None, "data"), carry_specs), (params, xs,
                                                                                  carry)
        else:
            def local(p, x, c, r):
                return native(p, x, c, lanes, r, outputs=outputs)
            specs, operands = (whole, whole, carry_specs, rows_of), (params, xs, carry, rows)
        return jax.shard_map(local, mesh=mesh, in_specs=specs,
                             out_specs=(carry_specs, ys_spec), check_vma=False)(*operands)

    return call


def native_backends(cell: Cell) -> tuple[str, ...]:
    """The backends the cell's ``native`` form runs on: a CPU (``rnnjax.native``'s C++
    kernels) for every cell with one, and a GPU where ``rnnjax.native_gpu`` has Pallas
    kernels for its layer (the Elman tanh layer's), as ``native`` itself checks there."""
    if cell.native is None:
        return ()
    return ("cpu", "gpu") if hasattr(native_gpu, getattr(cell.native, "layer", "")) \
        else ("cpu",)


elman_native = _native("elman_layer", ("kernel", "recurrent_kernel", "bias"))
gru_native = _native("gru_layer", ("kernel", "bias", "recurrent_kernel", "recurrent_bias"))
lstm_native = _native("lstm_layer", ("kernel", "recurrent_kernel", "bias"))


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


# The LSTM recurrence, like elman_layer, has a hand-written backward pass. Its forward loop
# stores, besides h, the step's local Jacobian in two arrays: jac_z [B, 4H], the gate
# pre-activations' factors, so that their gradient is dz_t = [dc, dc, dc, dh] * jac_z_t, and
# jac_c [B, 2H], with dc_t = dc + dh * jac_c_t[:, :H] (o * tanh'(c)) and the cell-state
# gradient passed back dc * jac_c_t[:, H:] (f). jac_z has the hoisted projection's shape:
# the forward loop writes it over the projection as it reads it, and the backward loop dz
# over jac_z (:func:`_scan_rows`: no [T, B, 4H] array zero-filled per call). So the
# backward loop is one elementwise fusion, one concatenate,
# one [B, 4H] x [4H, H] product and one store per step (8 ops, from 13 when it stored the
# gates and recomputed the pieces). Measured on the 2-core AMD EPYC, jax 0.10.2, pixels
# batch 50, ms per train step in one process: gates stored 103-105, Jacobian stored 81-90,
# flax.nnx.OptimizedLSTMCell 94-98. (Computing the Jacobian outside the loops from stored
# gates measured 94-105: a pass over [T, B, 6H] more than the loop saves. Storing only h
# and c and recomputing the gates measured 1.3x slower.)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def lstm_layer(
    xs: jax.Array, kernel: jax.Array, recurrent: jax.Array, bias: jax.Array,
    h0: jax.Array, c0: jax.Array, unroll: int, weight_grad: str = "auto",
    projection: str = "hoisted",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One LSTM layer over time (Keras gate order i, f, c, o).

    xs [T, B, F], kernel [F, 4H], recurrent [H, 4H], bias [4H], h0 and c0 [B, H] ->
    (hs [T, B, H], the final carry h_T and c_T [B, H]); computed in ``xs.dtype``.
    ``weight_grad`` and ``projection`` as :func:`elman_layer`'s. Without a gradient each
    step projects its own x_t and stores only h_t.
    """
    (h_last, c_last), hs = _lstm_scan(xs, kernel, recurrent, bias, h0, c0, unroll,
                                      in_loop=True, jacobian=False)
    return hs, h_last, c_last


def _lstm_step(recurrent, carry, u):
    """One LSTM step: ``((h, c), u_t) -> ((h, c), (h, c, tanh(c), [i, f, g, o] [B, 4H]))``.

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
    tanh_c = jnp.tanh(c)
    h = o * tanh_c
    return (h, c), (h, c, tanh_c, (i, f, g, o))


def _lstm_scan(xs, kernel, recurrent, bias, h0, c0, unroll, in_loop, jacobian):
    """The forward loop: ``((h_T, c_T), hs)``; with ``jacobian`` ``((h_T, c_T), hs,
    jac_z [T, B, 4H], jac_c [T, B, 2H])`` (see the comment above :func:`lstm_layer`), jac_z
    written over the hoisted projection."""
    dtype = xs.dtype
    kernel, recurrent, bias = kernel.astype(dtype), recurrent.astype(dtype), bias.astype(dtype)
    inputs, project = _loop_inputs(xs, kernel, in_loop)

    def step(carry, x_t, _unused=None):
        c_prev = carry[1]
        u = project(x_t) + bias
        carry, (h, _, tanh_c, (i, f, g, o)) = _lstm_step(recurrent, carry, u)
        if not jacobian:
            return carry, h
        # jac_z's row as its four column blocks, each written alone (_scan_rows), no
        # concatenate: forward 17 -> 15 ops a step, the same bits.
        jac_z = (g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o))
        return carry, jac_z, (h, jnp.concatenate([o * (1 - tanh_c * tanh_c), f], axis=-1))

    if not jacobian:
        return jax.lax.scan(step, (h0, c0), inputs, unroll=unroll)
    carry, jac_z, (hs, jac_c) = _scan_rows(step, (h0, c0), inputs, in_place=not in_loop,
                                           unroll=unroll)
    return carry, hs, jac_z, jac_c


def _lstm_fwd(xs, kernel, recurrent, bias, h0, c0, unroll, weight_grad, projection):
    xs, kernel, recurrent, bias, h0, c0 = _values(xs, kernel, recurrent, bias, h0, c0)
    (h_last, c_last), hs, jac_z, jac_c = _lstm_scan(
        xs, kernel, recurrent, bias, h0, c0, unroll, in_loop=projection == "in_loop",
        jacobian=True)
    return (hs, h_last, c_last), (xs, kernel, recurrent, bias, h0, hs, jac_z, jac_c)


def _lstm_bwd(unroll, weight_grad, projection, residuals, cotangents):
    xs, kernel, recurrent, bias, h0, hs, jac_z, jac_c = residuals
    dhs = _dense(cotangents[0])  # None: not read
    dh_last, dc_last = _dense(cotangents[1], h0), _dense(cotangents[2], h0)
    hidden = h0.shape[-1]
    rec_t = recurrent.astype(hs.dtype).T
    h_prev = _previous(h0, hs)

    def gates_gradient(carry, jac_z, dh, jac_c):
        dh_next, dc = carry  # from step t + 1: dz_{t+1} @ recurrent^T and dc_{t+1} * f
        dh = dh_next if dh is None else dh + dh_next
        dc = dc + dh * jac_c[:, :hidden]
        dz = jnp.concatenate([dc, dc, dc, dh], axis=-1) * jac_z
        return (dz @ rec_t, dc * jac_c[:, hidden:]), dz

    first = (dh_last, dc_last)  # h_T's gradient enters as step T's recurrent gradient
    # dz_t is written over jac_z_t, the row it is computed from (_scan_rows).
    if _per_step(weight_grad, xs.shape[1]):
        acc = jnp.promote_types(xs.dtype, jnp.float32)  # float32, or wider inputs'

        def step(carry, jac_z, inputs_t):
            carry, dkernel, drecurrent = carry
            dh, jac_c, x, h = inputs_t
            carry, dz = gates_gradient(carry, jac_z, dh, jac_c)
            dkernel = dkernel + jnp.matmul(x.T, dz, preferred_element_type=acc)
            drecurrent = drecurrent + jnp.matmul(h.T, dz, preferred_element_type=acc)
            return (carry, dkernel, drecurrent), dz, None

        zeros = (jnp.zeros(kernel.shape, acc), jnp.zeros(recurrent.shape, acc))
        ((dh0, dc0), dkernel, drecurrent), dzs, _ = _scan_rows(
            step, (first, *zeros), jac_z, (dhs, jac_c, xs, h_prev), reverse=True, unroll=unroll)
        dbias = dzs.sum(axis=(0, 1), dtype=acc)
    else:

        def step(carry, jac_z, inputs_t):
            return *gates_gradient(carry, jac_z, *inputs_t), None

        (dh0, dc0), dzs, _ = _scan_rows(step, first, jac_z, (dhs, jac_c), reverse=True,
                                        unroll=unroll)
        dkernel, drecurrent, dbias = _weight_gradients(dzs, xs, h_prev)
    dxs = dzs @ kernel.astype(dzs.dtype).T
    return (dxs, dkernel.astype(kernel.dtype), drecurrent.astype(recurrent.dtype),
            dbias.astype(bias.dtype), dh0, dc0)


lstm_layer.defvjp(_lstm_fwd, _lstm_bwd, symbolic_zeros=True)


def _first(carry: Carry) -> jax.Array:
    return carry[0]


@functools.cache
def lstm(hidden: int) -> Cell:
    """Keras ``LSTM`` (gates i, f, c, o; forget bias 1); carry ``(h, c)``."""

    def bias() -> jax.Array:
        return jnp.zeros((4 * hidden,), jnp.float32).at[hidden : 2 * hidden].set(1.0)

    def step(params, carry, u):
        carry, (h, *_) = _lstm_step(params["recurrent_kernel"], carry, u)
        return carry, h

    def initial_carry(batch, dtype):
        zeros = jnp.zeros((batch, hidden), dtype)
        return zeros, zeros

    def sequence(params, xs, carry, unroll, weight_grad="auto", projection="hoisted"):
        h0, c0 = carry
        hs, h_last, c_last = lstm_layer(xs, params["kernel"], params["recurrent_kernel"],
                                        params["bias"], h0, c0, unroll, weight_grad, projection)
        return (h_last, c_last), hs

    return Cell(_gated_init(hidden, 4, bias), step, initial_carry, hidden, _dense_projection,
                sequence, last_output=_first, options=("weight_grad", "projection"),
                native=lstm_native)


# The GRU recurrence has a hand-written backward pass too, built as the LSTM's: the forward
# loop stores, besides h, the step's local Jacobian in two arrays, K_a = [kz, kr, a]
# [B, 3H] and K_b = [a * r, z] [B, 2H] (a = (1 - z)(1 - n^2): the candidate's
# pre-activation gradient per dh; kz and kr the update and reset gates' per dh), so that
# the backward loop is: du_t = [dh, dh, dh] * K_a_t (the gradient of the input projection,
# bias included), dr_t = [du_z, du_r, dh * a * r] (of the recurrent pre-activations
# h_{t-1} @ recurrent + recurrent_bias), dh_{t-1} = dh * z + dr_t @ recurrent^T. K_a has the
# hoisted projection's shape and is written over it, and du over K_a (:func:`_scan_rows`,
# as the LSTM's). Every weight gradient is then one product over
# all steps, or accumulated per step (weight_grad), and the input projection is before
# the loop or inside it (projection). (An earlier version stored the gates and built the
# factors outside the loops: 9 / 6 ops, but 0.86-0.90x as fast as autodiff here.)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def gru_layer(
    xs: jax.Array, kernel: jax.Array, bias: jax.Array, recurrent: jax.Array,
    recurrent_bias: jax.Array, h0: jax.Array, unroll: int = 1, weight_grad: str = "auto",
    projection: str = "hoisted",
) -> tuple[jax.Array, jax.Array]:
    """One GRU layer over time (Keras ``reset_after=True``, gates z, r, h).

    xs [T, B, F], kernel [F, 3H], bias [3H], recurrent [H, 3H], recurrent_bias [3H],
    h0 [B, H] -> (hs [T, B, H], h_T [B, H]: the final carry); computed in ``xs.dtype``.
    ``weight_grad`` and ``projection`` as :func:`elman_layer`'s.
    """
    h_last, hs = _gru_scan(xs, kernel, bias, recurrent, recurrent_bias, h0, unroll,
                           in_loop=True, jacobian=False)
    return hs, h_last


def _gru_scan(xs, kernel, bias, recurrent, recurrent_bias, h0, unroll, in_loop, jacobian):
    """The forward loop: ``(h_T, hs)``; with ``jacobian`` ``(h_T, hs, K_a [T, B, 3H],
    K_b [T, B, 2H])``, the local Jacobian K = [K_a, K_b] (see the comment above
    :func:`gru_layer`), K_a written over the hoisted projection."""
    dtype = xs.dtype
    kernel, bias = kernel.astype(dtype), bias.astype(dtype)
    recurrent, recurrent_bias = recurrent.astype(dtype), recurrent_bias.astype(dtype)
    hidden = h0.shape[-1]
    inputs, project = _loop_inputs(xs, kernel, in_loop)

    def step(h, x_t, _unused=None):
        u = project(x_t) + bias  # the same sums as _dense_projection
        r_all = h @ recurrent + recurrent_bias
        # One sigmoid over both gates, [B, 2H]: XLA:CPU made two fusions of two (each
        # reading the recurrent product); the same bits, the pixel train step 2-5% faster.
        zr = jax.nn.sigmoid(u[:, : 2 * hidden] + r_all[:, : 2 * hidden])
        z, r = zr[:, :hidden], zr[:, hidden:]
        rh = r_all[:, 2 * hidden :]
        n = jnp.tanh(u[:, 2 * hidden :] + r * rh)
        h_new = z * h + (1 - z) * n
        if not jacobian:
            return h_new, h_new
        a = (1 - z) * (1 - n * n)
        # K_a's row as its three column blocks: each written alone (_scan_rows), no
        # concatenate (forward 14 -> 12 ops a step, the same bits).
        jac_a = ((h - n) * z * (1 - z), a * rh * r * (1 - r), a)
        return h_new, jac_a, (h_new, jnp.concatenate([a * r, z], axis=-1))

    if not jacobian:
        return jax.lax.scan(step, h0, inputs, unroll=unroll)
    h_last, jac_a, (hs, jac_b) = _scan_rows(step, h0, inputs, in_place=not in_loop,
                                            unroll=unroll)
    return h_last, hs, jac_a, jac_b


def _gru_fwd(xs, kernel, bias, recurrent, recurrent_bias, h0, unroll, weight_grad, projection):
    xs, kernel, bias, recurrent, recurrent_bias, h0 = _values(
        xs, kernel, bias, recurrent, recurrent_bias, h0)
    h_last, hs, jac_a, jac_b = _gru_scan(xs, kernel, bias, recurrent, recurrent_bias, h0,
                                         unroll, in_loop=projection == "in_loop", jacobian=True)
    return (hs, h_last), (xs, kernel, recurrent, h0, hs, jac_a, jac_b)


def _gru_bwd(unroll, weight_grad, projection, residuals, cotangents):
    xs, kernel, recurrent, h0, hs, jac_a, jac_b = residuals
    dhs, dh_last = _dense(cotangents[0]), _dense(cotangents[1], h0)  # dhs None: not read
    hidden = h0.shape[-1]
    rec_t = recurrent.astype(hs.dtype).T
    h_prev = _previous(h0, hs)

    def local(dh_next, jac_a, dh, jac_b):
        dh = dh_next if dh is None else dh + dh_next
        du = jnp.concatenate([dh, dh, dh], axis=-1) * jac_a
        dr = jnp.concatenate([du[:, : 2 * hidden], dh * jac_b[:, :hidden]], -1)
        return dh * jac_b[:, hidden:] + dr @ rec_t, du, dr

    # du_t is written over K_a's row t, the row it is computed from (_scan_rows), when the
    # weight gradients are accumulated per step.
    if _per_step(weight_grad, xs.shape[1]):
        acc = jnp.promote_types(xs.dtype, jnp.float32)  # float32, or wider inputs'

        def step(carry, jac_a, inputs_t):
            dh_next, dkernel, drecurrent, drecurrent_bias = carry
            dh, jac_b, x, h = inputs_t
            dh_next, du, dr = local(dh_next, jac_a, dh, jac_b)
            dkernel = dkernel + jnp.matmul(x.T, du, preferred_element_type=acc)
            drecurrent = drecurrent + jnp.matmul(h.T, dr, preferred_element_type=acc)
            drecurrent_bias = drecurrent_bias + dr.sum(0, dtype=acc)
            return (dh_next, dkernel, drecurrent, drecurrent_bias), du, None

        zeros = (jnp.zeros(kernel.shape, acc), jnp.zeros(recurrent.shape, acc),
                 jnp.zeros(recurrent.shape[1:], acc))
        (dh0, dkernel, drecurrent, drecurrent_bias), dus, _ = _scan_rows(
            step, (dh_last, *zeros), jac_a, (dhs, jac_b, xs, h_prev), reverse=True,
            unroll=unroll)
        dbias = dus.sum(axis=(0, 1), dtype=acc)
    else:

        def step(dh_next, jac_a, inputs_t):
            dh_next, du, dr = local(dh_next, jac_a, *inputs_t)
            return dh_next, du, dr

        # Stacked: XLA:CPU recomputes du's first 2H for dr after du's write (_scan_rows).
        dh0, dus, drs = _scan_rows(step, dh_last, jac_a, (dhs, jac_b), in_place=False,
                                   reverse=True, unroll=unroll)
        dkernel, dbias = _weight_gradients(dus, xs)
        drecurrent, drecurrent_bias = _weight_gradients(drs, h_prev)
    dxs = dus @ kernel.astype(dus.dtype).T
    return (dxs, dkernel.astype(kernel.dtype), dbias.astype(kernel.dtype),
            drecurrent.astype(recurrent.dtype), drecurrent_bias.astype(recurrent.dtype), dh0)


gru_layer.defvjp(_gru_fwd, _gru_bwd, symbolic_zeros=True)


@functools.cache
def gru(hidden: int, backward: str = "autodiff") -> Cell:
    """Keras ``GRU`` (``reset_after=True``: gates z, r, h; separate recurrent bias).

    backward: what ``--backward auto`` runs, ``"autodiff"`` (of the scan of ``step``, the
    projection in the loop) or ``"hand_written"`` (:func:`gru_layer`: 12 / 10 ops per time
    step against 20 / 20; on the 2-core development machine it measured 0.88-1.0x as fast
    until it wrote its rows in place, 1.1-1.2x since, at pixels batch 50: which wins
    depends on the machine, and ``rnnjax.tune`` times both). The forward computes the same
    sums either way (equal to float32 rounding: ``tests/test_cells.py``).
    """
    if backward not in ("autodiff", "hand_written"):
        raise ValueError(f"GRU backward {backward!r}; choose 'autodiff' or 'hand_written'")

    base = _gated_init(hidden, 3, lambda: jnp.zeros((3 * hidden,), jnp.float32))

    def init(key, input_size):
        params = base(key, input_size)
        params["recurrent_bias"] = jnp.zeros((3 * hidden,), jnp.float32)
        return params

    def step(params, h, u):
        # Autodiff differentiates this one: no gates array (its concatenate and slices
        # would be ops of their own); the same sums as gru_layer's.
        r_all = h @ params["recurrent_kernel"].astype(u.dtype)
        r_all = r_all + params["recurrent_bias"].astype(u.dtype)
        uz, ur, uh = jnp.split(u, 3, axis=-1)
        rz, rr, rh = jnp.split(r_all, 3, axis=-1)
        z = jax.nn.sigmoid(uz + rz)
        r = jax.nn.sigmoid(ur + rr)
        candidate = jnp.tanh(uh + r * rh)
        h = z * h + (1 - z) * candidate
        return h, h

    def sequence(params, xs, h0, unroll, weight_grad="auto", projection="hoisted"):
        hs, h_last = gru_layer(xs, params["kernel"], params["bias"], params["recurrent_kernel"],
                               params["recurrent_bias"], h0, unroll, weight_grad, projection)
        return h_last, hs

    return Cell(init, step, _zeros_carry(hidden), hidden, _dense_projection, sequence,
                last_output=_identity_output, backward=backward,
                options=("weight_grad", "projection"), native=gru_native)


CELLS: dict[str, Callable[[int], Cell]] = {
    "simple_rnn": simple_rnn,
    "irnn": irnn,
    "lstm": lstm,
    "gru": gru,
}


# The cells as rnnjax ships them; CELLS may gain others, or have one replaced.
BUILT_IN: Mapping[str, Callable[[int], Cell]] = MappingProxyType(dict(CELLS))
# How the tuner's children find a cell registered here again (``rnnjax.registry``).
REGISTRY = registry.Registry(CELLS, BUILT_IN, "--cell")


def shipped(name: str) -> bool:
    """Whether :data:`CELLS` holds rnnjax's own cell for ``name`` (not one registered over
    it, nor a name of the user's, nor a Flax cell class)."""
    built_in = BUILT_IN.get(name)
    return built_in is not None and CELLS.get(name) is built_in


def registered(name: str) -> str | None:
    """``MODULE:QUALNAME`` of the function :data:`CELLS` holds for ``name`` where this
    process registered it (a new name, or over a built-in one); None for a cell as rnnjax
    ships it, or a name not in CELLS (``rnnjax.registry.registered``)."""
    return REGISTRY.registered(name)


def source(name: str) -> str | None:
    """Where another process (the tuner's children) finds the cell ``name`` that this one
    registered in :data:`CELLS`, a new name or over a built-in one: ``MODULE:QUALNAME`` of
    its function (:func:`register_source`). None for a cell as rnnjax ships it, or a name
    not in CELLS (a Flax cell class names its own module). ValueError, naming the fix,
    where no other process can import it as the very function registered
    (``rnnjax.registry.source``)."""
    return REGISTRY.source(name)


def register_source(name: str, where: str) -> None:
    """Register as :data:`CELLS`' ``name`` the cell function ``where`` names
    (``MODULE:QUALNAME``, :func:`source`), as the process that registered it did;
    ValueError naming the cell and the reason where it cannot be imported."""
    REGISTRY.register_source(name, where)


def check_step(cell: Cell, input_sizes: int | Sequence[int], dtype: Any = jnp.float32) -> None:
    """ValueError saying what is wrong where ``cell`` is not what the model scans, traced
    on one step of a batch of 2 (abstractly: nothing runs, no backend starts) at each of
    ``input_sizes`` (the features a layer reads: ``rnnjax.model.Model.layer_inputs``), its
    params, carry and inputs in ``dtype`` (the model's compute dtype, to which it casts
    them): ``init``, ``initial_carry``, ``project`` (where given) and ``step`` must trace,
    and ``step(params, carry, x_t)`` return ``(carry, y_t)``, the carry in
    ``initial_carry``'s shapes and dtypes, ``y_t`` ``[2, hidden_size]``, as must
    ``last_output(carry)`` (where given)."""
    sizes = [input_sizes] if isinstance(input_sizes, int) else list(input_sizes)
    for depth, size in enumerate(dict.fromkeys(sizes)):
        try:
            _check_one_step(cell, size, dtype)
        except ValueError as e:
            if depth == 0:
                raise
            raise ValueError(f"in a layer above the first, which reads {size} features a "
                             f"step (the outputs of the layer below), {e}") from None


def _check_one_step(cell: Cell, input_size: int, dtype: Any) -> None:
    """:func:`check_step` at one input width."""
    def one_step() -> tuple[Any, Any, Any]:
        params = cell.init(jax.random.key(0), input_size)
        cast = jax.tree.map(lambda p: p.astype(dtype), params)  # as the model casts them
        carry = cell.initial_carry(2, dtype)
        x = jnp.zeros((2, input_size), dtype)
        if cell.project is not None:
            x = cell.project(cast, x[None])[0]
        return params, carry, cell.step(cast, carry, x)

    try:
        params, carry, out = jax.eval_shape(one_step)
    except Exception as e:  # the user's code: any error, named in one line
        raise ValueError(f"its init, initial_carry, project or step fails on one step of a "
                         f"batch of 2 ({error_line(e)})") from None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"its step returns a {type(out).__name__}, not (carry, y_t)")
    whole = [jax.tree_util.keystr(path) for path, leaf
             in jax.tree_util.tree_flatten_with_path(params)[0]
             if not jnp.issubdtype(leaf.dtype, jnp.floating)]
    if whole:
        raise ValueError(f"its init makes params that are not floating point at "
                         f"{', '.join(whole)}: every parameter is differentiated and trained; "
                         "keep integers in the carry, or as constants in the step")

    def shapes(tree: Any) -> str:
        return str(jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", tree)).replace("'", "")

    new, y = out
    in_dtype = "" if dtype == jnp.float32 else f" in {jnp.dtype(dtype).name} (--compute-dtype)"
    if shapes(new) != shapes(carry):
        raise ValueError(f"its step returns the carry {shapes(new)} where initial_carry makes "
                         f"{shapes(carry)}{in_dtype}: the same shapes and dtypes, step after "
                         "step")
    if getattr(y, "shape", None) != (2, cell.hidden_size):
        raise ValueError(f"its step returns y_t {shapes(y)} for a batch of 2, not "
                         f"[2, {cell.hidden_size}] (its hidden_size, --hidden-size): the "
                         "layer's outputs")
    if cell.last_output is None:
        return
    try:
        last = jax.eval_shape(cell.last_output, new)
    except Exception as e:  # the user's code, as above
        raise ValueError(f"its last_output fails on the carry {shapes(new)} "
                         f"({error_line(e)})") from None
    if getattr(last, "shape", None) != (2, cell.hidden_size):
        raise ValueError(f"its last_output returns {shapes(last)} from the carry {shapes(new)} "
                         f"for a batch of 2, not y_T [2, {cell.hidden_size}], the last step's "
                         "output")


def _built(name: str, factory: Any, hidden: int) -> Cell:
    """``factory(hidden)``, the cell registered as ``name``, or a ValueError naming the
    registration's mistake: a built cell registered in place of its function, a function
    that cannot be called with the width alone, or one that returns no :class:`Cell`.
    (An error the function itself raises is the function's, and goes up as it is.)"""
    register = f"register the function of the width: CELLS[{name!r}] = my_cell"
    if isinstance(factory, Cell) or not callable(factory):
        raise ValueError(f"{name!r} is registered in rnnjax.cells.CELLS as a "
                         f"{type(factory).__name__}, not a function hidden -> Cell; "
                         f"{register} (not my_cell(64))")
    try:
        inspect.signature(factory).bind(hidden)
    except TypeError as e:
        raise ValueError(f"{name!r}: its function {getattr(factory, '__qualname__', factory)} "
                         f"cannot be called with the width alone ({e}); {register}, "
                         "where my_cell(hidden) returns the cell") from None
    except ValueError:  # no signature to read (a builtin): the call says
        pass
    cell = factory(hidden)
    if not isinstance(cell, Cell):
        raise ValueError(f"{name!r}: its function returned a {type(cell).__name__}, not a "
                         "rnnjax.cells.Cell; return Cell(init=..., step=..., "
                         "initial_carry=..., hidden_size=hidden), as the README's \"How to "
                         "extend\" shows")
    return cell


def get_cell(name: str | type, hidden: int) -> Cell:
    """The cell ``name`` of width ``hidden``: one registered in :data:`CELLS`, or a Flax cell
    class named ``MODULE:CLASS`` (``rnnjax.flax.cells``), or given as the class itself."""
    if isinstance(name, type):  # a Flax cell class, as nn.RNN(nn.GRUCell(...)) reads one
        from rnnjax.flax.cells import flax_cell

        return flax_cell(f"{name.__module__}:{name.__qualname__}", hidden, name)
    if not isinstance(name, str):
        raise TypeError(f"cell: a {type(name).__name__} instance; give a cell's name "
                        f"({', '.join(CELLS)}), or a Flax cell class (the class, or its "
                        "'MODULE:CLASS', e.g. 'flax.linen:GRUCell'), not an instance: "
                        "rnnjax builds the cell at the layer's hidden_size")
    if name in CELLS:
        return _built(name, CELLS[name], hidden)
    if ":" in name:
        from rnnjax.flax.cells import flax_cell

        return flax_cell(name, hidden)
    raise ValueError(f"unknown cell {name!r}; choose one of {', '.join(CELLS)}, or a Flax "
                     "cell class as MODULE:CLASS (e.g. flax.linen:GRUCell); a cell a script "
                     "registers in rnnjax.cells.CELLS is known in its process: register it, "
                     "then call rnnjax.cli.main there")
