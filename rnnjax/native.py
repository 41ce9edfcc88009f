"""Recurrent layers' forward and backward passes as native XLA:CPU custom calls.

``native_elman.cc``, ``native_lstm.cc`` and ``native_gru.cc`` (beside this file, over
``native_common.h``, their products compiled once in ``native_products.cc``) hold the
passes of the Elman (tanh), LSTM and GRU layers, each one call through ``jax.ffi``. A call
splits the batch into one part per thread of XLA's intra-op pool (more where a part would
pass 64 rows), and each part runs all its steps alone (projection, recurrence, its own
weight gradients), so a pass is one op where XLA's loops run several a step and its
products one after another. They are the ``native`` backward of ``simple_rnn``,
``lstm`` and ``gru`` (``rnnjax.cells.resolve_form``), which ``rnnjax tune`` times where a
C++ compiler is at hand. A layer's ``final`` form (``elman_layer(lanes, final=True)``, ...)
gives its final carry alone: the forward call then writes the last step alone, as a
classifier's evaluation needs (``--eval-native``). (In turns in one process on a 2-core
AVX-512 EPYC, the train step
against the cell's fastest built-in form, rows batch 50 / pixels batch 50: simple_rnn 1.46x
/ 1.51x, lstm 1.30x / 1.40x, gru 1.51x / 1.84x; rows batch 1024: simple_rnn 1.08-1.23x, lstm
1.20x, gru level; rows batch 4096: simple_rnn 0.86-0.93x; ``python -m
benchmarks.native_kernels``.)

The library is built the first time it is needed, with the machine's C++ compiler
(``$CXX``, else g++ or c++) for its own CPU (``-march=native``), and kept in
``$XDG_CACHE_HOME/rnnjax/native/`` (else ``~/.cache/rnnjax/native/``), keyed on the
sources, the compiler, the CPU and JAX's version: about 2 s once per machine. A build not
used for :data:`STALE_DAYS` is removed when another is built (:func:`prune`). CPU only,
float32.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.config import NATIVE_LANES, ConfigError

SOURCES = tuple(Path(__file__).with_name(f"native_{name}.cc")
                for name in ("elman", "gru", "lstm", "products"))
HEADER = Path(__file__).with_name("native_common.h")
LANES = NATIVE_LANES[0]  # floats per vector of the default build (Config.native_lanes)
CELLS = ("Elman", "Gru", "Lstm")
STALE_DAYS = 30  # a build unused this long is removed when another is built (prune)
SYMBOLS = tuple(f"Rnnjax{cell}{call}" for cell in CELLS
                for call in ("Forward", "Backward", "BackwardWithOutputs"))
SEAL = b"rnnjax-sha256:"  # then the SHA-256 of the build before it: sealed()
SEALS = sys.platform.startswith("linux")  # ELF files, which bytes past their segments spare


class NativeError(ConfigError):
    """The native kernels cannot be had here: the message says why and what to do (the CLI
    prints it as a usage error)."""


def compiler() -> list[str]:
    """The C++ compiler's command: ``$CXX`` where set (split as a shell would:
    ``ccache g++``), else ``g++`` or ``c++`` on the PATH. A ``$CXX`` whose program is not
    found is a :class:`NativeError` naming it, never passed over for another compiler."""
    given = os.environ.get("CXX", "").strip()
    if given:
        try:
            command = shlex.split(given)
        except ValueError as e:
            raise NativeError(f"$CXX={given!r} does not parse ({e}); set it to a C++17 "
                              "compiler's command, or unset it to use g++") from None
        if not shutil.which(command[0]):
            raise NativeError(f"$CXX={given!r}: {command[0]} is not found; set $CXX to a "
                              "C++17 compiler that is (or unset it to use g++)")
        return command
    for name in ("g++", "c++"):
        if shutil.which(name):
            return [name]
    raise NativeError("the native kernels (--backward native) need a C++17 compiler: install "
                      "g++ (Debian: apt install g++) or set $CXX to one")


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


def wide_vectors() -> bool:
    """Whether the CPU has 512-bit vector registers (x86's AVX-512F, where Linux lists the
    CPU's flags), which a build for 16 lanes holds whole: elsewhere each vector is two
    256-bit halves, and the products' accumulators no longer fit the registers."""
    return any(line.startswith("flags") and "avx512f" in line.split()
               for line in _cpu().splitlines())


def compile_command(lanes: int, source: Path, out: Path, include: str | None = None
                    ) -> list[str]:
    """The compiler's command line for one source's object file (``include``: the XLA FFI
    headers' directory, JAX's by default)."""
    include = jax.ffi.include_dir() if include is None else include
    return [*compiler(), "-O3", "-march=native", "-std=c++17", "-fPIC", "-c",
            f"-DRNNJAX_LANES={lanes}", "-I", include, str(source), "-o", str(out)]


def _compile(lanes: int, out: Path) -> None:
    """Compile :data:`SOURCES` (one compiler process each, at once) and link them into the
    shared library ``out``; :class:`NativeError` with the compiler's output where that
    fails."""
    with tempfile.TemporaryDirectory(prefix="rnnjax-native-") as work:
        objects = [Path(work) / f"{source.stem}.o" for source in SOURCES]
        commands = [compile_command(lanes, source, obj) for source, obj in zip(SOURCES, objects,
                                                                                strict=True)]
        running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for command in commands]
        steps = [(command, *process.communicate(), process.returncode)
                 for command, process in zip(commands, running, strict=True)]
        link = [*compiler(), "-shared", *map(str, objects), "-o", str(out)]
        if all(code == 0 for *_, code in steps):
            done = subprocess.run(link, capture_output=True, text=True)
            steps.append((link, done.stdout, done.stderr, done.returncode))
        for command, _, stderr, code in steps:
            if code != 0:
                raise NativeError(f"building the native kernels failed ({' '.join(command)}):"
                                  f"\n{stderr[-2000:]}")


