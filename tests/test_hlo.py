"""Ops per time step, read from the compiled program: the counter, and each cell's budget.

Every op left in a compiled loop body runs once per time step (a thunk on XLA:CPU, a kernel
on a GPU); at small batches their count bounds the step. The budgets are the counts the
cells reach on XLA:CPU (jax 0.10): a change that adds ops to a loop body fails here.
Before the op-count work (issue 11): SimpleRNN 5/5, LSTM 13/13, GRU 18/16; the GRU's
hand-written backward (``cells.gru(hidden, backward="hand_written")``) reaches 9/6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks.throughput import step_ops
from rnnjax import cells, hlo
from rnnjax.config import Config

# cell: (forward, backward) ops per time step, train step at batch 50, rows, unroll 1.
BUDGETS = {"simple_rnn": (5, 5), "irnn": (5, 5), "lstm": (13, 13), "gru": (17, 16),
           "gru_hand_written": (9, 6)}


def test_counter_reads_forward_and_backward_loops():
    """A scan with a known body: the counter finds both loops, tells them apart, and
    divides an unrolled body by its steps per iteration."""
    cpu = jax.devices("cpu")[0]

    def loss(w, xs, unroll):
        def step(h, x):
            h = jnp.tanh(h @ w + x)
            return h, h

        return jax.lax.scan(step, jnp.zeros((4, 8)), xs, unroll=unroll)[1].sum()

    w, xs = jnp.ones((8, 8)), jnp.ones((12, 4, 8))
    with jax.default_device(cpu):
        one = jax.jit(jax.grad(loss), static_argnums=2).lower(w, xs, 1).compile().as_text()
        three = jax.jit(jax.grad(loss), static_argnums=2).lower(w, xs, 3).compile().as_text()
    loops = hlo.loop_ops(one)
    assert sorted(loop.backward for loop in loops) == [False, True]
    assert all(loop.trip_count == 12 and loop.innermost for loop in loops)
    assert all("fusion" in loop.ops or "dot" in loop.ops for loop in loops)
    counts = hlo.ops_per_step(one, 12)
    assert counts["forward"] == len(next(x for x in loops if not x.backward).ops) >= 3
    assert counts["backward"] >= 3
    # Unrolled by 3: 4 iterations of 3 steps; per step no more than at unroll 1.
    assert {loop.trip_count for loop in hlo.loop_ops(three)} == {4}
    unrolled = hlo.ops_per_step(three, 12)
    assert 0 < unrolled["forward"] <= counts["forward"]
    # A loop whose trip count does not divide the sequence is not a loop over time.
    assert hlo.ops_per_step(one, 7) == {"forward": 0.0, "backward": 0.0}


@pytest.mark.parametrize("cell", sorted(BUDGETS))
def test_ops_per_time_step_within_budget(cell):
    config = Config(cell=cell.removesuffix("_hand_written"))
    variant = cells.gru(config.hidden_size, backward="hand_written") if "hand" in cell else None
    counts = step_ops(config, jax.devices("cpu")[0], variant)
    forward, backward = BUDGETS[cell]
    assert 0 < counts["forward"] <= forward, counts
    assert 0 < counts["backward"] <= backward, counts
