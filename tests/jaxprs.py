"""Walking a jaxpr: every equation, those of the jaxprs nested in it included (a nested
jit's, a loop's body, a Pallas call's kernel where asked)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def equations(jaxpr: Any, into_kernels: bool = False,
              into_loops: bool = True) -> Iterator[Any]:
    """The equations of ``jaxpr`` (a ``jax.extend.core.Jaxpr``) and of those nested in it (a
    Pallas call's kernel only ``into_kernels``; a loop's body, ``scan`` or ``while``, only
    ``into_loops``), each before those nested in it."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call" and not into_kernels:
            continue
        if eqn.primitive.name in ("scan", "while") and not into_loops:
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "consts") and hasattr(sub, "jaxpr"):  # closed
                    yield from equations(sub.jaxpr, into_kernels, into_loops)
                elif hasattr(sub, "eqns"):
                    yield from equations(sub, into_kernels, into_loops)


def primitives(jaxpr: Any) -> list[str]:
    """The primitives of ``jaxpr`` and of those nested in it, but a Pallas call's kernel."""
    return [eqn.primitive.name for eqn in equations(jaxpr)]
