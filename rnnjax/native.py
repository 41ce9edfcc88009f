"""The Elman (tanh) layer's forward and backward passes as native XLA:CPU custom calls.

``native_elman.cc`` (beside this file) holds both passes, each one call through
``jax.ffi``: the recurrence on the calling thread, the products off its chain (the input
projection of the steps ahead, the weight gradients of the steps behind) on another thread
of XLA's intra-op pool. It replaces the few XLA ops each step of a loop costs, and the
products XLA runs after the loop on one thread, by one call per pass: the ``native``
backward of ``simple_rnn`` (``rnnjax.cells.resolve_form``), which ``rnnjax tune`` times
where a C++ compiler is at hand (in turns in one process on a 2-core AVX-512 EPYC, the
train step against the built-in cell's fastest form: rows batch 50 1.29x, batch 1024 1.03x,
pixels batch 50 1.15x; ``python -m benchmarks.native_elman``).

The library is built the first time it is needed, with the machine's C++ compiler
(``$CXX``, else g++ or c++) for its own CPU (``-march=native``), and kept in
``$XDG_CACHE_HOME/rnnjax/native/`` (else ``~/.cache/rnnjax/native/``), keyed on the source,
the compiler, the CPU and JAX's version: about 1.5 s once per machine. CPU only, float32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax

from rnnjax.config import ConfigError

SOURCE = Path(__file__).with_name("native_elman.cc")
LANES = 8  # floats per vector of the build the cells use (benchmarks.native_elman: 8 and 16)
SYMBOLS = ("RnnjaxElmanForward", "RnnjaxElmanBackward", "RnnjaxElmanBackwardWithOutputs")


class NativeError(ConfigError):
    """The native kernels cannot be had here: the message says why and what to do (the CLI
    prints it as a usage error)."""


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else ``g++`` or ``c++`` on the PATH."""
    for name in (os.environ.get("CXX", ""), "g++", "c++"):
        if name and shutil.which(name):
            return name
    raise NativeError("the native kernels (--backward native) need a C++17 compiler: install "
                      "g++ (Debian: apt install g++) or set $CXX to one, or choose another "
                      "--backward")


def unavailable() -> str | None:
    """Why the native kernels cannot be built here (no compiler), or None. Starts nothing."""
    try:
        compiler()
    except NativeError as e:
        return str(e)
    return None


def _cpu() -> str:
    """What ``-march=native`` compiles for: the CPU's model and flags where Linux says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))


def build_command(lanes: int, out: Path) -> list[str]:
    return [compiler(), "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
            f"-DRNNJAX_LANES={lanes}", "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(out)]


def _key(lanes: int) -> str:
    version = subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout
    parts = (SOURCE.read_bytes().hex(), version, _cpu(), jax.__version__, str(lanes))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def cache_dir() -> Path:
    """``native/`` beside the compilation cache's default directory (``rnnjax.runtime``)."""
    from rnnjax import runtime

    return Path(runtime.compile_cache_dir("auto")).parent / "native"


def build(lanes: int = LANES) -> Path:
    """The library built for ``lanes`` floats per vector: from the cache when there, else
    compiled into it (a temporary file renamed into place, so that processes building at
    once each find a whole file); into a temporary directory where the cache cannot be
    written."""
    target = cache_dir() / f"native_elman_{lanes}_{_key(lanes)}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError:
        target = Path(tempfile.mkdtemp(prefix="rnnjax-native-")) / target.name
        handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    command = build_command(lanes, Path(partial))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        Path(partial).unlink(missing_ok=True)
        raise NativeError(f"building {SOURCE.name} failed ({' '.join(command)}):\n"
                          f"{done.stderr[-2000:]}")
    os.replace(partial, target)
    return target


def targets(lanes: int = LANES) -> dict[str, str]:
    """The custom-call target names of the build for ``lanes``, by symbol."""
    return {symbol: f"rnnjax_elman_{symbol.removeprefix('RnnjaxElman').lower()}_{lanes}"
            for symbol in SYMBOLS}


@functools.cache
def register(lanes: int = LANES) -> None:
    """Build (or find) the library for ``lanes`` and register its targets with XLA:CPU, once
    per process (XLA refuses a second handler for a name)."""
    if jax.default_backend() != "cpu":
        raise NativeError(f"--backward native runs on a CPU; this run's backend is "
                          f"{jax.default_backend()}: choose another --backward")
    library = ctypes.cdll.LoadLibrary(str(build(lanes)))
    for symbol, name in targets(lanes).items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")


@functools.cache
def elman_layer(lanes: int = LANES) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``layer(xs [T, B, F], kernel [F, H], recurrent [H, H], bias [H], h0 [B, H]) ->
    (hs [T, B, H], h_T [B, H])``, float32: ``rnnjax.cells.elman_layer`` with tanh, as one
    call of the forward pass and one of the backward (``dxs = dzs @ kernel^T`` stays XLA's,
    and is dropped where no gradient of the inputs is asked for). Registers the kernels
    (:func:`register`) when first traced."""
    from rnnjax import cells

    names = targets(lanes)

    def like(*arrays: jax.Array) -> tuple[jax.ShapeDtypeStruct, ...]:
        return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrays)

    def forward(xs, kernel, recurrent, bias, h0):
        register(lanes)
        hs = jax.ffi.ffi_call(names["RnnjaxElmanForward"],
                              jax.ShapeDtypeStruct((*xs.shape[:2], h0.shape[-1]), xs.dtype))(
            xs, kernel, bias, recurrent, h0)
        return hs, hs[-1]

    @jax.custom_vjp
    def layer(xs, kernel, recurrent, bias, h0):
        return forward(xs, kernel, recurrent, bias, h0)

    def layer_fwd(xs, kernel, recurrent, bias, h0):
        xs, kernel, recurrent, bias, h0 = cells._values(xs, kernel, recurrent, bias, h0)
        hs, h_last = forward(xs, kernel, recurrent, bias, h0)
        return (hs, h_last), (xs, hs, kernel, recurrent, bias, h0)

    def layer_bwd(residuals, cotangents):
        xs, hs, kernel, recurrent, bias, h0 = residuals
        dhs, dh_last = cells._dense(cotangents[0]), cells._dense(cotangents[1], h0)
        shapes = like(hs, h0, kernel, recurrent, bias)
        if dhs is None:  # the classifier reads only h_T: no [T, B, H] of zeros to read
            dzs, dh0, dkernel, drecurrent, dbias = jax.ffi.ffi_call(
                names["RnnjaxElmanBackward"], shapes)(xs, hs, h0, recurrent, dh_last)
        else:
            dzs, dh0, dkernel, drecurrent, dbias = jax.ffi.ffi_call(
                names["RnnjaxElmanBackwardWithOutputs"], shapes)(xs, hs, dhs, h0, recurrent,
                                                                 dh_last)
        return dzs @ kernel.T, dkernel, drecurrent, dbias, dh0

    layer.defvjp(layer_fwd, layer_bwd, symbolic_zeros=True)
    return layer
