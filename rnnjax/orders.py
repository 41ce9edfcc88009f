"""Sequence orders: how an image ``[H, W, C]`` is read as T time steps of F features
(``--order``, ``Config.order``).

rnnjax's own (:data:`BUILT_IN`, ``rnnjax.model.to_sequence``): ``rows``, T = H steps of
F = W*C (a row of pixels, channels interleaved); ``pixels``, T = H*W steps of F = C (one
pixel, all channels); ``permuted``, the pixels in a fixed order drawn from ``--seed``.

One of your own is a function registered in :data:`ORDERS` under a new name:
``(height, width, channels) -> int [T, F]``, the positions each step reads, in the order
of its features, in the image flattened row-major (``image.reshape(-1)``, position
``(h * W + w) * C + c``). Any reading that gathers pixels is one (columns, the rows last
first, a spiral, patches)::

    import numpy as np
    from rnnjax.orders import ORDERS

    def columns(height, width, channels):  # W steps of H*C: the image left to right
        grid = np.arange(height * width * channels).reshape(height, width, channels)
        return grid.transpose(1, 0, 2).reshape(width, height * channels)

    ORDERS["columns"] = columns  # now --order columns, Config(order="columns")

The model gathers each batch's sequences by those positions (``rnnjax.model.to_sequence``);
everything after reads sequences ``[T, B, F]`` whatever the order. As for a cell
(``rnnjax.cells.CELLS``), the tuner's child processes import the function from its module,
so define it with ``def`` at the top level of a module your script imports.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rnnjax import registry
from rnnjax.config import ORDERS as BUILT_IN
from rnnjax.config import ConfigError, error_line

Order = Callable[[int, int, int], np.ndarray]

# The orders registered in Python (a new name each; rnnjax's own are BUILT_IN), and how
# the tuner's children find each again (``rnnjax.registry``).
ORDERS: dict[str, Order] = {}
REGISTRY = registry.Registry(ORDERS, {}, "--order")


def _unknown(order: str) -> str:
    """The refusal of an ``order`` neither rnnjax's nor registered."""
    return (f"unknown --order {order!r}; choose {', '.join(BUILT_IN)}, or one registered "
            "in rnnjax.orders.ORDERS (a function (height, width, channels) -> int [T, F]: "
            "README, \"How to extend\")")


def shape(order: str, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """``(T, F)``: the time steps and features a step of an image of ``image_shape``
    ``(H, W, C)`` read in ``order``; ConfigError naming the fix for an order that is not
    known (:func:`positions`)."""
    h, w, c = image_shape
    if order in BUILT_IN and order in ORDERS:  # registered over rnnjax's own: never read
        raise _own(order)
    if order == "rows":
        return h, w * c
    if order in BUILT_IN:
        return h * w, c
    steps, features = positions(order, image_shape).shape
    return steps, features


def positions(order: str, image_shape: tuple[int, int, int]) -> np.ndarray:
    """int32 ``[T, F]``: the flat positions each step of a registered ``order`` reads in an
    image of ``image_shape`` ``(H, W, C)``; ConfigError naming the fix for a name rnnjax
    keeps for its own, one not registered, or a function that does not return integers
    ``[T, F]`` in ``[0, H*W*C)``."""
    if order in BUILT_IN:
        raise _own(order)
    function = ORDERS.get(order)
    if function is None:
        raise ConfigError(_unknown(order))
    h, w, c = image_shape
    where = f"--order {order}: its function, on {h}x{w}x{c} images,"
    import jax  # (here: the command line reads the orders before it starts JAX)

    try:  # concrete values even where rnnjax traces a model (jnp.arange in the function)
        with jax.ensure_compile_time_eval():
            found = np.asarray(function(h, w, c))
    except Exception as e:  # the user's code: any error, named in one line
        raise ConfigError(f"{where} fails ({error_line(e)})") from None
    if found.ndim != 2 or 0 in found.shape or not np.issubdtype(found.dtype, np.integer):
        raise ConfigError(f"{where} returns {found.dtype} {list(found.shape)}, not integer "
                          "positions [T, F] (the pixels each step reads, of the image "
                          "flattened)")
    low, high = int(found.min()), int(found.max())
    if low < 0 or high >= h * w * c:
        raise ConfigError(f"{where} returns positions {low} to {high}, outside the image's "
                          f"0 to {h * w * c - 1} (H*W*C values, flattened row-major)")
    return found.astype(np.int32)


def _own(order: str) -> ConfigError:
    """The refusal of an order registered under a name of rnnjax's own."""
    return ConfigError(f"--order {order}: a name of rnnjax's own orders, which "
                       "rnnjax.model.to_sequence reads; register yours in "
                       "rnnjax.orders.ORDERS under another name")
