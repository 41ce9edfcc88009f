"""Any Flax RNN cell as an rnnjax :class:`~rnnjax.cells.Cell`: ``--cell MODULE:CLASS``.

``flax.linen:GRUCell``, ``flax.linen:OptimizedLSTMCell``, ``flax.nnx:LSTMCell`` or a user's
``my_pkg.cells:MyCell``: a linen cell is built as ``CLASS(features=hidden)``, an nnx cell as
``CLASS(input_size, hidden, rngs=...)`` (the signatures of Flax's own cells), and either is
then stepped by rnnjax's scan like any other cell, so the loop, feeds, checkpoints, resume,
eval, predict and ``benchmarks.throughput`` take it unchanged. Its parameters are the
cell's own Flax params as a plain dict (nnx: ``nnx.to_pure_dict`` of its ``Param`` state).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cells import Cell, cast_floats
from rnnjax.config import error_line

HINT = "name a Flax RNN cell class as MODULE:CLASS, e.g. flax.linen:GRUCell"


def load_class(spec: str) -> type:
    """The class ``MODULE:CLASS`` names; ValueError with the reason and the fix otherwise."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"{spec!r} is not MODULE:CLASS; {HINT}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{spec!r}: cannot import {module_name!r} ({e}); put its module on "
                         f"the Python path (PYTHONPATH), or {HINT}") from None
    obj = module
    for part in class_name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{spec!r}: {module_name!r} has no {class_name!r}; {HINT}")
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, not a class; {HINT}")
    return obj


def _as_before(carry: Any, new: Any, y: jax.Array, x: jax.Array) -> tuple[Any, jax.Array]:
    """A Flax cell's step ``(new, y)`` in the dtypes rnnjax's scan keeps: each carry leaf as
    it came in, the output as the input ``x`` (a Flax cell's float32 parameters promote a
    bfloat16 step to float32, which ``lax.scan`` refuses as the carry's)."""
    return jax.tree.map(lambda n, o: n.astype(o.dtype), new, carry), y.astype(x.dtype)


def flax_cell(spec: str, hidden: int, cls: type | None = None) -> Cell:
    """The Flax cell class ``spec`` (``MODULE:CLASS``; ``cls``, where given, the class
    itself) of width ``hidden`` as a Cell: the same Cell while the module holds the same
    class (one edited and reloaded, as in a notebook, is another)."""
    return _flax_cell(spec, load_class(spec) if cls is None else cls, hidden)


@functools.cache
def _flax_cell(spec: str, cls: type, hidden: int) -> Cell:
    import flax.linen as nn
    from flax import nnx

    if not callable(getattr(cls, "initialize_carry", None)):
        raise ValueError(f"{spec!r} is not an RNN cell (no initialize_carry method); {HINT}")
    if issubclass(cls, nn.Module):
        return _linen_cell(spec, cls, hidden)
    if issubclass(cls, nnx.Module):
        return _nnx_cell(spec, cls, hidden)
    raise ValueError(f"{spec!r} is neither a flax.linen nor a flax.nnx Module; {HINT}")


def _build_error(spec: str, how: str, e: Exception) -> ValueError:
    """One line: the cell ``spec`` could not be built as ``how`` (``CLASS(ARGS)``); the
    arguments blamed for a TypeError only (the signature of Flax's cells not taken)."""
    fix = ("the cell must take the arguments of Flax's own cells" if type(e) is TypeError
           else "fix the cell's code")
    return ValueError(f"{spec!r} could not be built as {how} ({error_line(e)}); {fix}")


