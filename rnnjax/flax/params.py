"""rnnjax parameters <-> Flax variables (pure functions over pytrees of arrays).

**The classifier.** rnnjax keeps ``{"rnn": [layer, ...], "head": {"kernel", "bias"}}``; its
Flax modules keep ``{"params": {"rnn_0": layer, "rnn_1": ..., "head": {...}}}`` (a layer is
the cell's dict, or ``{"fwd": ..., "bwd": ...}`` when bidirectional).

**Flax's own cells**, for moving weights between an rnnjax cell and the same equations in
Flax (rnnjax keeps Keras' layout: one input kernel, one recurrent kernel, gate blocks side
by side):

=================  ==========================================  ===============================
rnnjax cell        Flax cell                                   mapping
=================  ==========================================  ===============================
``simple_rnn``     ``SimpleCell``                              kernel -> ``i``, bias -> ``i``,
                                                               recurrent_kernel -> ``h``
``lstm``           ``LSTMCell``, ``OptimizedLSTMCell``         gate blocks i, f, c(=g), o in
                                                               both; Flax puts the bias on the
                                                               hidden-side dense (``h*``)
``gru``            ``GRUCell``                                 rnnjax (Keras) blocks z, r, h;
                                                               Flax r, z, n
=================  ==========================================  ===============================

What differs besides names: Flax's LSTM carry is ``(c, h)``, rnnjax's ``(h, c)``; Flax
initialises kernels lecun-normal and the forget bias to 0, rnnjax as Keras (glorot-uniform,
forget bias 1). The GRUs share their equations (Keras ``reset_after=True`` is Flax's
``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``) but not their biases: Keras keeps an
input and a recurrent bias per gate, Flax one per gate for z and r, so rnnjax -> Flax adds
the two (exact in function, not invertible) and Flax -> rnnjax puts the sum in ``bias``
with a zero recurrent bias for z and r. ``flax.nnx.GRUCell`` has no candidate bias
``b_hn`` at all: an rnnjax GRU maps onto it only while that block of ``recurrent_bias`` is 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = Any

HEAD = "head"


def classifier_to_flax(params: Params) -> dict[str, Any]:
    """rnnjax classifier params -> Flax variables ``{"params": {"rnn_0": ..., "head": ...}}``."""
    flat = {f"rnn_{i}": layer for i, layer in enumerate(params["rnn"])}
    return {"params": {**flat, HEAD: params[HEAD]}}


def classifier_from_flax(variables: dict[str, Any]) -> Params:
    """Inverse of :func:`classifier_to_flax` (takes ``{"params": ...}`` or the params alone)."""
    flat = dict(variables.get("params", variables))
    if HEAD not in flat:
        raise ValueError(f"Flax variables without a {HEAD!r} entry are not an rnnjax classifier; "
                         f"got keys {sorted(flat)}")
    head = flat.pop(HEAD)
    names = sorted(flat, key=_layer_index)
    if names != [f"rnn_{i}" for i in range(len(names))]:
        raise ValueError(f"expected layers rnn_0 .. rnn_{len(names) - 1}, got {sorted(flat)}")
    return {"rnn": [flat[name] for name in names], HEAD: head}


def _layer_index(name: str) -> int:
    prefix, _, index = name.partition("_")
    if prefix != "rnn" or not index.isdigit():
        raise ValueError(f"unexpected entry {name!r} in an rnnjax classifier's Flax variables")
    return int(index)


# --- Flax's own cells ----------------------------------------------------------------------

LSTM_GATES = ("i", "f", "g", "o")  # Keras' i, f, c, o: the same blocks, in the same order
MAPPED = {("simple_rnn", "SimpleCell"), ("lstm", "LSTMCell"), ("lstm", "OptimizedLSTMCell"),
          ("gru", "GRUCell")}


def _blocks(a: Any, n: int) -> list[Any]:
    return jnp.split(jnp.asarray(a), n, axis=-1)


def _nonzero(array: Any) -> bool:
    """Whether ``array`` holds a non-zero value; False where its values are not known
    (traced under jit: checked where they are)."""
    try:
        return bool(np.any(np.asarray(array) != 0))
    except jax.errors.TracerArrayConversionError:
        return False


def _check_api(api: str) -> None:
    """A ValueError unless ``api`` is one the conversions know (anything else had been read
    as linen, whose names nnx's cells do not all share)."""
    if api not in ("linen", "nnx"):
        raise ValueError(f"api {api!r}: give 'linen' or 'nnx' (Flax's module API whose cell "
                         "the params are for)")


def to_flax_cell(cell: str, params: Params, flax_cell: str, api: str = "linen") -> Params:
    """The params of Flax cell ``flax_cell`` (``SimpleCell``, ``LSTMCell``,
    ``OptimizedLSTMCell``, ``GRUCell``; ``api`` linen or nnx) computing what the rnnjax
    ``cell`` computes with ``params``. nnx params come as a pure dict
    (``nnx.replace_by_pure_dict``)."""
    _check_api(api)
    pair = (cell, flax_cell)
    if pair not in MAPPED:
        raise ValueError(f"no mapping from rnnjax {cell!r} to flax.{api}.{flax_cell}; "
                         f"mapped: {sorted(MAPPED)}")
    k, u, b = params["kernel"], params["recurrent_kernel"], params["bias"]
    if pair == ("simple_rnn", "SimpleCell"):
        names = ("i", "h") if api == "linen" else ("dense_i", "dense_h")
        return {names[0]: {"kernel": k, "bias": b}, names[1]: {"kernel": u}}
    if cell == "lstm" and flax_cell == "OptimizedLSTMCell" and api == "nnx":
        return {"dense_i": {"kernel": k}, "dense_h": {"kernel": u, "bias": b}}
    if cell == "lstm" and flax_cell in ("LSTMCell", "OptimizedLSTMCell"):
        out = {}
        for gate, kg, ug, bg in zip(LSTM_GATES, _blocks(k, 4), _blocks(u, 4), _blocks(b, 4),
                                    strict=True):
            in_name = "if_" if (gate == "f" and api == "nnx") else f"i{gate}"
            out[in_name] = {"kernel": kg}
            out[f"h{gate}"] = {"kernel": ug, "bias": bg}
        return out
    if pair == ("gru", "GRUCell"):
        (kz, kr, kh), (uz, ur, uh) = _blocks(k, 3), _blocks(u, 3)
        (bz, br, bh), (rz, rr, rh) = _blocks(b, 3), _blocks(params["recurrent_bias"], 3)
        if api == "nnx":
            if _nonzero(rh):
                raise ValueError("flax.nnx.GRUCell has no recurrent bias on the candidate "
                                 "(b_hn): this GRU's recurrent_bias[2H:] is not zero")
            return {"dense_i": {"kernel": jnp.concatenate([kr, kz, kh], -1),
                                "bias": jnp.concatenate([br + rr, bz + rz, bh], -1)},
                    "dense_h": {"kernel": jnp.concatenate([ur, uz, uh], -1)}}
        return {"ir": {"kernel": kr, "bias": br + rr}, "iz": {"kernel": kz, "bias": bz + rz},
                "in": {"kernel": kh, "bias": bh}, "hr": {"kernel": ur}, "hz": {"kernel": uz},
                "hn": {"kernel": uh, "bias": rh}}
    raise AssertionError(pair)


def from_flax_cell(cell: str, flax_params: Params, flax_cell: str, api: str = "linen") -> Params:
    """Inverse of :func:`to_flax_cell`: the rnnjax ``cell`` params computing what the Flax cell
    computes (for the GRU: Flax's gate biases become rnnjax ``bias``, recurrent bias 0 for
    z and r)."""
    _check_api(api)
    if (cell, flax_cell) not in MAPPED:
        raise ValueError(f"no mapping from flax.{api}.{flax_cell} to rnnjax {cell!r}; "
                         f"mapped: {sorted(MAPPED)}")
    p = flax_params
    if (cell, flax_cell) == ("simple_rnn", "SimpleCell"):
        i, h = (p["i"], p["h"]) if api == "linen" else (p["dense_i"], p["dense_h"])
        return {"kernel": i["kernel"], "recurrent_kernel": h["kernel"], "bias": i["bias"]}
    if cell == "lstm" and flax_cell == "OptimizedLSTMCell" and api == "nnx":
        return {"kernel": p["dense_i"]["kernel"], "recurrent_kernel": p["dense_h"]["kernel"],
                "bias": p["dense_h"]["bias"]}
    if cell == "lstm" and flax_cell in ("LSTMCell", "OptimizedLSTMCell"):
        ins = [p["if_" if (g == "f" and api == "nnx") else f"i{g}"] for g in LSTM_GATES]
        hs = [p[f"h{g}"] for g in LSTM_GATES]
        return {"kernel": jnp.concatenate([d["kernel"] for d in ins], -1),
                "recurrent_kernel": jnp.concatenate([d["kernel"] for d in hs], -1),
                "bias": jnp.concatenate([d["bias"] for d in hs], -1)}
    if (cell, flax_cell) == ("gru", "GRUCell"):
        if api == "nnx":
            (kr, kz, kh), (ur, uz, uh) = (_blocks(p["dense_i"]["kernel"], 3),
                                          _blocks(p["dense_h"]["kernel"], 3))
            br, bz, bh = _blocks(p["dense_i"]["bias"], 3)
            rh = jnp.zeros_like(bh)
        else:
            kr, kz, kh = p["ir"]["kernel"], p["iz"]["kernel"], p["in"]["kernel"]
            ur, uz, uh = p["hr"]["kernel"], p["hz"]["kernel"], p["hn"]["kernel"]
            br, bz, bh, rh = p["ir"]["bias"], p["iz"]["bias"], p["in"]["bias"], p["hn"]["bias"]
        zero = jnp.zeros_like(bh)
        return {"kernel": jnp.concatenate([kz, kr, kh], -1),
                "recurrent_kernel": jnp.concatenate([uz, ur, uh], -1),
                "bias": jnp.concatenate([bz, br, bh], -1),
                "recurrent_bias": jnp.concatenate([zero, zero, rh], -1)}
    raise AssertionError((cell, flax_cell))
