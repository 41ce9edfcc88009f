"""Shared fixtures: the real embedded MNIST, small configs that train in seconds, XLA's
compilations counted, bitwise comparison of pytrees, test inputs drawn by numpy, and a
compilation cache for each test process, temporary files under pytest's own root; and CI's
rule on skips.

CI (``.ci/run``) sets ``RNNJAX_REQUIRE_EXTRAS=1`` after the README's test install: there a
skipped test is a failure (a test extra that did not install, ``pytest.importorskip``),
except the skips that need a non-root user (their reason starts with ``running as root``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

os.environ.setdefault("KERAS_BACKEND", "jax")  # the Keras oracle runs on JAX
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# rnnjax train tunes the first run of a shape (rnnjax.tune), tens of seconds: not in the
# suite, where only the tests about tuning turn it on (CLI subprocesses inherit this).
os.environ.setdefault("RNNJAX_TUNE", "off")

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from rnnjax.config import Config
from rnnjax.data.idx import Arrays
from rnnjax.data.sources import EMBEDDED_MNIST, MNIST_MD5

REQUIRE_EXTRAS = "RNNJAX_REQUIRE_EXTRAS"
ROOT_SKIP = "running as root"  # the reason of every skip that only a non-root user avoids
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """With ``RNNJAX_REQUIRE_EXTRAS=1``, a skip other than a root one fails the test."""
    report = yield
    if report.skipped and os.environ.get(REQUIRE_EXTRAS) == "1" and not hasattr(report,
                                                                                 "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        as_root = os.geteuid() == 0 and reason.removeprefix("Skipped: ").startswith(ROOT_SKIP)
        if not as_root:
            report.outcome = "failed"
            report.longrepr = (f"{REQUIRE_EXTRAS}=1 (CI, after pip install -e '.[test]'): "
                               f"this test may not skip: {reason}")
    return report


@pytest.fixture(scope="session", autouse=True)
def _temporaries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The temporary files of this test process (``tempfile``'s) and of the child processes
    its tests start (``TMPDIR``) go under pytest's temporary root of the run, which pytest
    prunes, not into /tmp: a child a test kills midway (``kill -9`` while it builds the
    native kernels) cannot remove its own."""
    path = tmp_path_factory.getbasetemp() / "tmp"
    path.mkdir(exist_ok=True)
    saved, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = str(path)
    yield
    tempfile.tempdir = saved
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env


@pytest.fixture(scope="session")
def worker_compile_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A persistent compilation cache of this test process's own (an xdist worker's), empty
    at its start, under pytest's temporary root of the run (which pytest prunes). Not
    shared between workers: JAX writes an entry in place, unlocked, so another process could
    read it half-written."""
    path = tmp_path_factory.getbasetemp() / "jax-compile-cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(autouse=True)
def _compile_cache(worker_compile_cache: str) -> None:
    """Every test compiles through its process's cache, unless it sets its own (a run's
    ``--compile-cache``, which holds until the next test): in-process XLA compiles are half
    the suite's time, and many are a program another test compiled already (a model built
    and jitted afresh); a hit is the same executable. CLI subprocesses keep their own
    setting (this is no environment variable); ``xla_compiles`` counts a hit, as before.
    (Four test files, in turns: 329 and 306 s without, 296 and 266 s with, 2026-12-06.)"""
    import jax

    from rnnjax import runtime

    if not str(jax.config.jax_compilation_cache_dir).startswith(worker_compile_cache):
        runtime.enable_compile_cache(worker_compile_cache)  # (its cpus-N/ under it)


def normal(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """Standard normal test inputs times ``scale``, float32 ``shape``, drawn by numpy:
    ``jax.random`` compiles a program for every shape it draws (0.2-0.4 s each on a 2-vCPU
    machine, and inside a jitted function the same again in each program)."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture(scope="session")
def mnist() -> Arrays:
    """The full embedded MNIST, verified (uint8 images, int32 labels)."""
    from rnnjax.data.idx import load_idx_dir

    return load_idx_dir(EMBEDDED_MNIST, MNIST_MD5)


@pytest.fixture
def tiny_config() -> Config:
    """A seed-shaped run small enough for unit tests."""
    return Config(steps=5, eval_every=2, batch_size=8, hidden_size=16, eval_batch_size=2048)


@pytest.fixture
def xla_compiles() -> Iterator[list[str]]:
    """The names of the programs XLA compiles while the test runs, in order.

    Counted from JAX's backend-compile event, which every compilation of a jitted
    function fires (a persistent-cache hit too), not from Python traces: one trace can
    compile twice (e.g. for an argument committed to a device, then not).
    """
    import jax

    names: list[str] = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            names.append(str(kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def assert_bitwise_equal(a: Any, b: Any) -> None:
    """Two pytrees of the same structure whose leaves have the same dtype, shape and bytes
    (so -0.0 differs from 0.0, and NaNs must have the same payload)."""
    import jax

    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    assert flat_a, "nothing to compare"
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        name = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs bitwise"


@pytest.fixture
def bitwise_equal() -> Callable[[Any, Any], None]:
    """:func:`assert_bitwise_equal`, for the test modules."""
    return assert_bitwise_equal


@pytest.fixture
def train_with_file_limit() -> Callable[..., subprocess.CompletedProcess]:
    """``rnnjax train ARGS`` in a child whose files may grow to ``limit`` bytes at most
    (RLIMIT_FSIZE; a write past it fails as a full disk's does), untuned:
    ``run(limit, *args)``, its completed process (text output captured)."""
    script = textwrap.dedent("""
        import resource, runpy, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        limit = int(sys.argv[1])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        sys.argv = ["rnnjax", "train", *sys.argv[2:]]
        runpy.run_module("rnnjax", run_name="__main__")
    """)

    def run(limit: int, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, str(limit), *args],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "RNNJAX_TUNE": "off"})

    return run
