"""rnnjax as ``flax.linen`` modules: :class:`RNN` (one recurrent layer) and :class:`Classifier`.

Both are thin: they declare the parameters (the leaf names and Keras initialisers of the
rnnjax cell) and call rnnjax's pure sequence functions, so a linen model gets rnnjax's
hand-written backward passes (simple_rnn's, irnn's and lstm's: each cell's default form)::

    import flax.linen as nn
    from rnnjax.flax import linen as rnn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):                      # [B, 28, 28]
            h = rnn.RNN(cell="lstm", hidden_size=64)(x)
            return nn.Dense(10)(h[:, -1])
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from rnnjax.cells import Carry, get_cell
from rnnjax.config import Config
from rnnjax.data.spec import DataSpec
from rnnjax.flax import layer
from rnnjax.flax import params as params_lib
from rnnjax.model import make_model


class RNN(nn.Module):
    """One recurrent layer over a sequence, any rnnjax cell by name.

    inputs ``[B, T, F]`` -> outputs ``[B, T, hidden_size]`` (``[T, B, ...]`` with
    ``time_major``); with ``return_carry``, ``(final carry, outputs)``. Parameters: the
    cell's, e.g. ``kernel [F, H]``, ``recurrent_kernel [H, H]``, ``bias [H]`` for
    ``simple_rnn`` (glorot-uniform, orthogonal, zeros, as Keras).

    Attributes:
      cell: an rnnjax cell name (``simple_rnn``, ``irnn``, ``lstm``, ``gru``, a cell
        registered in ``rnnjax.cells.CELLS``, or a Flax cell as ``MODULE:CLASS``).
      hidden_size: units.
      unroll: ``lax.scan`` unroll factor; 0 or True unrolls every step.
      chunks: the sequence scanned in this many consecutive parts (``rnnjax.cells.scan_cell``).
      backward: the backward pass's form, 'auto' (the cell's own), 'hand_written',
        'autodiff' or 'native' (``rnnjax.flax.layer.run``); forward-mode autodiff
        (``jax.jvp``, ``jax.jacfwd``) needs 'autodiff'.
      reverse, keep_order, return_carry, time_major: as ``flax.linen.RNN``.
    """

    cell: str
    hidden_size: int
    unroll: int | bool = 1
    chunks: int = 1
    backward: str = "auto"
    reverse: bool = False
    keep_order: bool = False
    return_carry: bool = False
    time_major: bool = False

    @nn.compact
    def __call__(self, inputs: jax.Array, initial_carry: Carry | None = None, *,
                 init_key: jax.Array | None = None, seq_lengths: jax.Array | None = None,
                 return_carry: bool | None = None, time_major: bool | None = None,
                 reverse: bool | None = None, keep_order: bool | None = None) -> Any:
        """``flax.linen.RNN``'s call, so ``nn.Bidirectional`` takes this layer: inputs float
        ``[B, T, F]``; ``initial_carry`` in the cell's layout (LSTM: ``(h, c)``);
        ``seq_lengths`` int ``[B]``, each sequence's steps before its padding
        (:func:`rnnjax.flax.layer.run`); ``return_carry``, ``time_major``, ``reverse`` and
        ``keep_order`` override the attributes for this call. ``init_key`` is unused: the
        initial carry is the cell's own (zeros; a Flax cell's drawn with key 0, Flax's
        default)."""
        del init_key
        cell = get_cell(self.cell, self.hidden_size)
        params = _declare(self, lambda key: cell.init(key, inputs.shape[-1]))
        return layer.call(self, cell, params, inputs, initial_carry, seq_lengths,
                          return_carry=return_carry, time_major=time_major, reverse=reverse,
                          keep_order=keep_order)


class Classifier(nn.Module):
    """The rnnjax classifier ``config`` describes (default: the seed model) as a linen module.

    images float32 ``[B, 28, 28]`` (``[B, H, W(, C)]`` of ``spec``) in [0, 1] -> logits
    float32 ``[B, classes]``, computed by :meth:`rnnjax.model.Model.apply` itself.
    Parameters ``{"rnn_0": layer, ..., "head": {"kernel", "bias"}}``; :func:`from_checkpoint`
    loads a run trained by ``rnnjax train``. ``spec``: the images and classes (default:
    MNIST's 28x28x1, ``config.num_classes`` or 10).
    """

    config: Config = Config()
    spec: DataSpec | None = None

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        model = make_model(self.config, self.spec)
        declared = _declare(self, lambda key: params_lib.classifier_to_flax(
            model.init(key))["params"])
        return model.apply(params_lib.classifier_from_flax(declared), images)


def _declare(module: nn.Module, init: Callable[[jax.Array], dict[str, Any]]) -> dict[str, Any]:
    """Each entry of the dict ``init(key)`` returns as a param of ``module``, by its name
    (the names from ``jax.eval_shape``; each entry initialised from its own key)."""
    names = jax.eval_shape(init, jax.random.key(0))
    layer.check_named(getattr(module, "cell", "?"), names,
                      "declare each entry of a dict of names as a Flax param")
    return {name: module.param(name, lambda key, name=name: init(key)[name]) for name in names}


def from_checkpoint(path: Path | str) -> tuple[Classifier, dict[str, Any]]:
    """``(module, variables)`` of a checkpoint written by ``rnnjax train`` (a step directory,
    or a workdir: its latest), ready for ``module.apply(variables, images)``."""
    from rnnjax import inference

    loaded = inference.load(path)
    return (Classifier(loaded.config, loaded.spec),
            params_lib.classifier_to_flax(loaded.state.params))
