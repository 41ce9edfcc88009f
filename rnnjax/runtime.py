"""What a run ran on, what its process sets before JAX's backend starts (XLA flags, CPUs),
and honest compile timing (a leaf: of rnnjax it imports only :mod:`rnnjax.process` and
:mod:`rnnjax.atomic`, which import nothing of it)."""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import jax

from rnnjax import atomic

PACKAGES = ("jax", "jaxlib", "optax", "orbax-checkpoint", "numpy")
# JAX's accelerator plugins: with none installed, its only backend is the CPU's.
GPU_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm60-plugin",
               "jax-rocm7-plugin")
TPU_PLUGINS = ("libtpu",)


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of python and the packages that shape the numbers."""
    out = {"python": platform.python_version()}
    for name in PACKAGES + extra:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: jax.Device | None = None) -> dict[str, Any]:
    """Backend, device kind and count; the CPU's name when the device is a CPU."""
    device = device or jax.devices()[0]
    kind = device.device_kind
    if device.platform == "cpu":
        kind = f"{cpu_name()} ({kind})"
    return {
        "backend": device.platform,
        "device_kind": kind,
        "device_count": jax.device_count(device.platform),
    }


def compile_cache_dir(setting: str) -> str | None:
    """The directory ``--compile-cache`` names ('auto', 'off' or a path); None when off.

    'auto' is ``$XDG_CACHE_HOME/rnnjax/jax``, else ``~/.cache/rnnjax/jax``.
    """
    if setting == "off":
        return None
    if setting == "auto":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        setting = os.path.join(base, "rnnjax", "jax")
    return os.path.abspath(os.path.expanduser(setting))


def _takes_files(directory: str) -> bool:
    """Whether ``directory`` is, or can be made, and takes a file (``atomic.probe``)."""
    try:
        os.makedirs(directory, exist_ok=True)
        atomic.probe(directory)
    except OSError:
        return False
    return True


def enable_compile_cache(setting: str) -> str | None:
    """Point JAX's persistent compilation cache at ``setting`` ('auto', 'off' or a path).

    Every compiled program is cached (no minimum compile time), keyed by JAX on the
    program, backend, versions and flags, in a directory of its own for the number of CPUs
    this process may use (``cpus-N/``): XLA:CPU splits a program's loops over the CPUs it
    finds when it compiles, and JAX's key leaves them out, so a process on one CPU would
    load a program split for two (call after :func:`apply_cpus`). JAX opens its cache once
    a process, at the first compile, so a later call that names another directory, or
    'off', reopens it. Programs that cannot be written into it later (a disk filled up) are
    one line on stderr (:func:`_note_unwritten_programs`). Returns the directory, or None
    when off or the directory cannot be written.
    """
    from jax.experimental.compilation_cache import compilation_cache

    from rnnjax import process

    path = compile_cache_dir(setting)
    if path is not None:
        path = os.path.join(path, f"cpus-{process.cpu_count()}")
        if not _takes_files(path):  # 'auto' in a home that cannot be written (CLI checks a path)
            path = None
    if path != jax.config.jax_compilation_cache_dir:
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    if path is None:
        return None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _note_unwritten_programs(path)
    return path


# How JAX's warning for a program it could not write into the compilation cache begins
# (jax._src.compiler._cache_write, jax 0.10-0.11).
UNWRITTEN = "Error writing persistent compilation cache entry"


def _note_unwritten_programs(directory: str) -> None:
    """Where JAX cannot write a program into the compilation cache (a disk filled up, a
    cache made read-only since the run checked it), it warns once per program, in two
    lines: a run filled stderr with 6-7 of them. This process says so once a directory
    instead, in one line naming it and the fix, and shows every other warning as before
    (:class:`_UnwrittenNote` around ``warnings.showwarning``, installed once)."""
    import warnings

    if isinstance(warnings.showwarning, _UnwrittenNote):
        warnings.showwarning.directory, warnings.showwarning.noted = directory, False
    else:
        warnings.showwarning = _UnwrittenNote(warnings.showwarning, directory)


