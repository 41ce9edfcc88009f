"""What a run's own functions compute, recorded with each of its checkpoints and compared
where one is read again (``--resume``, ``rnnjax eval`` and ``predict``,
``rnnjax.inference.load``).

A run's config names its cell, order and optimizer; where one is the user's (a cell
registered in ``rnnjax.cells.CELLS`` or a Flax cell class, an order in
``rnnjax.orders.ORDERS``, an optimizer in ``rnnjax.optim.OPTIMIZERS``), the name alone
does not say which function it was: another registered under it since would train on
from the checkpoint, or evaluate it, silently with other code. So a checkpoint records a
*probe* of each: what the function computes on fixed inputs, not its source (a function
renamed, moved or reformatted passes; one whose results changed is refused in one line):

* an order: its positions ``int [T, F]`` for the dataset's images, compared exactly;
  rnnjax's own ``permuted`` too, whose pixel order NumPy draws from ``--seed``
  (``rnnjax.model.pixel_permutation``): NumPy does not promise ``Generator.permutation``'s
  stream across its versions, so the checkpoint records the NumPy that drew it, and one
  read where NumPy draws another order is refused, naming that version;
* a cell: :data:`STEPS` steps of a batch of :data:`BATCH` from fixed parameters in its
  ``init``'s shapes (its initialiser is not compared: a checkpoint has its parameters),
  through ``step`` (and ``project``), and through ``sequence`` where it has one, and
  ``last_output`` of each final carry where it has one;
* an optimizer: :data:`STEPS` updates of the model's parameters by fixed gradients, at
  the run's learning rate held constant (``--steps`` may grow on a resume; ``--schedule``
  and ``--clip-norm`` are rnnjax's own, and in the config).

Cells and optimizers run on the CPU in float32 (products at full precision) and are
compared within :data:`RTOL` of the values' scale, sampled at up to :data:`SAMPLES`
places: the same code on another CPU, or with another jax, computes within it. A change
smaller than that passes. Checkpoints written before rnnjax recorded probes are not
checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import cells, model, optim, orders
from rnnjax.checkpoint import CheckpointError
from rnnjax.config import Config, error_line
from rnnjax.data.spec import DataSpec

KINDS = ("cell", "order", "optimizer")
STEPS = 3  # time steps of a cell, updates of an optimizer
BATCH = 2
SAMPLES = 256  # values compared, evenly spaced over all of a probe's
RTOL = 1e-4  # of the values' scale (their root mean square)
SEED = 20261206  # of the fixed inputs (numpy: the same values everywhere)


def record(config: Config, spec: DataSpec, param_shapes: Any, kinds: tuple[str, ...] = KINDS
           ) -> dict[str, dict[str, Any]]:
    """``{kind: {"function": ..., "probe": ...}}`` (JSON) for each of ``config``'s cell,
    order and optimizer that is the user's (:func:`users`) among ``kinds``, as a checkpoint
    records it; ``param_shapes``: the model's parameters (``Model.param_shapes``), which an
    optimizer's probe updates."""
    drawn = ("order",) if config.order == "permuted" else ()  # by NumPy, from --seed
    return {kind: _entry(kind, config, spec, param_shapes) for kind in users(config) + drawn
            if kind in kinds}


def users(config: Config) -> tuple[str, ...]:
    """The kinds (:data:`KINDS`) of ``config``'s functions that are not rnnjax's own: a
    cell registered (over a built-in name too) or a Flax cell class, a registered order or
    optimizer."""
    return tuple(kind for kind, own in (("cell", cells.shipped(config.cell)),
                                        ("order", config.order in orders.BUILT_IN),
                                        ("optimizer", config.optimizer not in optim.OPTIMIZERS))
                 if not own)


