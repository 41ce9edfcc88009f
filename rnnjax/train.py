"""Pure training and evaluation functions: no jit, no I/O, no globals.

The caller (``rnnjax.loop``, the benchmarks, the tests) jits these where it uses them,
donating the state. Metrics are additive sums ``{"loss_sum", "correct", "count"}`` so they
can be accumulated on the device across steps and evaluation chunks and turned into means
only when logged (``rnnjax.metrics.summarize``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rnnjax.model import Model

Params = Any
Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
    """Everything that changes during training, as one pytree."""

    step: jax.Array  # int32 [], steps taken so far
    params: Params
    opt_state: optax.OptState


def create_state(
    key: jax.Array, model: Model, optimizer: optax.GradientTransformation,
    optimizer_key: jax.Array | None = None,
) -> TrainState:
    """Fresh parameters from ``key`` and the optimizer's initial state. ``optimizer_key``:
    where given, each typed random key in that state (``noisy_sgd``'s noise) is drawn from
    it (folded with the key's place), in place of the optimizer's own (a legacy uint32 key,
    ``jax.random.PRNGKey``'s, is not known for one: ``rnnjax.optim.check_options`` refuses
    it in an optimizer of one's own)."""
    params = model.init(key)
    opt_state = optimizer.init(params)
    if optimizer_key is not None:
        leaves, tree = jax.tree.flatten(opt_state)
        opt_state = jax.tree.unflatten(tree, [
            jax.random.fold_in(optimizer_key, i) if _is_key(leaf) else leaf
            for i, leaf in enumerate(leaves)])
    return TrainState(jnp.zeros([], jnp.int32), params, opt_state)


def _is_key(leaf: Any) -> bool:
    """Whether ``leaf`` is a typed random key."""
    return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def batch_metrics(
    losses: jax.Array, logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> Metrics:
    """Additive metrics of one batch: losses float32 [B], logits [B, C], labels int32 [B].

    mask: bool [B], False for padding examples that must not count (default: all count).
    """
    if mask is None:
        mask = jnp.ones(labels.shape, bool)
    correct = (jnp.argmax(logits, axis=-1) == labels) & mask
    return {
        "loss_sum": jnp.where(mask, losses, 0).sum(),
        "correct": correct.sum(dtype=jnp.int32),
        "count": mask.sum(dtype=jnp.int32),
    }


def loss_fn(
    params: Params, model: Model, images: jax.Array, labels: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Mean softmax cross-entropy; images float32 [B, H, W(, C)], labels int32 [B].

    Returns ``(mean loss, (per-example losses [B], logits [B, C]))``.
    """
    return _loss(model.apply(params, images), labels)


def _loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    losses = _cross_entropy(logits, labels)
    return losses.mean(), (losses, logits)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy float32 [B] of logits [B, C] and labels int [B]
    (:func:`check_labels`)."""
    check_labels(labels, *logits.shape)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def check_labels(labels: jax.Array, examples: int, classes: int) -> None:
    """A ValueError naming the fix, when traced, unless ``labels`` are integers [examples]:
    one-hot labels [examples, classes] (Keras' ``to_categorical``) or a column
    [examples, 1] are not. Their values, traced, are not checked."""
    if labels.shape != (examples,):
        hint = (": one-hot labels [N, C] become classes by labels.argmax(-1)"
                if labels.shape == (examples, classes) else "")
        raise ValueError(f"labels of shape {list(labels.shape)} for {examples} examples of "
                         f"{classes} classes: give one integer class per example, int32 "
                         f"[{examples}]{hint}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels of dtype {labels.dtype}: give integer classes, int32 "
                         f"[{examples}]")


def train_step(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    sums: Metrics | None = None,
    *,
    model: Model,
    optimizer: optax.GradientTransformation,
) -> tuple[TrainState, Metrics]:
    """One optimisation step on a batch: gradients, optax update, batch metrics.

    images float32 [B, H, W(, C)], labels int32 [B]; sums: the metric sums so far, to which
    the batch's are added (None: the batch's alone), as :func:`train_steps` adds each step's.
    """
    state, metrics = _update(state, model.sequences(images), labels, model, optimizer)
    return state, metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)


def _update(
    state: TrainState, xs: jax.Array, labels: jax.Array, model: Model,
    optimizer: optax.GradientTransformation, rows: jax.Array | None = None,
) -> tuple[TrainState, Metrics]:
    """:func:`train_step` on the batch's time-major sequences xs [T, B, F], or on the batch
    ``rows`` (int32 [B]) of a whole set's xs [T, N, F] (``Model.apply_sequences``)."""
    def loss(params):
        return _loss(model.apply_sequences(params, xs, rows), labels)

    (_, (losses, logits)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), batch_metrics(losses, logits, labels)


# The sums :func:`batch_metrics` adds up, each a scalar of its dtype (a checkpoint saves
# those not logged yet: rnnjax.checkpoint.read_meta checks them against this).
METRIC_DTYPES = {"loss_sum": "float32", "correct": "int32", "count": "int32"}


def zero_metrics() -> Metrics:
    """The additive identity of :func:`batch_metrics`: a float32 or int32 scalar of each
    of :data:`METRIC_DTYPES`."""
    return {name: jnp.zeros([], dtype) for name, dtype in METRIC_DTYPES.items()}


def train_steps(
    state: TrainState,
    sequences: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    count: jax.Array | int | None = None,
    sums: Metrics | None = None,
    *,
    model: Model,
    optimizer: optax.GradientTransformation,
) -> tuple[TrainState, Metrics]:
    """Up to K train steps in one call, batches cut on the device.

    sequences: float32 [T, N, F], the whole dataset as the model reads it, made once
    (``model.sequences`` of float32 [N, H, W(, C)] images in [0, 1], on the device:
    ``data.pipeline.to_device``); labels: int32 [N];
    indices: int32 [K, B], the examples of each step (``data.pipeline.batch_indices``),
    clamped into [0, N) for the images and labels alike;
    count: int32 [], how many leading rows of ``indices`` to run, 0 to K (default: all K;
    a concrete one outside is a ValueError, a traced one above K runs K). A traced count
    lets one compiled function serve every chunk length up to K.
    sums: the metric sums so far (:func:`zero_metrics` where None), to which each step's
    are added in turn: a run's sums are then the same bits however its steps are cut
    into calls (a run resumed, another ``--steps-per-call``).
    Returns the state after ``count`` steps and the sums with theirs: on XLA:CPU the same
    bits as :func:`train_step` on each batch's images (tests/test_train.py).
    """
    check_labels(labels, sequences.shape[1], model.num_classes)
    # NumPy's (batch_indices' rows, the labels) are indexed by traced rows below; the
    # indices into [0, N), as the sequences' gather clamps them: jnp would wrap a negative
    # one for the labels alone, and pair an image with another example's label.
    labels = jnp.asarray(labels)
    indices = jnp.clip(jnp.asarray(indices), 0, labels.shape[0] - 1)
    rows = indices.shape[0]
    if count is None:
        count = rows
    elif isinstance(count, jax.core.Tracer):
        count = jnp.minimum(count, rows)  # past K, indices[i] would repeat the last row
    elif not 0 <= int(count) <= rows:
        raise ValueError(f"train_steps: count {int(count)}, but indices has {rows} rows (one "
                         f"a step); give a count of 0 to {rows}")

    def body(i, carry):
        state, sums = carry
        idx = indices[i]
        state, metrics = _update(state, sequences, labels[idx], model, optimizer, idx)
        return state, jax.tree.map(jnp.add, sums, metrics)

    return jax.lax.fori_loop(0, count, body, (state, zero_metrics() if sums is None else sums))


def eval_step(
    params: Params,
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
    *,
    model: Model,
) -> Metrics:
    """Metrics of one batch: images float32 [B, H, W(, C)], labels int32 [B], mask bool [B]."""
    return _eval_metrics(model.apply(params, images), labels, mask)


def _eval_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array | None) -> Metrics:
    return batch_metrics(_cross_entropy(logits, labels), logits, labels, mask)


def evaluate(
    params: Params,
    images: jax.Array,
    labels: jax.Array,
    *,
    model: Model,
    chunk: int,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> Metrics:
    """Metrics over a whole set, ``chunk`` examples at a time (the last one padded, masked).

    images: float32 [N, H, W(, C)] in [0, 1] on the device, labels: int32 [N].
    batch_sharding: lay each chunk out so (``rnnjax.parallel.batch_sharding``: its rows
    split over the devices); the chunk is then rounded up to a multiple of the device
    count, the extra rows masked padding. :func:`evaluate_sequences` of the images'
    ``model.sequences``: a caller that evaluates the same set again and again makes those
    once and calls that instead.
    """
    return evaluate_sequences(params, model.sequences(images), labels, model=model,
                              chunk=chunk, batch_sharding=batch_sharding)


def evaluate_sequences(
    params: Params,
    sequences: jax.Array,
    labels: jax.Array,
    *,
    model: Model,
    chunk: int,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> Metrics:
    """:func:`evaluate` of a set given as the model reads it: sequences float32 [T, N, F]
    (``model.sequences`` of its images), labels int32 [N]; the same sums.

    Made once, the sequences spare every evaluation a transposed copy of the whole set
    (the seed's 10,000 test images: 41.7 -> 30.2 ms an evaluation at unroll 1 on XLA:CPU,
    in turns in one process). Each chunk is the slice ``[:, i*chunk:(i+1)*chunk]``.
    """
    if chunk < 1:
        raise ValueError(f"evaluate: chunk {chunk}, the examples evaluated at a time: "
                         "give at least 1")
    n = sequences.shape[1]
    check_labels(labels, n, model.num_classes)
    chunk = max(min(chunk, n), 1)
    if batch_sharding is not None:
        chunk = -(-chunk // batch_sharding.num_devices) * batch_sharding.num_devices
    pad = -n % chunk if n else chunk  # an empty set: one chunk of padding, the sums zero
    sequences = jnp.pad(sequences, ((0, 0), (0, pad)) + ((0, 0),) * (sequences.ndim - 2))
    labels = jnp.pad(labels, (0, pad))
    mask = jnp.arange(n + pad) < n

    def body(i, totals):
        x, y, m = (jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=axis)
                   for a, axis in ((sequences, 1), (labels, 0), (mask, 0)))
        if batch_sharding is not None:  # the chunk's batch axis: axis 1 of x
            x = jax.lax.with_sharding_constraint(x, _time_major(batch_sharding))
            y, m = jax.lax.with_sharding_constraint((y, m), batch_sharding)
        metrics = _eval_metrics(model.apply_sequences(params, x), y, m)
        return jax.tree.map(jnp.add, totals, metrics)

    return jax.lax.fori_loop(0, (n + pad) // chunk, body, zero_metrics())


def _time_major(batch: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of time-major [T, B, ...] whose batch axis is laid out as ``batch``'s
    leading one (a NamedSharding)."""
    from jax.sharding import NamedSharding, PartitionSpec

    if not isinstance(batch, NamedSharding):
        raise TypeError(f"batch_sharding: a NamedSharding, not {type(batch).__name__}")
    return NamedSharding(batch.mesh, PartitionSpec(None, *batch.spec))
