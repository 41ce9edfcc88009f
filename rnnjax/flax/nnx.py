"""rnnjax as ``flax.nnx`` modules: :class:`RNN` (one recurrent layer) and :class:`Classifier`.

The same thin modules as :mod:`rnnjax.flax.linen`, in nnx's eager style: parameters are
``nnx.Param`` attributes named as the rnnjax cell names them (``kernel``,
``recurrent_kernel``, ``bias``), the computation is rnnjax's pure sequence functions::

    from flax import nnx
    from rnnjax.flax import nnx as rnn

    layer = rnn.RNN(cell="gru", in_features=28, hidden_size=64, rngs=nnx.Rngs(0))
    ys = layer(xs)                                  # [B, T, 28] -> [B, T, 64]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from flax import nnx

from rnnjax.cells import Carry, get_cell
from rnnjax.config import Config
from rnnjax.data.spec import DataSpec
from rnnjax.flax import layer
from rnnjax.flax import params as params_lib
from rnnjax.model import Model, make_model

_is_param = lambda x: isinstance(x, nnx.Variable)  # noqa: E731


def _params(tree: Any) -> Any:
    """``nnx.Param`` leaves around a pytree of arrays (a value of ``nnx.data``)."""
    return nnx.data(jax.tree.map(nnx.Param, tree))


def _values(tree: Any) -> Any:
    """The arrays inside a pytree of ``nnx.Param``."""
    return jax.tree.map(lambda p: p.get_value(), tree, is_leaf=_is_param)


class RNN(nnx.Module):
    """One recurrent layer over a sequence, any rnnjax cell by name.

    inputs ``[B, T, in_features]`` -> outputs ``[B, T, hidden_size]`` (``[T, B, ...]`` with
    ``time_major``); with ``return_carry``, ``(final carry, outputs)``. ``cell``: an rnnjax
    cell name, a registered one, or a Flax cell as ``MODULE:CLASS``; ``unroll``: ``lax.scan``
    unroll factor (0 or True: every step); ``chunks``: the sequence scanned in this many
    consecutive parts (``rnnjax.cells.scan_cell``); ``backward``: the backward pass's form,
    'auto' (the cell's own), 'hand_written', 'autodiff' or 'native'
    (``rnnjax.flax.layer.run``; forward-mode autodiff, ``jax.jvp``, needs 'autodiff');
    ``reverse``, ``keep_order``, ``return_carry``, ``time_major``: as ``flax.nnx.RNN``.
    """

    def __init__(
        self,
        cell: str,
        in_features: int,
        hidden_size: int,
        *,
        unroll: int | bool = 1,
        chunks: int = 1,
        backward: str = "auto",
        reverse: bool = False,
        keep_order: bool = False,
        return_carry: bool = False,
        time_major: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        self.cell = cell
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.unroll = unroll
        self.chunks = chunks
        self.backward = backward
        self.reverse = reverse
        self.keep_order = keep_order
        self.return_carry = return_carry
        self.time_major = time_major
        params = get_cell(cell, hidden_size).init(rngs.params(), in_features)
        layer.check_named(cell, params, "keep each entry of a dict of names as an nnx.Param")
        clash = sorted(set(params) & set(vars(self)))
        if clash:
            raise ValueError(f"cell {cell!r}: parameters {clash} clash with RNN attributes of "
                             "the same name; rename them in the cell's init")
        self.param_names = tuple(params)
        for name, value in params.items():
            setattr(self, name, _params(value))

    def cell_params(self) -> dict[str, Any]:
        """The parameters as the rnnjax cell takes them: a dict of arrays."""
        return {name: _values(getattr(self, name)) for name in self.param_names}

    def __call__(self, inputs: jax.Array, initial_carry: Carry | None = None, *,
                 seq_lengths: jax.Array | None = None, return_carry: bool | None = None,
                 time_major: bool | None = None, reverse: bool | None = None,
                 keep_order: bool | None = None, rngs: Any = None) -> Any:
        """``flax.nnx.RNN``'s call, so ``nnx.Bidirectional`` takes this layer: inputs float
        ``[B, T, F]``; ``initial_carry`` in the cell's layout (LSTM: ``(h, c)``);
        ``seq_lengths`` int ``[B]``, each sequence's steps before its padding
        (:func:`rnnjax.flax.layer.run`); ``return_carry``, ``time_major``, ``reverse`` and
        ``keep_order`` override the attributes for this call. ``rngs`` is unused: the
        initial carry is the cell's own (zeros; a Flax cell's drawn with key 0)."""
        del rngs
        return layer.call(self, get_cell(self.cell, self.hidden_size), self.cell_params(),
                          inputs, initial_carry, seq_lengths, return_carry=return_carry,
                          time_major=time_major, reverse=reverse, keep_order=keep_order)


class Classifier(nnx.Module):
    """The rnnjax classifier ``config`` describes (default: the seed model) as an nnx module.

    images float32 ``[B, 28, 28]`` (``[B, H, W(, C)]`` of ``spec``) in [0, 1] -> logits
    float32 ``[B, classes]``, computed by :meth:`rnnjax.model.Model.apply`. Attributes
    ``rnn_0``, ``rnn_1``, ... (each a dict of ``nnx.Param``) and ``head``;
    :func:`from_checkpoint` loads a run of ``rnnjax train``. ``spec``: the images and
    classes (default: MNIST's 28x28x1, ``config.num_classes`` or 10).
    """

    def __init__(self, config: Config = Config(), spec: DataSpec | None = None,  # noqa: B008
                 *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.spec = spec
        self.load_params(self.model().init(rngs.params()))

    def model(self) -> Model:
        """The rnnjax model this module computes."""
        return make_model(self.config, self.spec)

    def load_params(self, params: Any) -> None:
        """Replace the parameters with rnnjax classifier ``params`` (``Model.init``'s tree)."""
        flat = params_lib.classifier_to_flax(params)["params"]
        self.param_names = tuple(flat)
        for name, value in flat.items():
            setattr(self, name, _params(value))

    def rnnjax_params(self) -> Any:
        """The parameters as rnnjax keeps them: ``{"rnn": [...], "head": {...}}``."""
        flat = {name: _values(getattr(self, name)) for name in self.param_names}
        return params_lib.classifier_from_flax(flat)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.model().apply(self.rnnjax_params(), images)


def from_checkpoint(path: Path | str) -> Classifier:
    """The :class:`Classifier` of a checkpoint written by ``rnnjax train`` (a step directory,
    or a workdir: its latest), its parameters loaded."""
    from rnnjax import inference

    loaded = inference.load(path)
    module = Classifier(loaded.config, loaded.spec, rngs=nnx.Rngs(0))
    module.load_params(loaded.state.params)
    return module