def _key(lanes: int) -> str:
    """The build's cache key: the sources, the compiler and its command line (not its
    paths: one build serves every installation of the same JAX), the CPU, JAX's version
    and ``lanes``."""
    version = subprocess.run([*compiler(), "--version"], capture_output=True, text=True).stdout
    sources = [path.read_bytes().hex() for path in (*SOURCES, HEADER)]
    command = " ".join(compile_command(lanes, Path("source.cc"), Path("source.o"), "include"))
    parts = (*sources, version, command, _cpu(), jax.__version__, str(lanes))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def cache_dir() -> Path:
    """``native/`` beside the compilation cache's default directory (``rnnjax.runtime``)."""
    from rnnjax import runtime

    return Path(runtime.compile_cache_dir("auto")).parent / "native"


def build(lanes: int = LANES) -> Path:
    """The library built for ``lanes`` floats per vector: from the cache when there, else
    compiled in a temporary directory and copied into it (:func:`_copy_into`); kept in that
    directory, removed at exit, where the cache cannot be written or is full. A build found
    is stamped as used, and a new one prunes the cache (:func:`prune`)."""
    target = cache_dir() / f"native_{lanes}_{_key(lanes)}.so"
    damaged = target.exists() and not whole(target)  # cut short, damaged, unsealed
    if damaged:  # built again: into the cache, or where it cannot be written, into scratch
        with contextlib.suppress(OSError):  # kept: never loaded, built below in scratch
            target.unlink(missing_ok=True)
            damaged = False
    if target.exists() and not damaged:
        try:
            os.utime(target)  # used now, for prune
            return target
        except FileNotFoundError:  # pruned by another process just now: built again below
            pass
        except OSError:  # a cache that cannot be written keeps its stamps
            return target
    # Built in a temporary directory, then copied into the cache: a cache that cannot be
    # written, or is full (which only the write finds), keeps this process's own copy there,
    # removed when it exits (a loaded library stays).
    scratch = Path(tempfile.mkdtemp(prefix="rnnjax-native-"))
    built = scratch / target.name
    try:
        _compile(lanes, built)
        if SEALS:
            built.write_bytes(sealed(built.read_bytes()))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        _copy_into(built, target)
    except OSError:
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        return built
    shutil.rmtree(scratch, ignore_errors=True)
    prune(target.parent, target)
    return target


