"""The CPUs a process runs on (``--cpus``): chosen before JAX's backend starts, for every
thread (``rnnjax.process.first_cpus``, ``run_on``; ``rnnjax.runtime.apply_cpus``); and the
XLA flags, set before it too (``rnnjax.runtime.apply_xla_flags``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from rnnjax import process, runtime


def test_the_first_n_of_the_cpus_the_process_may_use(monkeypatch):
    monkeypatch.setattr(process, "usable_cpus", lambda: [2, 5, 7])
    assert process.first_cpus(0) == [2, 5, 7]  # all of them
    assert process.first_cpus(2) == [2, 5]
    with pytest.raises(ValueError, match=r"--cpus 4: this process may use only 3 CPUs; pass "
                                         r"--cpus 1 to 3, or --cpus 0 for all"):
        process.first_cpus(4)
    monkeypatch.setattr(process, "usable_cpus", lambda: [4])
    with pytest.raises(ValueError, match=r"--cpus 2: this process may use only 1 CPU; pass "
                                         r"--cpus 1, or --cpus 0 for all"):
        process.first_cpus(2)
    monkeypatch.setattr(process, "usable_cpus", lambda: [])  # no sched_setaffinity
    assert process.first_cpus(0) == []
    with pytest.raises(ValueError, match=r"no way to set the CPUs .* pass --cpus 0 for all"):
        process.first_cpus(1)


def test_once_the_backend_started_only_its_own_cpus_are_accepted(monkeypatch):
    jax.devices()  # the backend has started in this process
    monkeypatch.setattr(process, "usable_cpus", lambda: [0, 1])
    monkeypatch.setattr(process, "run_on", lambda cpus: pytest.fail("set after the start"))
    runtime.apply_cpus(0)  # what it has: nothing to do
    runtime.apply_cpus(2)
    with pytest.raises(ValueError, match=r"--cpus 1 cannot take effect: JAX's backend has "
                                         r"already started"):
        runtime.apply_cpus(1)


def test_once_the_backend_started_only_xla_flags_already_set_are_accepted(monkeypatch,
                                                                         tmp_path):
    """XLA reads $XLA_FLAGS once, when the backend starts: after that, --xla-flags already
    in it are accepted (not added twice), and one that is not is refused, naming it and the
    fix, not added to $XLA_FLAGS where it could not take effect, as a run that took it
    would say in its summary (xla_flags_env). A run of it is one ConfigError line before
    anything is written. Only --cpus' half of this had a test."""
    from rnnjax.config import Config, ConfigError
    from rnnjax.loop import train_and_evaluate

    jax.devices()  # the backend has started in this process
    assert runtime.backend_started()
    have, new = "--xla_cpu_use_xnnpack=false", "--xla_cpu_prefer_vector_width=256"
    monkeypatch.setenv("XLA_FLAGS", have)  # as if set before the start
    runtime.apply_xla_flags(have)  # in effect: nothing to do
    runtime.apply_xla_flags("")
    assert os.environ["XLA_FLAGS"] == have
    message = (f"--xla-flags {new} cannot take effect: JAX's backend has already started in "
               "this process; set them in XLA_FLAGS before starting Python, or run rnnjax "
               "train in a new process")
    with pytest.raises(ValueError) as refused:
        runtime.apply_xla_flags(f"{have} {new}")
    assert str(refused.value) == message  # the flag not in effect, alone
    assert os.environ["XLA_FLAGS"] == have
    work = tmp_path / "run"
    with pytest.raises(ConfigError) as refused:
        train_and_evaluate(Config(steps=1, hidden_size=4, eval_batch_size=5000,
                                  compile_cache="off", xla_flags=new), work)
    assert str(refused.value) == message and "\n" not in message
    assert os.environ["XLA_FLAGS"] == have and not work.exists()


@pytest.mark.skipif(len(process.usable_cpus()) < 2, reason="needs a process on 2+ CPUs")
def test_every_thread_runs_on_the_chosen_cpus_and_jax_sizes_its_pools_by_them(tmp_path):
    """A thread started before, the main thread, and the threads JAX's backend starts after
    (XLA:CPU's pools, sized by one CPU: fewer threads than on all of them); the programs
    compiled so are cached apart from those for all the CPUs (XLA splits loops by them)."""
    script = textwrap.dedent("""
        import json, os, sys, threading, jax
        from rnnjax import process, runtime
        before = threading.Event()
        threading.Thread(target=before.wait, daemon=True).start()
        runtime.apply_cpus(int(os.environ["CPUS"]))
        runtime.enable_compile_cache(sys.argv[1])
        jax.jit(lambda x: jax.numpy.tanh(x) * 2).lower(jax.numpy.ones((512, 512))).compile()
        tids = [int(t) for t in os.listdir("/proc/self/task")]
        print(json.dumps([sorted(os.sched_getaffinity(t)) for t in tids]))
        before.set()
    """)
    threads = {}
    for cpus in (1, 0):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                             text=True, env={**os.environ, "CPUS": str(cpus)}, timeout=120)
        assert out.returncode == 0, out.stderr
        threads[cpus] = json.loads(out.stdout)
    assert all(cpus == process.first_cpus(1) for cpus in threads[1])
    assert all(cpus == process.usable_cpus() for cpus in threads[0])
    assert len(threads[1]) < len(threads[0])
    cached = {p.name: any(p.iterdir()) for p in tmp_path.iterdir()}
    assert cached == {"cpus-1": True, f"cpus-{len(process.usable_cpus())}": True}


def test_a_later_run_in_the_process_caches_where_its_own_setting_says(tmp_path):
    """JAX opens its persistent cache at the first compile; a library user's second run
    that names another directory, or 'off', gets what it names, not the first run's."""
    script = textwrap.dedent("""
        import sys, jax, jax.numpy as jnp
        from rnnjax import runtime
        first, second = sys.argv[1:]
        runtime.enable_compile_cache(first)
        jax.jit(lambda x: jnp.tanh(x) + 1).lower(jnp.ones(3)).compile()
        runtime.enable_compile_cache(second)
        jax.jit(lambda x: jnp.tanh(x) + 2).lower(jnp.ones(3)).compile()
        assert runtime.enable_compile_cache("off") is None
        jax.jit(lambda x: jnp.tanh(x) + 3).lower(jnp.ones(3)).compile()
    """)
    first, second = tmp_path / "first", tmp_path / "second"
    out = subprocess.run([sys.executable, "-c", script, str(first), str(second)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    entries = {p.name: len(list(p.rglob("jit__lambda-*"))) for p in (first, second)}
    assert entries == {"first": 1, "second": 1}


def test_a_cache_home_that_takes_no_files_is_no_cache(tmp_path, monkeypatch):
    """'auto' under an $XDG_CACHE_HOME that cannot be written runs uncached, and says so:
    the summary shows no cache directory that JAX could not use."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    try:
        assert runtime.enable_compile_cache("auto") is None
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
        assert runtime.enable_compile_cache("auto") == str(
            tmp_path / "home" / "rnnjax" / "jax" / f"cpus-{process.cpu_count()}")
        assert list((tmp_path / "home").rglob("*probe*")) == []
    finally:
        runtime.enable_compile_cache("off")
