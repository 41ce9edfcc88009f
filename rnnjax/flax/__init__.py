"""rnnjax in the Flax world.

* :mod:`rnnjax.flax.linen` and :mod:`rnnjax.flax.nnx`: ``RNN``, one recurrent layer for every
  rnnjax cell (batch-major ``[B, T, F] -> [B, T, H]`` like Flax's own ``RNN``), and
  ``Classifier``, the seed model as a module; both run rnnjax's sequence functions in each
  cell's default form (the hand-written backward passes of simple_rnn, irnn and lstm;
  autodiff for gru), not a second copy of them.
* :mod:`rnnjax.flax.params`: rnnjax parameters <-> Flax variables, for the classifier and for
  Flax's own ``SimpleCell``, ``LSTMCell``, ``OptimizedLSTMCell`` and ``GRUCell``.
* :mod:`rnnjax.flax.cells`: any Flax cell class (linen or nnx), named ``MODULE:CLASS``, as an
  rnnjax :class:`~rnnjax.cells.Cell`, so ``rnnjax train --cell flax.linen:GRUCell`` trains it.

Flax is imported by these modules only; the rest of rnnjax does not need it.
"""