def _copy_into(built: Path, target: Path) -> None:
    """``built`` copied to ``target`` through a temporary file beside it, on the disk
    before it is renamed into place: processes building at once each find a whole file,
    and a crash, or a full disk, leaves no library cut short under the name (OSError where
    it cannot be written)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        shutil.copyfile(built, partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def sealed(library: bytes) -> bytes:
    """A built ``library``'s bytes with :data:`SEAL` and their SHA-256 after them: past every
    segment its ELF headers place, so the loader never reads them, and :func:`whole` finds
    any byte changed since."""
    return library + SEAL + hashlib.sha256(library).digest()


def whole(library: Path) -> bool:
    """Whether the shared library ``library`` holds the bytes it was built with, as its seal
    (:func:`sealed`) has them. A build cut short, truncated, or damaged since (a crash's
    zeroed blocks, a flipped bit) does not: loading it crashed the process with SIGBUS, raised
    "file too short", or ran damaged code. True off Linux, where builds are not ELF files and
    are not sealed (a signed library must stay as linked)."""
    if not SEALS:
        return True
    try:
        data = library.read_bytes()
    except OSError:
        return False
    body = data[:-len(SEAL) - hashlib.sha256().digest_size]
    return len(body) > 0 and data == sealed(body)


def prune(directory: Path, keep: Path, now: float | None = None) -> list[Path]:
    """Remove from the cache ``directory`` the builds unused for :data:`STALE_DAYS` (other
    sources, compilers, CPUs or JAX versions: an upgrade's leftovers) and the partial files
    of builds stopped more than a day ago, never ``keep``; what it removed. Builds another
    installation still uses are stamped at each use (:func:`build`), so they stay. Best effort:
    a file that cannot be removed stays."""
    now = time.time() if now is None else now
    removed = []
    for path in directory.glob("*.so"):
        days = STALE_DAYS if path.name.startswith("native_") else 1
        try:
            if path != keep and now - path.stat().st_mtime > days * 86400:
                path.unlink()
                removed.append(path)
        except OSError:  # removed by another process meanwhile, or not ours to remove
            continue
    return removed


def targets(lanes: int = LANES) -> dict[str, str]:
    """The custom-call target names of the build for ``lanes``, by symbol."""
    return {symbol: "rnnjax" + re.sub("([A-Z])", r"_\1", symbol.removeprefix("Rnnjax")).lower()
            + f"_{lanes}" for symbol in SYMBOLS}


@functools.cache
def register(lanes: int = LANES) -> None:
    """Build (or find) the library for ``lanes`` and register its targets with XLA:CPU, once
    per process (XLA refuses a second handler for a name)."""
    if jax.default_backend() != "cpu":
        raise NativeError(f"--backward native runs on a CPU; this run's backend is "
                          f"{jax.default_backend()}: choose another --backward")
    path = build(lanes)
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
    except OSError:  # damaged in a way whole() does not see: built once more
        with contextlib.suppress(OSError):
            path.unlink()
        try:
            library = ctypes.cdll.LoadLibrary(str(build(lanes)))
        except OSError as again:
            raise NativeError(
                f"the native kernels built in {path.parent} do not load ({again}); where its "
                "file system maps no programs (mounted noexec), set $XDG_CACHE_HOME to a "
                "directory on one that does; or choose another --backward") from again
    for symbol, name in targets(lanes).items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")


def _rounded(hidden: int, lanes: int) -> int:
    """H', the width of a gate's block in the kernels' layouts: ``hidden`` rounded up to a
    multiple of ``lanes`` (``native_common.h``'s ``padded``)."""
    return -(-hidden // lanes) * lanes


def _padded(x: jax.Array, gates: int, lanes: int) -> jax.Array:
    """[..., gates * H] -> [..., gates * H'], each gate's block padded with zeros to H'
    (:func:`_rounded`), as the kernels lay out their gates."""
    hidden = x.shape[-1] // gates
    blocks = x.reshape(*x.shape[:-1], gates, hidden)
    blocks = jnp.pad(blocks, [(0, 0)] * (x.ndim - 1)
                     + [(0, 0), (0, _rounded(hidden, lanes) - hidden)])
    return blocks.reshape(*x.shape[:-1], -1)


def _like(*arrays: jax.Array) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrays)


def _backward(names: dict[str, str], cell: str, shapes: tuple, xs: jax.Array, hs: jax.Array,
              dhs: jax.Array | None, *rest: jax.Array) -> tuple[jax.Array, ...]:
    """The cell's backward call: ``(xs, hs, *rest) -> shapes``, with dhs after hs where the
    outputs have a gradient (else the classifier reads only h_T: no [T, B, H] of zeros to
    read)."""
    if dhs is None:
        return jax.ffi.ffi_call(names[f"Rnnjax{cell}Backward"], shapes)(xs, hs, *rest)
    return jax.ffi.ffi_call(names[f"Rnnjax{cell}BackwardWithOutputs"], shapes)(xs, hs, dhs,
                                                                                *rest)


def _asked(xs: Any) -> tuple[()] | None:
    """A residual for whether the gradient of the layer's inputs ``xs`` (a ``custom_vjp``
    forward rule's primal, ``symbolic_zeros``) is asked for: ``()`` if so, None where the
    inputs are data (the first layer's sequences under a gradient of the parameters)."""
    return () if xs.perturbed else None


def _input_gradient(asked: tuple[()] | None, hs: jax.Array, width: int
                    ) -> jax.ShapeDtypeStruct:
    """The backward call's first result, the gradient XLA turns into the inputs' (dzs, dus),
    for the layer's outputs ``hs [T, B, H]``: [T, B, width], or [0, B, width] where it is not
    asked for (:func:`_asked`), which the kernel then does not write (``native_common.h``'s
    ``open_backward``; at rows batch 4096 the Elman's was a [28, 4096, 50] array written and
    dropped every step)."""
    time = 0 if asked is None else hs.shape[0]
    return jax.ShapeDtypeStruct((time, hs.shape[1], width), hs.dtype)


def _inputs_cotangent(asked: tuple[()] | None, dzs: jax.Array, kernel: jax.Array,
                      xs: jax.Array, rows: jax.Array) -> jax.Array | None:
    """The inputs' gradient from the backward call's first result (:func:`_input_gradient`)
    and the kernel its gate blocks are laid out against: ``dzs @ kernel^T``, carried back
    through the gather the layer read in place of (``rnnjax.model.gather_sequences``: added
    into the rows it reads) where it read a batch's ``rows`` of a table ``xs``
    (:func:`_rows`), or None (a zero) where it was not asked for."""
    from rnnjax.model import gather_sequences

    if asked is None:
        return None
    dxs = dzs @ kernel.T
    if rows.shape[0] == 0:
        return dxs
    return jax.vjp(lambda table: gather_sequences(table, rows), xs)[1](dxs)[0]


def _rows(xs: jax.Array, rows: jax.Array | None, carry: jax.Array) -> jax.Array:
    """The kernels' last operand, for inputs ``xs`` and a carry ``[B, H]``: the batch's
    ``rows`` (int [B]) of a table ``xs [T, N, F]``, the batch being ``xs[:, rows]``
    (indices outside [0, N) clamped into it, as ``rnnjax.model.gather_sequences`` clamps
    them), as int32; or, without rows, int32 [0]: ``xs [T, B, F]`` is the batch itself.

    Read where they are, a whole set's sequences and a batch's indices spare the train step
    XLA's gather of the batch into a [T, B, F] copy (``rnnjax.model.Model.apply_sequences``)."""
    batch = carry.shape[0]
    if rows is None:
        if xs.shape[1] != batch:
            raise ValueError(f"native layer: inputs {tuple(xs.shape)} for a carry of {batch} "
                             "rows: pass the batch's rows of a table, or a batch of the "
                             "carry's size")
        return jnp.zeros((0,), jnp.int32)
    if rows.shape != (batch,) or not jnp.issubdtype(rows.dtype, jnp.integer):
        raise ValueError(f"native layer: rows {rows.dtype}{list(rows.shape)} for a carry of "
                         f"{batch} rows; pass one integer index into the table a row")
    if xs.shape[1] == 0:
        raise ValueError("native layer: rows of an empty table: pass at least one sequence")
    return rows.astype(jnp.int32)


def _check_shapes(cell: str, gates: int, names: tuple[str, ...], xs: jax.Array,
                  params: tuple[jax.Array, ...], carry: tuple[jax.Array, ...]) -> None:
    """ValueError unless the ``params`` (by ``names``: kernel [F, gates * H], recurrent
    [H, gates * H], bias and recurrent_bias [gates * H]) fit inputs ``xs [T, B or N, F]``
    and a ``carry`` of [B, H] arrays, with at least one step and one row. The kernels read
    F from the inputs and H from the carry, and trust the rest: a kernel of other features
    was read past its end, and its gradient written past its buffer's (a crash)."""
    if xs.ndim != 3:
        raise ValueError(f"native {cell} layer: inputs of shape {tuple(xs.shape)}; it reads "
                         "[T, B, F], or a table [T, N, F] with the batch's rows")
    if any(c.ndim != 2 or c.shape != carry[0].shape for c in carry):
        raise ValueError(f"native {cell} layer: a carry of shapes "
                         f"{[tuple(c.shape) for c in carry]}; pass [B, H] each")
    (batch, hidden), features = carry[0].shape, xs.shape[-1]
    width = gates * hidden
    wanted = {"kernel": (features, width), "recurrent": (hidden, width), "bias": (width,),
              "recurrent_bias": (width,)}
    for name, param in zip(names, params, strict=True):
        if tuple(param.shape) != wanted[name]:
            raise ValueError(
                f"native {cell} layer: {name} of shape {tuple(param.shape)}, where inputs of "
                f"{features} features and a carry of {hidden} units need {wanted[name]}")
    if xs.shape[0] == 0 or batch == 0:
        raise ValueError(f"native {cell} layer: inputs of shape {tuple(xs.shape)} and a carry "
                         f"of {batch} rows; pass at least one step and one row")


def _with_rows(layer: Callable[..., Any], cell: str, gates: int, names: tuple[str, ...]
               ) -> Callable[..., Any]:
    """``layer(xs, *params, *carry, rows)`` (a ``custom_vjp``) as ``call(xs, *params,
    *carry, rows=None)``, the parameters' shapes checked against the inputs and the carry
    (:func:`_check_shapes`; ``names``: the parameters'), rows checked and made the kernels'
    operand (:func:`_rows`)."""
    def call(xs: jax.Array, *args: jax.Array, rows: jax.Array | None = None) -> Any:
        params, carry = args[:len(names)], args[len(names):]
        _check_shapes(cell, gates, names, xs, params, carry)
        return layer(xs, *args, _rows(xs, rows, args[-1]))

    return call


def _final(layer_fwd: Callable[..., Any], layer_bwd: Callable[..., Any],
           last: Callable[..., tuple[jax.Array, ...]]) -> Callable[..., tuple[Any, ...]]:
    """A layer's final carry alone: ``final(*operands) -> (None, *carry)``, a ``custom_vjp``
    whose value is ``last(*operands)``, the forward call with results of the last step alone
    (``native_common.h``'s ``forward_steps``: no [T, B, ...] array written, as an evaluation
    needs none), and whose gradient is the layer's: ``layer_fwd`` then writes every step
    for ``layer_bwd``, which gets no cotangent of the outputs over time."""
    @jax.custom_vjp
    def final(*operands):
        return last(*operands)

    def final_fwd(*operands):
        outputs, residuals = layer_fwd(*operands)
        return outputs[1:], residuals

    def final_bwd(residuals, cotangents):
        return layer_bwd(residuals, (None, *cotangents))

    final.defvjp(final_fwd, final_bwd, symbolic_zeros=True)
    return lambda *operands: (None, *final(*operands))


@functools.cache
def elman_layer(lanes: int = LANES, final: bool = False
                ) -> Callable[..., tuple[jax.Array | None, jax.Array]]:
    """``layer(xs [T, B, F], kernel [F, H], recurrent [H, H], bias [H], h0 [B, H],
    rows=None) -> (hs [T, B, H], h_T [B, H])``, float32: ``rnnjax.cells.elman_layer`` with
    tanh, as one call of the forward pass and one of the backward (``dxs = dzs @ kernel^T``
    stays XLA's; where no gradient of the inputs is asked for, the kernel writes no dzs,
    :func:`_input_gradient`). With ``rows`` (int [B]), ``xs`` is a table [T, N, F] and the
    batch ``xs[:, rows]``, read by the kernels where it is (:func:`_rows`). With ``final``,
    ``(None, h_T)``: the outputs over time are not written (:func:`_final`). Registers the
    kernels (:func:`register`) when first traced."""
    from rnnjax import cells

    names = targets(lanes)

    def forward(xs, kernel, recurrent, bias, h0, rows, steps):
        register(lanes)
        hs = jax.ffi.ffi_call(names["RnnjaxElmanForward"],
                              jax.ShapeDtypeStruct((steps, *h0.shape), xs.dtype))(
            xs, kernel, bias, recurrent, h0, rows)
        return hs, hs[-1]

    @jax.custom_vjp
    def layer(xs, kernel, recurrent, bias, h0, rows):
        return forward(xs, kernel, recurrent, bias, h0, rows, xs.shape[0])

    def layer_fwd(xs, kernel, recurrent, bias, h0, rows):
        asked = _asked(xs)
        xs, kernel, recurrent, bias, h0, rows = cells._values(xs, kernel, recurrent, bias, h0,
                                                              rows)
        hs, h_last = forward(xs, kernel, recurrent, bias, h0, rows, xs.shape[0])
        return (hs, h_last), (xs, hs, kernel, recurrent, bias, h0, rows, asked)

    def layer_bwd(residuals, cotangents):
        xs, hs, kernel, recurrent, bias, h0, rows, asked = residuals
        dhs, dh_last = cells._dense(cotangents[0]), cells._dense(cotangents[1], h0)
        dzs, dh0, dkernel, drecurrent, dbias = _backward(
            names, "Elman", (_input_gradient(asked, hs, hs.shape[-1]),
                             *_like(h0, kernel, recurrent, bias)),
            xs, hs, dhs, h0, recurrent, dh_last, rows)
        return (_inputs_cotangent(asked, dzs, kernel, xs, rows), dkernel, drecurrent, dbias,
                dh0, None)

    layer.defvjp(layer_fwd, layer_bwd, symbolic_zeros=True)
    checked = functools.partial(_with_rows, cell="Elman", gates=1,
                                names=("kernel", "recurrent", "bias"))
    if final:
        return checked(_final(layer_fwd, layer_bwd,
                              lambda xs, *rest: forward(xs, *rest, 1)[1:]))
    return checked(layer)


@functools.cache
def gru_layer(lanes: int = LANES, final: bool = False
              ) -> Callable[..., tuple[jax.Array | None, jax.Array]]:
    """``layer(xs [T, B, F], kernel [F, 3H], bias [3H], recurrent [H, 3H],
    recurrent_bias [3H], h0 [B, H], rows=None) -> (hs [T, B, H], h_T [B, H])``, float32:
    ``rnnjax.cells.gru_layer`` as one call of the forward pass and one of the backward
    (``dxs = dus @ kernel^T`` stays XLA's; no dus where the inputs' gradient is not asked
    for, :func:`_input_gradient`). Between them the gates [T, B, 4 H'] and du
    [T, B, 3 H'] are kept with each gate's block padded to whole vectors (H' = H rounded up
    to a multiple of ``lanes``). ``rows`` and ``final`` as :func:`elman_layer`'s. Registers
    the kernels (:func:`register`) when first traced."""
    from rnnjax import cells

    names = targets(lanes)

    def forward(xs, kernel, bias, recurrent, recurrent_bias, h0, rows, steps):
        register(lanes)
        hs = jax.ShapeDtypeStruct((steps, *h0.shape), xs.dtype)
        gates = jax.ShapeDtypeStruct((steps, h0.shape[0], 4 * _rounded(h0.shape[-1], lanes)),
                                     xs.dtype)
        return jax.ffi.ffi_call(names["RnnjaxGruForward"], (hs, gates))(
            xs, kernel, bias, recurrent, recurrent_bias, h0, rows)

    @jax.custom_vjp
    def layer(xs, kernel, bias, recurrent, recurrent_bias, h0, rows):
        hs, _ = forward(xs, kernel, bias, recurrent, recurrent_bias, h0, rows, xs.shape[0])
        return hs, hs[-1]

    def layer_fwd(xs, kernel, bias, recurrent, recurrent_bias, h0, rows):
        asked = _asked(xs)
        xs, kernel, bias, recurrent, recurrent_bias, h0, rows = cells._values(
            xs, kernel, bias, recurrent, recurrent_bias, h0, rows)
        hs, gates = forward(xs, kernel, bias, recurrent, recurrent_bias, h0, rows,
                            xs.shape[0])
        return (hs, hs[-1]), (xs, hs, gates, kernel, recurrent, h0, rows, asked)

    def layer_bwd(residuals, cotangents):
        xs, hs, gates, kernel, recurrent, h0, rows, asked = residuals
        dhs, dh_last = cells._dense(cotangents[0]), cells._dense(cotangents[1], h0)
        padded_kernel = _padded(kernel, 3, lanes)
        bias = jax.ShapeDtypeStruct(kernel.shape[1:], xs.dtype)
        dus, dh0, dkernel, dbias, drecurrent, drecurrent_bias = _backward(
            names, "Gru", (_input_gradient(asked, hs, padded_kernel.shape[1]),
                           *_like(h0, kernel), bias, *_like(recurrent), bias),
            xs, hs, dhs, h0, gates, recurrent, dh_last, rows)
        return (_inputs_cotangent(asked, dus, padded_kernel, xs, rows), dkernel, dbias,
                drecurrent, drecurrent_bias, dh0, None)

    layer.defvjp(layer_fwd, layer_bwd, symbolic_zeros=True)
    checked = functools.partial(_with_rows, cell="GRU", gates=3,
                                names=("kernel", "bias", "recurrent", "recurrent_bias"))
    if final:
        return checked(_final(layer_fwd, layer_bwd,
                              lambda xs, *rest: (forward(xs, *rest, 1)[0][-1],)))
    return checked(layer)


@functools.cache
def lstm_layer(lanes: int = LANES, final: bool = False
               ) -> Callable[..., tuple[jax.Array | None, jax.Array, jax.Array]]:
    """``layer(xs [T, B, F], kernel [F, 4H], recurrent [H, 4H], bias [4H], h0 [B, H],
    c0 [B, H], rows=None) -> (hs [T, B, H], h_T, c_T [B, H])``, float32:
    ``rnnjax.cells.lstm_layer`` as one call of the forward pass and one of the backward
    (``dxs = dzs @ kernel^T`` stays XLA's; no dzs where the inputs' gradient is not asked
    for, :func:`_input_gradient`). Between them the gates with c_t and tanh(c_t)
    ([T, B, 6 H']) and dz ([T, B, 4 H']) are kept with each block padded to whole vectors
    (H' = H rounded up to a multiple of ``lanes``). ``rows`` and ``final`` as
    :func:`elman_layer`'s. Registers the kernels (:func:`register`) when first traced."""
    from rnnjax import cells

    names = targets(lanes)

    def forward(xs, kernel, recurrent, bias, h0, c0, rows, steps):
        register(lanes)
        hidden = h0.shape[-1]
        hs = jax.ShapeDtypeStruct((steps, *h0.shape), xs.dtype)
        gates = jax.ShapeDtypeStruct((steps, h0.shape[0], 6 * _rounded(hidden, lanes)),
                                     xs.dtype)
        hs, gates = jax.ffi.ffi_call(names["RnnjaxLstmForward"], (hs, gates))(
            xs, kernel, bias, recurrent, h0, c0, rows)
        start = 4 * gates.shape[-1] // 6  # c_T: block 4 of the last step's gates
        return hs, hs[-1], gates[-1, :, start : start + hidden], gates

    @jax.custom_vjp
    def layer(xs, kernel, recurrent, bias, h0, c0, rows):
        return forward(xs, kernel, recurrent, bias, h0, c0, rows, xs.shape[0])[:3]

    def layer_fwd(xs, kernel, recurrent, bias, h0, c0, rows):
        asked = _asked(xs)
        xs, kernel, recurrent, bias, h0, c0, rows = cells._values(
            xs, kernel, recurrent, bias, h0, c0, rows)
        hs, h_last, c_last, gates = forward(xs, kernel, recurrent, bias, h0, c0, rows,
                                            xs.shape[0])
        return (hs, h_last, c_last), (xs, hs, gates, kernel, recurrent, h0, c0, rows, asked)

    def layer_bwd(residuals, cotangents):
        xs, hs, gates, kernel, recurrent, h0, c0, rows, asked = residuals
        dhs = cells._dense(cotangents[0])
        dh_last, dc_last = cells._dense(cotangents[1], h0), cells._dense(cotangents[2], h0)
        padded_kernel = _padded(kernel, 4, lanes)
        dzs, dh0, dc0, dkernel, drecurrent, dbias = _backward(
            names, "Lstm", (_input_gradient(asked, hs, padded_kernel.shape[1]),
                            *_like(h0, c0, kernel, recurrent, kernel[0])),
            xs, hs, dhs, h0, c0, gates, recurrent, dh_last, dc_last, rows)
        return (_inputs_cotangent(asked, dzs, padded_kernel, xs, rows), dkernel, drecurrent,
                dbias, dh0, dc0, None)

    layer.defvjp(layer_fwd, layer_bwd, symbolic_zeros=True)
    checked = functools.partial(_with_rows, cell="LSTM", gates=4,
                                names=("kernel", "recurrent", "bias"))
    if final:
        return checked(_final(layer_fwd, layer_bwd,
                              lambda xs, *rest: forward(xs, *rest, 1)[1:3]))
    return checked(layer)
