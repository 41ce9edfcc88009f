"""A cell of one's own, written as the README's "How to extend" writes it, for the tests of
cells registered in Python: the registry, the CLI's checks, the tuner's children (which
import it from a copy of this file beside a script: it imports nothing from the tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cells import Cell


def with_parts(step: Callable[..., Any] | None = None, init: Callable[..., Any] | None = None,
               carry: Callable[..., Any] | None = None) -> Callable[[int], Cell]:
    """The cell function (``hidden -> Cell``) of the README's Elman cell, the parts given
    replaced: ``init(key, input_size)``, ``step(params, h, x)``, ``carry(batch, dtype)``."""
    def cell(hidden: int) -> Cell:
        def default_init(key: jax.Array, input_size: int) -> dict[str, jax.Array]:
            return {"w": jax.random.normal(key, (input_size + hidden, hidden)) * 0.1}

        def default_step(params: dict[str, jax.Array], h: jax.Array, x: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
            h = jnp.tanh(jnp.concatenate([x, h], axis=-1) @ params["w"])
            return h, h

        def default_carry(batch: int, dtype: Any) -> jax.Array:
            return jnp.zeros((batch, hidden), dtype)

        return Cell(init=init or default_init, step=step or default_step, hidden_size=hidden,
                    initial_carry=carry or default_carry)
    return cell


def elman(hidden: int) -> Cell:
    """The README's cell itself (a function at a module's top level, as the tuner's
    children can import it: ``rnnjax.cells.source``)."""
    return with_parts()(hidden)
