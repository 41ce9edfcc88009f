"""Determinism on CPU: a seed fixes a run bit for bit; another seed gives another run.

For both feeds (the dataset on the device, K steps per call; batches streamed from the
host) and both batch orders (in order, seeded reshuffle every epoch): two runs of the same
config give bitwise-identical parameters, optimizer state and metrics history.
"""

from __future__ import annotations

import functools
import io

import jax
import numpy as np
import pytest

from rnnjax.config import Config
from rnnjax.loop import RunResult, train_and_evaluate

BASE = Config(steps=30, eval_every=10, hidden_size=16)
SEED = BASE.seed
FEEDS = ["device", "stream"]
SHUFFLE = [False, True]


def run(feed: str, shuffle: bool, seed: int) -> RunResult:
    out = io.StringIO()
    result = train_and_evaluate(BASE.replace(feed=feed, shuffle=shuffle, seed=seed), out=out)
    result.log = out.getvalue()  # type: ignore[attr-defined]
    return result


@functools.cache
def first_run(feed: str, shuffle: bool, seed: int) -> RunResult:
    """One run per setting, shared by the tests (each test makes its own second run)."""
    return run(feed, shuffle, seed)


def metrics(result: RunResult) -> list[dict]:
    """The history without its wall-clock times (the only thing allowed to vary)."""
    return [{k: v for k, v in record.items() if k != "wall_s"} for record in result.history]


def leaves(result: RunResult) -> list[tuple[str, np.ndarray]]:
    """Every leaf of the final train state (step, parameters, optimizer state) on the host."""
    flat, _ = jax.tree_util.tree_flatten_with_path(result.state)
    return [(jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf in flat]


def eval_lines(result: RunResult) -> list[str]:
    return [line for line in result.log.splitlines() if line.startswith("step ")]


@pytest.mark.parametrize("shuffle", SHUFFLE, ids=["in_order", "shuffled"])
@pytest.mark.parametrize("feed", FEEDS)
def test_same_seed_is_bitwise_identical(feed, shuffle):
    a, b = first_run(feed, shuffle, SEED), run(feed, shuffle, SEED)
    assert metrics(a) == metrics(b)
    assert [r["step"] for r in metrics(a)] == [0, 10, 20, 29]
    assert eval_lines(a) == eval_lines(b) and len(eval_lines(a)) == 4
    la, lb = leaves(a), leaves(b)
    assert [name for name, _ in la] == [name for name, _ in lb] and len(la) > 3
    for (name, x), (_, y) in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), name
        assert x.tobytes() == y.tobytes(), name  # bitwise: -0.0 vs 0.0, NaN payloads
    assert int(a.state.step) == BASE.steps
    assert a.summary["final_test_loss"] == b.summary["final_test_loss"]


@pytest.mark.parametrize("shuffle", SHUFFLE, ids=["in_order", "shuffled"])
@pytest.mark.parametrize("feed", FEEDS)
def test_different_seeds_differ(feed, shuffle):
    a, b = first_run(feed, shuffle, SEED), run(feed, shuffle, SEED + 1)
    assert metrics(a) != metrics(b)
    assert a.history[0]["test_loss"] != b.history[0]["test_loss"]  # from the first step on
    params_a = jax.tree.leaves(a.state.params)
    params_b = jax.tree.leaves(b.state.params)
    assert all(not np.array_equal(x, y) for x, y in zip(params_a, params_b, strict=True)
               if np.asarray(x).size > 1 and np.asarray(x).any())


def test_shuffle_changes_the_run():
    """The shuffled order is another run than the in-order walk, for the same seed."""
    a, b = first_run("device", False, SEED), first_run("device", True, SEED)
    assert metrics(a) != metrics(b)
    assert not np.array_equal(a.state.params["head"]["kernel"], b.state.params["head"]["kernel"])