def _linen_cell(spec: str, cls: type, hidden: int) -> Cell:
    try:
        module = cls(features=hidden)
    except Exception as e:  # a user's cell may raise anything: one line
        raise _build_error(spec, f"{cls.__name__}(features={hidden})", e) from None

    def initial_carry(batch: int, dtype: Any) -> Any:
        # Flax's cells take the carry's batch dimensions from input_shape[:-1].
        return cast_floats(module.initialize_carry(jax.random.key(0), (batch, 1)), dtype)

    def init(key: jax.Array, input_size: int) -> Any:
        x = jnp.zeros((1, input_size), jnp.float32)
        return dict(module.init(key, initial_carry(1, jnp.float32), x)["params"])

    def step(params: Any, carry: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        return _as_before(carry, *module.apply({"params": params}, carry, x), x)

    try:  # its variables' shapes only: nothing is drawn
        variables = jax.eval_shape(lambda: module.init(
            jax.random.key(0), initial_carry(1, jnp.float32), jnp.zeros((1, 1), jnp.float32)))
    except Exception as e:  # a user's cell may raise anything: one line
        raise ValueError(f"{spec!r}: its init or initialize_carry fails on one step of a batch "
                         f"of 1 ({error_line(e)}); fix the cell's code (JAX traces it: no "
                         "Python if on values)") from None
    others = sorted(set(variables) - {"params"})
    if others:  # their values would be lost between steps: apply takes the params alone
        raise ValueError(f"{spec!r} holds collections other than params ({', '.join(others)})"
                         "; rnnjax steps a cell from its params alone: make them params, or "
                         "constants of the class")
    return Cell(init=init, step=step, initial_carry=initial_carry, hidden_size=hidden)


def _str_keys(tree: Any) -> Any:
    """A pure dict with every key a string: the params of an nnx cell whose layers are an
    ``nnx.List`` or ``nnx.Sequential`` (keys 0, 1, ...), as a checkpoint restores them
    (orbax's keys are strings: their ints had read as another model's parameters)."""
    if not isinstance(tree, dict):
        return tree
    return {str(key): _str_keys(value) for key, value in tree.items()}


def _keys_like(tree: Any, like: Any) -> Any:
    """``tree`` (:func:`_str_keys`' keys) with the keys of ``like``, the module's own pure
    dict, which ``nnx.replace_by_pure_dict`` matches."""
    if not isinstance(like, dict):
        return tree
    return {key: _keys_like(tree[str(key)], value) for key, value in like.items()}


def _nnx_cell(spec: str, cls: type, hidden: int) -> Cell:
    from flax import nnx

    @functools.cache
    def template(input_size: int) -> tuple[Any, Any]:
        """The cell's graph and state for this input size (values replaced per call)."""
        try:
            module = nnx.eval_shape(lambda: cls(input_size, hidden, rngs=nnx.Rngs(0)))
        except Exception as e:  # a user's cell may raise anything: one line
            raise _build_error(spec, f"{cls.__name__}({input_size}, {hidden}, rngs=...)",
                               e) from None
        others = nnx.state(module, nnx.Not(nnx.Param))
        if jax.tree.leaves(others):  # their values would be the template's, abstract
            names = sorted({".".join(map(str, path)) for path, _ in nnx.to_flat_state(others)})
            raise ValueError(f"{spec!r} holds variables other than nnx.Param ({', '.join(names)})"
                             "; rnnjax steps a cell from its Param state alone: make them "
                             "Params, or constants of the class")
        return nnx.split(module)

    def build(input_size: int, key: jax.Array) -> Any:
        return cls(input_size, hidden, rngs=nnx.Rngs(key))

    def init(key: jax.Array, input_size: int) -> Any:
        template(input_size)  # a bad signature is reported as such
        return _str_keys(nnx.to_pure_dict(nnx.state(build(input_size, key), nnx.Param)))

    def module_of(params: Any, input_size: int) -> Any:
        graphdef, state = template(input_size)
        state = jax.tree.map(lambda a: a, state)  # a fresh copy to fill
        nnx.replace_by_pure_dict(state, _keys_like(params, nnx.to_pure_dict(state)))
        return nnx.merge(graphdef, state)

    def step(params: Any, carry: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        return _as_before(carry, *module_of(params, x.shape[-1])(carry, x), x)

    def initial_carry(batch: int, dtype: Any) -> Any:
        module = nnx.merge(*template(1))  # only its attributes are read
        return cast_floats(module.initialize_carry((batch, 1), nnx.Rngs(0)), dtype)

    template(1)  # a signature it does not take, or state it cannot keep: said here, at once
    try:
        jax.eval_shape(lambda: initial_carry(1, jnp.float32))
    except Exception as e:  # a user's cell may raise anything: one line
        raise ValueError(
            f"{spec!r}: its initialize_carry failed on the cell's shapes alone "
            f"({error_line(e)}); rnnjax's initial carry cannot read the cell's Params (a "
            "learned initial state): make it from input_shape alone") from None
    return Cell(init=init, step=step, initial_carry=initial_carry, hidden_size=hidden)
