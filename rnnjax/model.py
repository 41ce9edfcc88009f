"""The classifier: images -> time-major sequence -> stacked (bi)directional RNN -> Dense.

Any image shape HxWxC: by rows T=H steps of W*C features, by pixels T=H*W steps of C
(``Model.image_shape``, from the dataset's ``rnnjax.data.spec.DataSpec``).

``Model`` is a frozen description; ``init`` and ``apply`` are pure. ``apply`` transposes
the batch to time-major once, scans each layer's cell over time in the form the model
names (``backward``, ``projection``, ``weight_grad``: ``rnnjax.cells.resolve_form``; in
``chunks`` parts: ``rnnjax.cells.scan_cell``; the same values in every form) and feeds the
last output to a dense head (logits; softmax lives in the loss). The seed model (SimpleRNN
50 on rows) has 4,460 parameters: 28*50 + 50*50 + 50 recurrent, 50*10 + 10 head.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import native_gpu, orders
from rnnjax.cells import (
    Cell,
    backwards_besides_native,
    get_cell,
    glorot_uniform,
    layout_mismatch,
    resolve_form,
    scan_cell,
)
from rnnjax.config import NATIVE_LANES, Config, ConfigError
from rnnjax.data.spec import IDX_SPEC, DataSpec

Params = Any


def to_sequence(images: jax.Array, order: str, permutation: jax.Array | None = None) -> jax.Array:
    """Images ``[B, H, W]`` or ``[B, H, W, C]`` -> time-major sequence ``[T, B, F]``, the
    same dtype.

    rows: T=H, F=W*C (the seed: 28 x 28); pixels: T=H*W, F=C (MNIST: 784 x 1);
    permuted: the pixels in a fixed order (``permutation``: int [H*W]); an order registered
    in ``rnnjax.orders.ORDERS``: each step's pixels gathered at the positions its function
    gives (``rnnjax.orders.positions``).
    """
    batch, height, width = images.shape[:3]  # no -1 in the shapes: a batch may be empty
    channels = images.shape[3] if images.ndim == 4 else 1
    if order == "rows":
        return jnp.swapaxes(images.reshape(batch, height, width * channels), 0, 1)
    if order not in orders.BUILT_IN:  # one registered in rnnjax.orders.ORDERS
        where = orders.positions(order, (height, width, channels))  # int32 [T, F]
        flat = images.reshape(batch, height * width * channels)
        return jnp.swapaxes(flat[:, where], 0, 1)
    pixels = images.reshape(batch, height * width, channels)
    if order == "permuted":
        if permutation is None:
            raise ValueError("order 'permuted' needs a permutation")
        pixels = pixels[:, permutation]
    return jnp.swapaxes(pixels, 0, 1)


def pixel_permutation(seed: int, size: int = 784) -> np.ndarray:
    """The fixed pixel order of permuted images of ``size`` pixels (784: permuted MNIST):
    int32 [size], a function of ``seed`` and ``size`` only."""
    return np.random.default_rng((seed, size)).permutation(size).astype(np.int32)


def gather_sequences(sequences: jax.Array, idx: jax.Array, by_step: bool = False
                     ) -> jax.Array:
    """The batch ``idx`` (int [B]) of a whole dataset's sequences [T, N, F]
    (``Model.sequences``) -> [T, B, F], ``sequences[:, idx]``; indices outside [0, N) are
    clamped into it, as the native kernels clamp them (``rnnjax.native``), so every form
    reads the same rows.

    Gathered as rows ``t * N + idx[b]`` of the [T*N, F] table, so XLA writes the batch
    time-major in one pass (``jnp.take(..., axis=1)`` is gathered batch-major, then
    transposed: 1.07x slower at rows batch 4096 on XLA:CPU).

    ``by_step``: gathered step by step, each step's ``[B, F]`` a gather of its own, and
    stacked; the same values. For a train step that reads the sequence only a step at a
    time in straight-line code (``Model.reads_steps_alone``): XLA then hands each step's
    gather to its reader and never builds the stack, where it copied each step's slice out
    of the one gathered batch (on a 2-core AVX-512 EPYC, the rows SimpleRNN at batch 4096
    fully unrolled: 28 copies of 0.1 ms a train step; in turns in one process the step
    1.04-1.06x faster in four runs of five, 0.95x in one; level at batch 1024 and 50).
    """
    steps, count = sequences.shape[:2]
    idx = jnp.clip(idx.astype(jnp.int32), 0, count - 1)
    if steps * count >= 2**31:  # beyond int32 row numbers
        return jnp.take(sequences, idx, axis=1)
    table = sequences.reshape(steps * count, *sequences.shape[2:])
    if by_step:
        return jnp.stack([table[t * count + idx] for t in range(steps)])
    return table[jnp.arange(steps, dtype=jnp.int32)[:, None] * count + idx]


@dataclass(frozen=True, eq=False)
class Model:
    """A sequence classifier; build one with :func:`make_model`."""

    cell: Cell
    num_layers: int = 1
    bidirectional: bool = False
    num_classes: int = 10
    order: str = "rows"
    unroll: int = 1
    weight_grad: str = "auto"
    projection: str = "auto"
    backward: str = "auto"
    chunks: int = 1
    native_lanes: int = NATIVE_LANES[0]  # the native kernels' floats a vector (Config's)
    compute_dtype: Any = jnp.float32
    permutation: np.ndarray | None = None
    image_shape: tuple[int, int, int] = (28, 28, 1)  # H, W, C of the images it reads
    # Several devices' mesh, the batch split over its "data" axis (parallel.DataParallel's
    # ``model``): the native form runs each device's rows there (cells.split_rows).
    mesh: jax.sharding.Mesh | None = None

    @property
    def time_steps(self) -> int:
        """Steps per sequence: H by rows, H*W by pixels (``DataSpec.sequence``)."""
        return DataSpec(self.image_shape).sequence(self.order)[0]

    @property
    def input_size(self) -> int:
        """Features per time step: W*C by rows, C by pixels (``DataSpec.sequence``)."""
        return DataSpec(self.image_shape).sequence(self.order)[1]

    @property
    def layer_inputs(self) -> tuple[int, ...]:
        """Features per time step each layer reads: the first :attr:`input_size`, a later
        one the layer below's outputs (``hidden_size``, twice that bidirectional)."""
        width = self.cell.hidden_size * (2 if self.bidirectional else 1)
        return (self.input_size,) + (width,) * (self.num_layers - 1)

    def init(self, key: jax.Array) -> Params:
        """Parameters (float32): ``{"rnn": [layer, ...], "head": {"kernel", "bias"}}``.

        A layer is the cell's params, or ``{"fwd": ..., "bwd": ...}`` when bidirectional.
        """
        keys = jax.random.split(key, self.num_layers + 1)
        width = self.cell.hidden_size * (2 if self.bidirectional else 1)
        layers = []
        for i, size in enumerate(self.layer_inputs):
            if self.bidirectional:
                kf, kb = jax.random.split(keys[i])
                layers.append({"fwd": self.cell.init(kf, size), "bwd": self.cell.init(kb, size)})
            else:
                layers.append(self.cell.init(keys[i], size))
        head = {
            "kernel": glorot_uniform(keys[-1], (width, self.num_classes), jnp.float32),
            "bias": jnp.zeros((self.num_classes,), jnp.float32),
        }
        return {"rnn": layers, "head": head}

    def param_shapes(self) -> Params:
        """:meth:`init`'s parameters as ``jax.ShapeDtypeStruct`` values, traced: nothing
        allocated, and JAX's backend not started (the key is made inside the trace)."""
        return jax.eval_shape(lambda: self.init(jax.random.key(0)))

    @functools.cached_property
    def _param_layout(self) -> Params:
        """:meth:`param_shapes`, traced once a model (:meth:`apply_sequences` checks each
        params it is given against them)."""
        return self.param_shapes()

    def sequences(self, images: jax.Array) -> jax.Array:
        """Images ``[N, H, W, C]`` (or ``[N, H, W]`` when C=1) -> the time-major sequences
        ``[T, N, F]`` the model reads (:func:`to_sequence` in its order, the permuted order
        applied); the same dtype. ``apply(p, images) == apply_sequences(p, sequences(images))``.

        ``rnnjax.train.train_steps`` takes a whole dataset in this form, made once: its
        batches are then read time-major, with no transpose per step
        (:meth:`apply_sequences` with rows). Images that are not floats (uint8 pixels
        0..255 not yet scaled) are a ValueError: the model would train on them as they are.
        """
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"Model: images of dtype {images.dtype}; give floats in [0, 1] "
                             "(uint8 pixels through rnnjax.data.pipeline.normalize_host, or "
                             "/ 255)")
        h, w, c = self.image_shape
        if tuple(images.shape[1:]) not in ((h, w, c), (h, w) if c == 1 else (h, w, c)):
            raise ValueError(f"Model: images of shape {tuple(images.shape)}; this model "
                             f"reads [B, {h}, {w}, {c}]" + (f" or [B, {h}, {w}]" if c == 1 else ""))
        perm = None if self.permutation is None else jnp.asarray(self.permutation)
        return to_sequence(images, self.order, perm)

    def reads_steps_alone(self, batch: int) -> bool:
        """Whether the train step at ``batch`` reads its input sequence only one step at a
        time, in straight-line code: one direction, one part, fully unrolled, in a form
        that reads its inputs step by step (``rnnjax.cells.Form.reads_inputs_by_step``).
        :meth:`apply_sequences` then gathers each batch step by step
        (:func:`gather_sequences`)."""
        if self.bidirectional or self.chunks != 1:
            return False
        if 0 < self.unroll < self.time_steps:
            return False
        return resolve_form(self.cell, batch, self.backward, self.projection,
                            self.weight_grad).reads_inputs_by_step

    def reads_rows(self, batch: int) -> bool:
        """Whether the first layer at ``batch`` reads a batch's rows of a whole set's sequences
        where they are (:meth:`apply_sequences` with rows): one direction, one part (a
        part's steps of the whole set's sequences would be a copy of them: the pixel LSTM in
        8 parts ran 40.7 ms a step in one run of the Flax benchmark, in one part 25.8 in the
        next), in the native form (``rnnjax.native``). XLA then writes no gathered [T, B, F]
        copy of the batch each step (the rows SimpleRNN's native train step, in turns in one
        process on a 2-vCPU AVX-512 Xeon: 1.10-1.14x faster at batch 4096, 1.13x at 50,
        level to 1.09x at 1024; docs/performance.md, "Batches read where they are")."""
        return not self.bidirectional and self.chunks == 1 and resolve_form(
            self.cell, batch, self.backward, self.projection, self.weight_grad
        ).backward == "native"

    def apply(self, params: Params, images: jax.Array) -> jax.Array:
        """Images float32 ``[B, H, W, C]`` (or ``[B, H, W]`` when C=1) in [0, 1] -> logits
        float32 ``[B, classes]``; H, W, C as ``image_shape``."""
        return self.apply_sequences(params, self.sequences(images))

    def apply_sequences(self, params: Params, xs: jax.Array, rows: jax.Array | None = None
                        ) -> jax.Array:
        """Time-major sequences float32 ``[T, B, F]`` (:meth:`sequences`) -> logits float32
        ``[B, classes]``.

        With ``rows`` (int32 [B], clamped into [0, N)): ``xs`` is a whole set's sequences
        [T, N, F] and the batch ``xs[:, rows]`` (the same logits as
        ``apply_sequences(params, xs[:, rows])``), read where it is by a first layer that
        can (:meth:`reads_rows`), else gathered first (:func:`gather_sequences`).
        """
        steps = self.time_steps
        if xs.ndim != 3 or xs.shape[0] != steps or xs.shape[2] != self.input_size:
            raise ValueError(f"Model.apply_sequences: sequences of shape {tuple(xs.shape)}; "
                             f"this model reads [{steps}, B, {self.input_size}] "
                             "(Model.sequences of its images)")
        if rows is not None:
            if rows.ndim != 1 or not jnp.issubdtype(rows.dtype, jnp.integer):
                raise ValueError(f"Model.apply_sequences: rows {rows.dtype} of shape "
                                 f"{tuple(rows.shape)}; pass the batch's indices into the "
                                 "sequences, int32 [B]")
            batch = rows.shape[0]
            if not self.reads_rows(batch):
                xs, rows = gather_sequences(xs, rows, self.reads_steps_alone(batch)), None
        mismatch = layout_mismatch(params, self._param_layout)
        if mismatch is not None:
            raise ValueError(f"Model: params that are not this model's ({mismatch}): pass "
                             "the params of its init, or build the model of the same Config "
                             "(cell, hidden_size, num_layers, bidirectional, classes)")
        dtype = self.compute_dtype
        layers, head = jax.tree.map(lambda p: p.astype(dtype), params["rnn"]), params["head"]
        xs = xs.astype(dtype)
        finals = ()  # the last layer's final carries (two when bidirectional)
        form = {"unroll": self.unroll, "weight_grad": self.weight_grad,
                "projection": self.projection, "backward": self.backward, "chunks": self.chunks,
                "native_lanes": self.native_lanes, "mesh": self.mesh}
        # The last layer's outputs over time are not read where the carry gives y_T.
        top = len(layers) - 1 if self.cell.last_output is not None else None
        for depth, layer in enumerate(layers):
            if self.bidirectional:
                carry_f, fwd = scan_cell(self.cell, layer["fwd"], xs, **form)
                carry_b, bwd = scan_cell(self.cell, layer["bwd"], xs[::-1], **form)
                xs = jnp.concatenate([fwd, bwd[::-1]], axis=-1)
                finals = (carry_f, carry_b)
            else:
                carry, xs = scan_cell(self.cell, layer, xs, **form, rows=rows,
                                      outputs=depth != top)
                finals = (carry,)
            rows = None  # the later layers read the first's outputs, [T, B, H]
        if self.cell.last_output is not None:
            # The same values as slicing xs below, read from the carries: the last layer's
            # outputs over time are then unused and never stored.
            last = jnp.concatenate([self.cell.last_output(c) for c in finals], axis=-1)
        elif self.bidirectional:
            # Last step of the forward pass, and the backward pass's output at t=0 (which
            # has read the whole sequence), as Keras' Bidirectional(return_sequences=False).
            width = self.cell.hidden_size
            last = jnp.concatenate([xs[-1, :, :width], xs[0, :, width:]], axis=-1)
        else:
            last = xs[-1]
        # The head's product sums in float32 and its float32 bias is added after: in
        # bfloat16 the logits are not rounded to 8 bits, and the bias's gradient (the
        # logits' cotangents summed over the batch) sums in float32, as the hand-written
        # layers sum theirs. For float32 compute, the same program as ``last @ kernel``.
        logits = jnp.dot(last, head["kernel"].astype(dtype),
                         preferred_element_type=jnp.float32) + head["bias"]
        return logits.astype(jnp.float32)


