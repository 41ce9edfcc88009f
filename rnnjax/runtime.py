"""What a run ran on, and honest compile timing (a leaf: imports nothing of rnnjax)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import jax

PACKAGES = ("jax", "jaxlib", "optax", "orbax-checkpoint", "numpy")


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


def enable_compile_cache(setting: str) -> str | None:
    """Point JAX's persistent compilation cache at ``setting`` ('auto', 'off' or a path).

    Every compiled program is cached (no minimum compile time), keyed by JAX on the
    program, backend, versions and flags. Returns the directory, or None when off.
    """
    if setting == "off":
        return None
    if setting == "auto":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        setting = os.path.join(base, "rnnjax", "jax")
    path = os.path.abspath(os.path.expanduser(setting))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def compile_timed(jitted: Callable, *args: Any) -> tuple[Callable, float]:
    """Lower and compile ``jitted`` for ``args`` ahead of time: ``(compiled, seconds)``.

    Calling the result never compiles again, so timings after it are steady state.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()  # type: ignore[attr-defined]
    return compiled, time.perf_counter() - start


class CompileOnFirstCall:
    """``jitted`` compiled ahead of time for the arguments of its first call, and that
    executable reused after: a call returns ``(result, seconds spent compiling in it)``.

    Later calls with other shapes fail instead of silently compiling again.
    """

    def __init__(self, jitted: Callable) -> None:
        self.jitted = jitted
        self.compiled: Callable | None = None

    def __call__(self, *args: Any) -> tuple[Any, float]:
        seconds = 0.0
        if self.compiled is None:
            self.compiled, seconds = compile_timed(self.jitted, *args)
        return self.compiled(*args), seconds