def check(meta: Mapping[str, Any], config: Config, spec: DataSpec, param_shapes: Any,
          where: Path | str, kinds: tuple[str, ...] = KINDS) -> dict[str, dict[str, Any]]:
    """``CheckpointError``, naming the function and the fix, where a function the checkpoint
    ``where`` (its ``meta``) recorded a probe of computes other values here, where
    ``config`` names it (the checkpoint's own config, or a resume's); else the record for
    this run's next checkpoints (:func:`record`). A cell trained as rnnjax's own and
    registered over its name since is compared with rnnjax's, and one trained as the
    user's over a built-in name with rnnjax's where this process did not register it.
    ``kinds``: those compared (an evaluation runs no optimizer); the record then holds
    only them."""
    saved = meta.get("probes")
    now = record(config, spec, param_shapes, kinds)
    if saved is None:  # written before rnnjax recorded probes
        return now
    for kind in kinds:
        old, new = saved.get(kind), now.get(kind)
        if old is None and new is not None and kind == "cell" and config.cell in cells.BUILT_IN:
            old = _entry(kind, config, spec, param_shapes,
                         cells.BUILT_IN[config.cell](config.hidden_size))
        elif old is not None and new is None and kind == "cell":  # rnnjax's own here
            new = _entry(kind, config, spec, param_shapes, cells.get_cell(config.cell,
                                                                          config.hidden_size))
        if old is None or new is None or old["probe"] is None:
            continue  # rnnjax's own both times, or no probe could run when it was written
        differ = _differ(kind, old["probe"], new["probe"])
        if differ is None:
            continue
        if kind == "order" and config.order == "permuted":
            then = str(old.get("numpy", "another version"))
            raise CheckpointError(
                f"checkpoint {where} was trained with --order permuted drawn from --seed "
                f"{config.seed} by NumPy {then}, and NumPy {np.__version__} here draws another "
                f"pixel order from that seed: evaluate or resume it under NumPy {then} (pip "
                f"install 'numpy=={then}'), or train into another --workdir (the checkpoint "
                "is kept as it is)")
        name = {"cell": config.cell, "order": config.order, "optimizer": config.optimizer}[kind]
        then, here = old["function"] or "rnnjax's own", new["function"] or "rnnjax's own"
        if old["function"] and old["function"] == new["function"]:  # its code changed
            fix = (f"{old['function']} computes otherwise than when it trained: give it back "
                   "the code it was trained with before you resume or evaluate it")
        elif old["function"]:
            fix = f"register {old['function']} as {name} before you resume or evaluate it"
        else:
            fix = f"register yours under another name than {name}"
        raise CheckpointError(
            f"checkpoint {where} was trained with --{kind} {name} = {then}, and --{kind} "
            f"{name} here ({here}) {differ}: {fix}, or train into another --workdir (the "
            "checkpoint is kept as it is)")
    return now


def _entry(kind: str, config: Config, spec: DataSpec, param_shapes: Any,
           cell: cells.Cell | None = None) -> dict[str, Any]:
    """The record of ``config``'s ``kind``: the name of its function (None for rnnjax's
    own) and its probe (None where the probe fails: a function that cannot run on it is
    not compared); ``cell``: the cell to probe in place of ``config``'s, rnnjax's own."""
    if kind == "order" and config.order == "permuted":
        return {"function": None, "probe": _permutation_probe(config.seed, spec),
                "numpy": np.__version__}
    if kind == "order":
        return {"function": orders.REGISTRY.registered(config.order),
                "probe": _order_probe(config.order, spec)}
    if kind == "optimizer":
        function = optim.REGISTRY.registered(config.optimizer)
    else:
        function = None if cell is not None else cells.registered(config.cell) or config.cell
    try:
        probe = (_optimizer_probe(config, param_shapes) if kind == "optimizer" else
                 _cell_probe(cell or cells.get_cell(config.cell, config.hidden_size),
                             spec.sequence(config.order)[1]))
    except Exception as e:  # the user's code: a probe it cannot take is not compared
        probe = None
        function = f"{function} (its probe failed: {error_line(e, 80)})"
    return {"function": function, "probe": probe}


def _order_probe(order: str, spec: DataSpec) -> str:
    """SHA-256 of ``order``'s positions ``int32 [T, F]`` for ``spec``'s images."""
    return _digest(orders.positions(order, spec.image_shape))


def _permutation_probe(seed: int, spec: DataSpec) -> str:
    """SHA-256 of the ``permuted`` order's pixel order ``int32 [H*W]`` from ``seed`` for
    ``spec``'s images, as the model draws it."""
    height, width = spec.image_shape[:2]
    return _digest(model.pixel_permutation(seed, height * width))


def _digest(found: np.ndarray) -> str:
    """SHA-256 of integer positions ``found``: their shape, then their values as int32."""
    found = np.ascontiguousarray(found, "<i4")
    return hashlib.sha256(f"{list(found.shape)}".encode() + found.tobytes()).hexdigest()