def make_model(config: Config, spec: DataSpec | None = None) -> Model:
    """The model ``config`` describes, for the images and classes of ``spec``.

    ``spec`` (the dataset's, ``rnnjax.data.sources.load_dataset``) defaults to the IDX
    layout: 28x28x1 images and ``config.num_classes`` classes (10 when it is 0).
    """
    if spec is None:
        spec = DataSpec(IDX_SPEC.image_shape, config.num_classes or IDX_SPEC.num_classes)
    pixels = spec.image_shape[0] * spec.image_shape[1]
    permutation = pixel_permutation(config.seed, pixels) if config.order == "permuted" else None
    try:
        cell = get_cell(config.cell, config.hidden_size)
    except ValueError as e:
        raise ConfigError(f"--cell: {e}") from None
    model = Model(
        cell=cell,
        num_layers=config.num_layers,
        bidirectional=config.bidirectional,
        num_classes=spec.num_classes,
        order=config.order,
        unroll=config.unroll,
        weight_grad=config.weight_grad,
        projection=config.projection,
        backward=config.backward,
        chunks=config.chunks,
        native_lanes=config.native_lanes,
        compute_dtype=jnp.dtype(config.compute_dtype),
        permutation=permutation,
        image_shape=spec.image_shape,
    )
    if config.chunks > model.time_steps:
        raise ConfigError(f"--chunks {config.chunks} exceeds the {model.time_steps} time steps "
                          f"of --order {config.order}; choose 1 to {model.time_steps}")
    if config.backward == "native":
        _check_native(config, cell)
    return model


