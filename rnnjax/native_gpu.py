"""The Elman (tanh) layer's recurrence as Pallas kernels: the 'native' form on a GPU.

XLA runs a scanned recurrence as a few kernels a time step (the step's product, its tanh,
the backward's product and its elementwise op), each a launch: 28 rows at batch 1024 took
0.40 ms a train step fully unrolled on an NVIDIA H200, level with Flax's ``nn.RNN``
(2026-12-04, ``benchmarks/results/gpu/``). Here each pass over time is one kernel: a
program per block of :data:`BLOCK_ROWS` batch rows keeps its rows' state and the
recurrent kernel on chip and runs every step in a loop:

* forward: ``h_t = tanh(u_t + h_{t-1} @ R)`` for t = 1..T, writing ``hs [T, B, H]``, where
  ``us = xs @ kernel + bias`` is one product before it (XLA's);
* backward: ``dz_t = (dh_t + g_t) * (1 - h_t^2)``, ``g_{t-1} = dz_t @ R^T`` for t = T..1,
  writing ``dzs [T, B, H]``; the weight gradients are then one product each over all the
  steps (``h_{t-1}^T dz_t``, ``xs^T dzs``) and the inputs' ``dzs @ kernel^T``, XLA's.

The kernels are written for Triton (Pallas' GPU backend): every array a kernel loads or
stores has a power-of-2 size, so the hidden width is padded with zeros to a power of two
of at least 16 (a product's least side) and the batch to whole blocks; the padding stays
zero through both passes and is sliced off. The recurrent products run as three TF32
products on the tensor cores (:data:`PRECISION`: about float32's accuracy), not one: a
step's rounding carries through every later step, and one TF32 product a step, against
XLA's own TF32 rounding, could take the first step close to the tuner's tolerance (TF32
emulated on a CPU moved its gradients by up to 5.8e-4 of the 1e-3). Off a GPU (the tests,
on a CPU) the same kernels run in Pallas' interpreter, at float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

BLOCK_ROWS = 16  # batch rows per program: the least side of a Triton product
MIN_WIDTH = 16
# The widest padded hidden width the kernels take: a program holds the [W, W] recurrent
# kernel on chip (64 KB at 128; at 256 it would be 256 KB, all of an H100's or H200's
# registers and more than its shared memory).
MAX_WIDTH = 128
# The recurrent products on a GPU (Triton's tf32x3): float32's accuracy from TF32 products.
PRECISION = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def warps(wide: int) -> int:
    """Warps per program for a padded width: 4, and 8 at 128, where the [128, 128]
    recurrent kernel alone would take 128 registers a thread of 4 warps (of 255)."""
    return 4 if wide <= 64 else 8


def width(hidden: int) -> int:
    """The padded hidden width: the least power of two >= ``hidden`` and >= 16."""
    return max(MIN_WIDTH, 1 << max(0, hidden - 1).bit_length())


def fits(hidden: int) -> bool:
    """Whether the kernels take a layer of ``hidden`` units (:data:`MAX_WIDTH`)."""
    return width(hidden) <= MAX_WIDTH


def runs_here() -> bool:
    """Whether a 'native' layer runs these kernels (``rnnjax.cells``): on a GPU backend
    (elsewhere, ``rnnjax.native``'s C++ kernels)."""
    return jax.default_backend() == "gpu"


def plugin_installed() -> bool:
    """Whether a JAX GPU plugin is installed (``rnnjax.runtime.GPU_PLUGINS``): the run's
    backend may be a GPU. Known without starting the backend."""
    from rnnjax import runtime

    return runtime.installed(runtime.GPU_PLUGINS)


def interpreted() -> bool:
    """Whether the kernels run in Pallas' interpreter: everywhere but on a GPU."""
    return jax.default_backend() != "gpu"


def _forward_kernel(us_ref, recurrent_ref, h0_ref, hs_ref, *, precision=None):
    """One block of rows over every step: ``us [T, b, W]``, ``recurrent [W, W]``,
    ``h0 [b, W]`` -> ``hs [T, b, W]``; the products at ``precision``."""
    recurrent = recurrent_ref[...]

    def step(t, h):
        h = jnp.tanh(us_ref[t] + jnp.dot(h, recurrent, precision=precision))
        hs_ref[t] = h
        return h

    jax.lax.fori_loop(0, us_ref.shape[0], step, h0_ref[...])


def _backward_kernel(hs_ref, dhs_ref, dh_last_ref, transposed_ref, dzs_ref, dh0_ref, *,
                     precision=None):
    """One block of rows, the steps in reverse: ``hs [T, b, W]``, ``dhs [T, b, W]`` (None:
    the outputs have no gradient but the last step's), ``dh_last [b, W]``,
    ``recurrent^T [W, W]`` -> ``dzs [T, b, W]`` (the pre-activations' gradient) and
    ``dh0 [b, W]``."""
    transposed = transposed_ref[...]
    steps = hs_ref.shape[0]

    def step(i, g):
        t = steps - 1 - i
        if dhs_ref is not None:
            g = g + dhs_ref[t]
        h = hs_ref[t]
        dz = g * (1.0 - h * h)
        dzs_ref[t] = dz
        return jnp.dot(dz, transposed, precision=precision)

    dh0_ref[...] = jax.lax.fori_loop(0, steps, step, dh_last_ref[...])


def _backward_last_kernel(hs_ref, dh_last_ref, transposed_ref, dzs_ref, dh0_ref, *,
                          precision=None):
    """:func:`_backward_kernel` where only the last step's output has a gradient (the
    classifier reads h_T alone): no ``[T, B, W]`` of zeros to read."""
    _backward_kernel(hs_ref, None, dh_last_ref, transposed_ref, dzs_ref, dh0_ref,
                     precision=precision)


SEQUENCE, ROWS, WHOLE = "sequence", "rows", "whole"  # how an operand is blocked


def _call(kernel: Callable[..., None], operands: list[tuple[str, jax.Array]],
          outputs: list[tuple[str, jax.ShapeDtypeStruct]]) -> list[jax.Array]:
    """``kernel`` with one program per block of :data:`BLOCK_ROWS` rows, each operand and
    output blocked by its kind: :data:`SEQUENCE` ``[T, B', W]`` by rows, :data:`ROWS`
    ``[B', W]`` by rows, :data:`WHOLE` (a ``[W, W]`` matrix) whole to every program. On a
    GPU, its products at :data:`PRECISION`, :func:`warps` warps a program; interpreted
    elsewhere."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    time, rows, wide = next(x.shape for kind, x in operands if kind == SEQUENCE)
    specs = {SEQUENCE: pl.BlockSpec((time, BLOCK_ROWS, wide), lambda i: (0, i, 0)),
             ROWS: pl.BlockSpec((BLOCK_ROWS, wide), lambda i: (i, 0)),
             WHOLE: pl.BlockSpec((wide, wide), lambda i: (0, 0))}
    interpret = interpreted()
    body = functools.partial(kernel, precision=None if interpret else PRECISION)
    return pl.pallas_call(
        body, out_shape=[shape for _, shape in outputs], grid=(rows // BLOCK_ROWS,),
        in_specs=[specs[kind] for kind, _ in operands],
        out_specs=[specs[kind] for kind, _ in outputs], interpret=interpret,
        name=f"rnnjax{kernel.__name__.removesuffix('_kernel')}",
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=warps(wide),
                                                                    num_stages=1),
    )(*(x for _, x in operands))


def _pad(x: jax.Array, rows: int, wide: int) -> jax.Array:
    """``x [..., B, H]`` padded with zeros to ``[..., rows, wide]``."""
    pads = [(0, 0)] * (x.ndim - 2) + [(0, rows - x.shape[-2]), (0, wide - x.shape[-1])]
    return jnp.pad(x, pads)


@functools.cache
def elman_layer() -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``layer(xs [T, B, F], kernel [F, H], recurrent [H, H], bias [H], h0 [B, H]) -> (hs
    [T, B, H], h_T [B, H])``, float32: ``rnnjax.cells.elman_layer`` with tanh, each pass
    over time one Pallas kernel (the module docstring)."""
    from rnnjax import cells, native

    def forward(xs, kernel, recurrent, bias, h0):
        """The padded ``hs [T, B', W]``."""
        batch, hidden = h0.shape
        if not fits(hidden):
            raise native.NativeError(f"--backward native on a GPU: --hidden-size {hidden} pads to "
                              f"{width(hidden)} units, past the {MAX_WIDTH} whose recurrent "
                              "kernel the GPU kernels hold on chip; choose hand_written, "
                              "autodiff or auto")
        wide, rows = width(hidden), -(-batch // BLOCK_ROWS) * BLOCK_ROWS
        us = _pad(xs @ kernel + bias, rows, wide)
        return _call(_forward_kernel,
                     [(SEQUENCE, us), (WHOLE, _pad(recurrent, wide, wide)),
                      (ROWS, _pad(h0, rows, wide))],
                     [(SEQUENCE, jax.ShapeDtypeStruct(us.shape, us.dtype))])[0]

    def outputs(padded, h0):
        """``(hs, h_T)`` of the padded ``hs [T, B', W]``, for ``h0 [B, H]``."""
        hs = padded[:, :h0.shape[0], :h0.shape[1]]
        return hs, hs[-1]

    @jax.custom_vjp
    def layer(xs, kernel, recurrent, bias, h0):
        return outputs(forward(xs, kernel, recurrent, bias, h0), h0)

    def layer_fwd(xs, kernel, recurrent, bias, h0):
        asked = native._asked(xs)
        xs, kernel, recurrent, bias, h0 = cells._values(xs, kernel, recurrent, bias, h0)
        padded = forward(xs, kernel, recurrent, bias, h0)
        return outputs(padded, h0), (xs, padded, kernel, recurrent, h0, asked)

    def layer_bwd(residuals, cotangents):
        xs, padded, kernel, recurrent, h0, asked = residuals
        batch, hidden = h0.shape
        _, rows, wide = padded.shape
        dhs = cells._dense(cotangents[0])
        dh_last = _pad(cells._dense(cotangents[1], h0), rows, wide)
        results = [(SEQUENCE, jax.ShapeDtypeStruct(padded.shape, padded.dtype)),
                   (ROWS, jax.ShapeDtypeStruct((rows, wide), padded.dtype))]
        rest = [(ROWS, dh_last), (WHOLE, _pad(recurrent.T, wide, wide))]
        if dhs is None:
            dzs, dh0 = _call(_backward_last_kernel, [(SEQUENCE, padded), *rest], results)
        else:
            dzs, dh0 = _call(_backward_kernel, [(SEQUENCE, padded),
                                                (SEQUENCE, _pad(dhs, rows, wide)), *rest],
                             results)
        dzs = dzs[:, :batch, :hidden]
        previous = cells._previous(h0, padded[:, :batch, :hidden])
        drecurrent = jnp.einsum("tbi,tbj->ij", previous, dzs)
        dkernel = jnp.einsum("tbf,tbh->fh", xs, dzs)
        dxs = None if asked is None else dzs @ kernel.T
        return dxs, dkernel, drecurrent, dzs.sum((0, 1)), dh0[:batch, :hidden]

    layer.defvjp(layer_fwd, layer_bwd, symbolic_zeros=True)
    return layer
