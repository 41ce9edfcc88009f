"""Shared fixtures: the real embedded MNIST, and small configs that train in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # the Keras oracle runs on JAX
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# rnnjax train tunes the first run of a shape (rnnjax.tune), tens of seconds: not in the
# suite, where only the tests about tuning turn it on (CLI subprocesses inherit this).
os.environ.setdefault("RNNJAX_TUNE", "off")

import pytest

from rnnjax.config import Config
from rnnjax.data.idx import Arrays
from rnnjax.data.sources import EMBEDDED_MNIST, MNIST_MD5


@pytest.fixture(scope="session")
def mnist() -> Arrays:
    """The full embedded MNIST, verified (uint8 images, int32 labels)."""
    from rnnjax.data.idx import load_idx_dir

    return load_idx_dir(EMBEDDED_MNIST, MNIST_MD5)


@pytest.fixture
def tiny_config() -> Config:
    """A seed-shaped run small enough for unit tests."""
    return Config(steps=5, eval_every=2, batch_size=8, hidden_size=16, eval_batch_size=2048)