class _UnwrittenNote:
    """``warnings.showwarning`` that shows JAX's warnings of programs not written into the
    compilation cache ``directory`` as one line, the first time, and passes every other
    warning to ``shown``, the one it replaced."""

    def __init__(self, shown: Callable[..., None], directory: str) -> None:
        self.shown, self.directory, self.noted = shown, directory, False

    def __call__(self, message: Any, category: Any, filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
        text = str(message)
        if not text.startswith(UNWRITTEN):
            self.shown(message, category, filename, lineno, file, line)
            return
        if not self.noted:
            self.noted = True
            error = text.split("': ", 1)[-1]
            print(f"rnnjax: the compilation cache {self.directory} cannot be written "
                  f"({error}): programs are compiled, not cached; free space there, or pass "
                  "--compile-cache with another directory, or off",
                  file=file if file is not None else sys.stderr, flush=True)


def installed(names: tuple[str, ...]) -> bool:
    """Whether any of the packages ``names`` is installed."""
    for name in names:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return True
    return False


def starts_on_cpu() -> bool:
    """Whether this process's backend will be the CPU's, known without starting it:
    ``$JAX_PLATFORMS`` names the CPU first, or (unset) no accelerator plugin is
    installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not installed(GPU_PLUGINS + TPU_PLUGINS)


def backend_started() -> bool:
    """Whether JAX's backends have started in this process (XLA has read its flags)."""
    from jax._src import xla_bridge  # no public equivalent in jax 0.10

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def apply_xla_flags(flags: str) -> None:
    """Add ``flags`` (space-separated ``--xla_...``) to ``$XLA_FLAGS`` for this process.

    XLA reads ``$XLA_FLAGS`` once, when JAX's backend starts: the flags must be set before
    that. Flags already there are not added twice; once the backend has started, flags not
    in effect are an error (a ConfigError would import config: a plain ValueError here).
    """
    current = os.environ.get("XLA_FLAGS", "").split()
    missing = [flag for flag in flags.split() if flag not in current]
    if not missing:
        return
    if backend_started():
        raise ValueError(
            f"--xla-flags {' '.join(missing)} cannot take effect: JAX's backend has already "
            "started in this process; set them in XLA_FLAGS before starting Python, or run "
            "rnnjax train in a new process"
        )
    os.environ["XLA_FLAGS"] = " ".join([*current, *missing])


def apply_cpus(count: int) -> None:
    """Run this process, every thread of it, on the first ``count`` of the CPUs it may use
    (0: all of them, as it is: ``rnnjax.process.first_cpus``).

    XLA:CPU sizes its thread pools by the CPUs a process may use when JAX's backend starts:
    the setting must come before that. Where a step is a chain of small ops, one thread runs
    it faster than two handing work to each other (rows, batch 50: 1.13-1.18x, 2-core AVX-512
    EPYC; ``rnnjax.tune`` times it). Errors are a plain ValueError naming the fix.
    """
    from rnnjax import process

    chosen = process.first_cpus(count)
    if chosen == process.usable_cpus():
        return
    if backend_started():
        raise ValueError(f"--cpus {count} cannot take effect: JAX's backend has already started "
                         "in this process, on its CPUs; start Python under `taskset`, or run "
                         "rnnjax train in a new process")
    process.run_on(chosen)


def apply_process_settings(xla_flags: str, cpus: int) -> None:
    """What JAX's backend reads of this process when it starts: the run's XLA flags
    (:func:`apply_xla_flags`) and the CPUs it runs on (:func:`apply_cpus`)."""
    apply_xla_flags(xla_flags)
    apply_cpus(cpus)


# A list flag's value that adds to or takes from XLA's defaults (``+WHILE``, ``-FUSION``):
# $XLA_FLAGS' syntax alone. As one compilation's option XLA refuses it ("'+WHILE' is not a
# valid enum value", jaxlib 0.10.2 and 0.11.2), and the defaults it edits differ from one
# XLA to the next, so it cannot be spelled out in full either. A signed number (``-inf``,
# ``+1e3``, ``-nan``) is a value, not an edit.
_EDITS_DEFAULTS = re.compile(r"(^|,)[+-](?!(inf|infinity|nan)(,|$))[A-Za-z_]", re.IGNORECASE)


def per_compilation(flags: str) -> bool:
    """Whether XLA takes every flag of ``flags`` as an option of one compilation
    (:func:`compile_options`): not a value that edits a list flag's defaults
    (``--xla_gpu_enable_command_buffer=+WHILE``), which only ``$XLA_FLAGS`` reads, when the
    backend starts."""
    return not any(_EDITS_DEFAULTS.search(flag.partition("=")[2]) for flag in flags.split())


def compile_options(flags: str) -> dict[str, str]:
    """XLA flags (space-separated ``--xla_name=value``; ``--xla_name`` alone is ``true``) as
    options of one compilation (``jax.stages.Lowered.compile``'s ``compiler_options``).

    XLA's compiler flags (its DebugOptions) apply per compiled program so, over the flags
    ``$XLA_FLAGS`` gave the process: the tuner times them beside the run's own flags in one
    process (:mod:`rnnjax.measure`). A name XLA does not know fails the compilation ("No
    such compile option"), as do flags read only when the backend starts (a host's device
    count): those are not compiler flags. A value that edits a list flag's defaults is
    refused (:func:`per_compilation`).
    """
    options = {}
    for flag in flags.split():
        name, sep, value = flag.lstrip("-").partition("=")
        if not per_compilation(flag):
            raise ValueError(f"XLA flag {flag} edits the defaults of a list, which only "
                             "$XLA_FLAGS reads (one compilation's option takes the whole "
                             "list): set it in $XLA_FLAGS")
        options[name] = value if sep else "true"
    return options


def compile_timed(jitted: Callable, *args: Any, xla_flags: str = ""
                  ) -> tuple[Callable, float]:
    """Lower and compile ``jitted`` for ``args`` ahead of time, under ``xla_flags`` as well
    as the process's (:func:`compile_options`): ``(compiled, seconds)``.

    Calling the result never compiles again, so timings after it are steady state.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile(  # type: ignore[attr-defined]
        compiler_options=compile_options(xla_flags) or None)
    return compiled, time.perf_counter() - start


# XLA's options for a program run once, by backend (:func:`run_once`). On XLA:CPU, LLVM's
# optimization level 1 in place of XLA's default: the seed's initial state compiled in
# 0.49 s against 1.63 s, thirty configurations' (every cell, layers, widths, dtypes,
# optimizers) in 18 s against 38 s, to the same bits, and ran in about a millisecond
# (2-vCPU AVX-512 Xeon, 2026-12-05; docs/performance.md). Level 0 drew other bits (the
# orthogonal kernel's normal draws rounded otherwise). tests/test_loop.py checks the bits
# on the machine it runs on. Other backends: XLA's defaults (nothing measured there).
RUN_ONCE_OPTIONS: dict[str, dict[str, str]] = {"cpu": {"xla_backend_optimization_level": "1"}}


def run_once(jitted: Callable, *args: Any) -> Any:
    """``jitted`` called on ``args``, for a program a run calls once: compiled ahead of time
    with :data:`RUN_ONCE_OPTIONS` for the default backend (cached as any program is), so
    that its compile costs less where its speed does not matter."""
    options = RUN_ONCE_OPTIONS.get(jax.default_backend())
    return jitted.lower(*args).compile(compiler_options=options)(*args)


class CompileOnFirstCall:
    """``jitted`` compiled ahead of time (under ``xla_flags``: :func:`compile_timed`) for the
    arguments of its first call, and that executable reused after: a call returns
    ``(result, seconds spent compiling in it)``.

    Later calls with other shapes fail instead of silently compiling again. ``wait``: each
    call returns once its results are ready (``parallel.calls_must_finish``).
    """

    def __init__(self, jitted: Callable, xla_flags: str = "", wait: bool = False) -> None:
        self.jitted, self.xla_flags, self.wait = jitted, xla_flags, wait
        self.compiled: Callable | None = None

    def __call__(self, *args: Any) -> tuple[Any, float]:
        seconds = 0.0
        if self.compiled is None:
            self.compiled, seconds = compile_timed(self.jitted, *args, xla_flags=self.xla_flags)
        result = self.compiled(*args)
        return (jax.block_until_ready(result) if self.wait else result), seconds