def _fixed(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Fixed values of ``shape``: uniform in ±1, scaled by 1/sqrt(rows) for a matrix (so a
    cell's activations stay well inside their range)."""
    scale = 1.0 / np.sqrt(shape[0]) if len(shape) > 1 and shape[0] else 1.0
    return (rng.uniform(-1.0, 1.0, shape) * scale).astype(dtype)


def _filled(rng: np.random.Generator, shapes: Any) -> Any:
    """``shapes`` (a pytree of arrays or ``ShapeDtypeStruct`` values) filled by
    :func:`_fixed`."""
    return jax.tree.map(lambda s: _fixed(rng, tuple(s.shape), s.dtype), shapes)


def _on_cpu(function: Callable[..., Any], *args: Any) -> np.ndarray:
    """``function(*args)``, jitted on the CPU (where ``JAX_PLATFORMS`` leaves one; else on
    the default device), its products at full float32 precision (a GPU's default rounds
    them to TF32), its outputs' leaves float64, flattened and joined."""
    try:
        device = jax.devices("cpu")[0]
    except (RuntimeError, ValueError):  # JAX_PLATFORMS=cuda, say: no CPU backend
        device = jax.devices()[0]
    with jax.default_device(device), jax.default_matmul_precision("highest"):
        out = jax.jit(function)(*args)
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(out)])


def _summary(values: np.ndarray) -> list[float | str]:
    """What a probe records of ``values``: their root mean square, then up to
    :data:`SAMPLES` of them evenly spaced (JSON floats; NaN and inf as strings)."""
    scale = float(np.sqrt(np.mean(np.square(values)))) if values.size else 0.0
    picked = values[np.linspace(0, values.size - 1, min(SAMPLES, values.size)).astype(int)]
    return [float(v) if np.isfinite(v) else str(v) for v in (scale, *picked)]


def _cell_probe(cell: cells.Cell, features: int) -> list[float | str]:
    """:func:`_summary` of ``cell``'s outputs and carries over :data:`STEPS` steps of a
    batch of :data:`BATCH` of ``features``, through ``step`` and through ``sequence``, and
    ``last_output`` of each final carry."""
    rng = np.random.default_rng(SEED)
    params = _filled(rng, jax.eval_shape(lambda key: cell.init(key, features), jax.random.key(0)))
    xs = _fixed(rng, (STEPS, BATCH, features), np.float32)

    def run(params: Any, xs: jax.Array) -> list[Any]:
        carry = cell.initial_carry(BATCH, jnp.float32)
        us = xs if cell.project is None else cell.project(params, xs)
        out = [jax.lax.scan(lambda c, u: cell.step(params, c, u), carry, us)]
        if cell.sequence is not None:
            out.append(cell.sequence(params, xs, carry, 1))
        if cell.last_output is not None:  # what the model's head reads in place of y_T
            out += [cell.last_output(final) for final, _ in out]
        return out

    return _summary(_on_cpu(run, params, xs))


def _optimizer_probe(config: Config, param_shapes: Any) -> list[float | str]:
    """:func:`_summary` of the parameters ``config``'s optimizer (at its learning rate,
    constant, unclipped) makes of fixed ones in ``param_shapes`` by :data:`STEPS` fixed
    gradients, and of its last updates."""
    import optax

    constant = config.replace(schedule="constant", warmup_steps=0, clip_norm=0.0)
    optimizer = optim.make_optimizer(constant, check=False)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), param_shapes)
    rng = np.random.default_rng(SEED)
    params = _filled(rng, shapes)
    grads = jax.tree.map(lambda *g: np.stack(g), *[_filled(rng, shapes) for _ in range(STEPS)])

    def run(params: Any, grads: Any) -> Any:
        def update(carry: Any, g: Any) -> tuple[Any, Any]:  # a loop: one update compiled
            params, state = carry
            updates, state = optimizer.update(g, state, params)
            return (optax.apply_updates(params, updates), state), updates

        (params, _), updates = jax.lax.scan(update, (params, optimizer.init(params)), grads)
        return params, updates

    return _summary(_on_cpu(run, params, grads))


def _differ(kind: str, old: Any, new: Any) -> str | None:
    """How probe ``new`` differs from ``old``, in a few words; None where it does not."""
    if kind == "order":
        return None if old == new else "reads other positions of the images"
    if new is None:
        return "cannot run on the probe's inputs"
    if not isinstance(old, list) or len(old) != len(new):
        return "computes values of another size"
    a = np.array([float(v) for v in old])
    b = np.array([float(v) for v in new])
    finite = np.isfinite(a)
    if not (np.array_equal(finite, np.isfinite(b))
            and np.array_equal(a[~finite], b[~finite], equal_nan=True)):
        return "computes other values that are not finite"
    scale = max(abs(a[0]), abs(b[0])) if finite[0] else 1.0
    gap = float(np.max(np.abs(a[finite] - b[finite]), initial=0.0))
    if gap <= RTOL * max(scale, float(np.finfo(np.float32).tiny)):
        return None
    return (f"computes other values (by up to {gap:.3g}, at a scale of {scale:.3g}, on "
            "rnnjax.probes' fixed inputs)")