def _check_native(config: Config, cell: Cell) -> None:
    """What backward 'native' needs that ``config`` and this machine may lack: a C++
    compiler for the CPU's kernels, unless the cell has a GPU's too and a JAX GPU plugin is
    installed (which backend runs is not known before it starts: ``rnnjax.cli.check_model``
    starts none)."""
    if cell.native is None:
        raise ConfigError(f"--backward native: --cell {config.cell} has no native kernels "
                          "(simple_rnn, lstm and gru have); choose "
                          f"{backwards_besides_native(cell)}")
    if config.compute_dtype != "float32":
        raise ConfigError(f"--backward native runs float32, not --compute-dtype "
                          f"{config.compute_dtype}: drop one of them")
    reason = native_unavailable(cell)
    if reason is not None:
        raise ConfigError(f"{reason}, or choose another --backward")


def native_unavailable(cell: Cell) -> str | None:
    """Why ``cell``'s native form may not run here (no C++ compiler for the CPU's kernels,
    where the cell has no GPU kernels or no JAX GPU plugin is installed), or None."""
    from rnnjax import native
    from rnnjax.cells import native_backends

    reason = native.unavailable()
    if reason is not None and "gpu" in native_backends(cell) and native_gpu.plugin_installed():
        return None
    return reason


def evaluation_model(config: Config, model: Model) -> Model:
    """``model`` as the evaluations run it: a 'native' model on a CPU in its native form
    where ``config.eval_native`` (its last layer's forward writes the last step alone:
    ``rnnjax.native``'s ``final``), else XLA's (a 'native' model in the hand-written form)
    scanned at ``config.eval_unroll`` where that is set (-1: the train step's unroll). Only
    the program differs: the unroll keeps the sums, bit for bit, where rnnjax.tune sets it,
    the native form rounds otherwise (within the tuner's tolerance where it chooses it).

    Which is faster depends on the machine: at the evaluation's batch of 10,000, the native
    forward that wrote every step's [T, B, ...] arrays had been slower than XLA's loop
    (2-core AVX-512 EPYC, ms: simple_rnn 56 against 48, gru 229 against 136, lstm 301
    against 206); writing the last step alone, it was faster on a 2-vCPU AVX-512 Xeon
    (16 lanes: 17 against 35, 42 against 52, 56 against 89; 8 lanes: 20 against 37, level,
    71 against 97). So rnnjax.tune times both."""
    if model.backward == "native":
        if evaluates_natively(config):
            return model
        model = dataclasses.replace(model, backward="hand_written")
    if config.eval_unroll < 0 or config.eval_unroll == model.unroll:
        return model
    return dataclasses.replace(model, unroll=config.eval_unroll)


def evaluates_natively(config: Config) -> bool:
    """Whether a 'native' model's evaluations run in the native form here
    (:func:`evaluation_model`): with ``config.eval_native``, on a CPU."""
    return config.eval_native and not native_gpu.runs_here()


def count_params(params: Params) -> int:
    """Total number of scalar parameters."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
