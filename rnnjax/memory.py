"""Does a run fit in memory? An estimate before anything is allocated, and one line if not.

:func:`estimate` sizes what training holds on each device without allocating any of it:
parameters and optimizer state (``jax.eval_shape`` of the state: exact), gradients (one
more copy of the parameters), the activations the backward pass keeps for one batch (the
residuals of ``jax.vjp`` of the loss, also from ``eval_shape``), the forward pass of one
evaluation chunk, and the dataset placed on the device as float32. :func:`check_fits`
compares that with what the device has free (``Device.memory_stats()`` where the backend
reports it, as on GPU and TPU; else the host's available RAM, which CPU devices share)
and raises :class:`OutOfMemory`, a :class:`~rnnjax.config.ConfigError`: one line, the
size asked, the memory available and the fix, before anything is written.

The estimate can fall short of what XLA really allocates; an allocation that fails anyway
is turned into the same kind of line by :func:`out_of_memory_message`
(``rnnjax.cli`` catches it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rnnjax import train
from rnnjax.config import Config, ConfigError
from rnnjax.data.spec import DataSpec
from rnnjax.model import Model


class OutOfMemory(ConfigError):
    """A model, batch or dataset too large for the device; the message says the fix."""


def human(n: float) -> str:
    """Bytes for people: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) in ``tree``; a typed random key's are
    its key data's (an optimizer's state may hold one: ``noisy_sgd``)."""
    def nbytes(x: Any) -> int:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.eval_shape(jax.random.key_data, x)
        return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize

    return sum(nbytes(x) for x in jax.tree.leaves(tree))


@dataclass(frozen=True)
class Estimate:
    """Bytes one device holds at the peak of training (or of evaluation)."""

    parameters: int
    optimizer: int
    gradients: int
    activations: int  # of one training batch on this device (or one evaluation chunk)
    dataset: int
    batch: int  # the batch (or chunk) rows the activations are for

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer + self.gradients + self.activations \
            + self.dataset

    def parts(self) -> str:
        named = [("parameters", self.parameters), ("optimizer state", self.optimizer),
                 ("gradients", self.gradients),
                 (f"activations of {self.batch} examples", self.activations),
                 ("dataset", self.dataset)]
        return ", ".join(f"{name} {human(size)}" for name, size in named if size)

    def fix(self) -> str:
        """What to change, the largest part first."""
        model = self.parameters + self.optimizer + self.gradients
        fixes = {
            "a smaller --hidden-size or --num-layers": model,
            "a smaller --batch-size or --eval-batch-size": self.activations,
            "a smaller dataset (e.g. --train-split 'train[:50%]' with --source tfds)":
                self.dataset,
        }
        order = sorted(fixes, key=fixes.get, reverse=True)
        return "use " + ", or ".join(order[:2])


def abstract_state(model: Model, optimizer: optax.GradientTransformation) -> train.TrainState:
    """The train state's shapes and dtypes, nothing allocated (the key too: made outside,
    it was two programs compiled and run, ~0.04 s of every run)."""
    return jax.eval_shape(lambda: train.create_state(jax.random.key(0), model, optimizer))


def _image_shape(spec: DataSpec) -> tuple[int, ...]:
    h, w, c = spec.image_shape
    return (h, w) if c == 1 else (h, w, c)


def training_activations(model: Model, params: Any, spec: DataSpec, batch: int) -> int:
    """Bytes the backward pass keeps for a batch of ``batch`` examples: the residuals of
    ``jax.vjp`` of the loss that grow with the batch (those that do not are the
    parameters themselves, counted apart), and the batch."""

    def residual_bytes(rows: int) -> int:
        images = jax.ShapeDtypeStruct((rows, *_image_shape(spec)), jnp.float32)
        labels = jax.ShapeDtypeStruct((rows,), jnp.int32)

        def residuals(params, images, labels):
            return jax.vjp(lambda p: train.loss_fn(p, model, images, labels)[0], params)[1]

        return tree_bytes(jax.eval_shape(residuals, params, images, labels)) \
            + tree_bytes((images, labels))

    return residual_bytes(2 * batch) - residual_bytes(batch)


def evaluation_activations(model: Model, params: Any, spec: DataSpec, chunk: int,
                           examples: int | None = None) -> int:
    """Bytes an evaluation in chunks of ``chunk`` keeps (float32) beside the test set's
    sequences (``examples`` of them, where known; ``train.evaluate_sequences``):

    * inputs: a chunk's own ``[T, chunk, F]``, twice, where it is a slice of the set, and
      where ``chunk`` does not divide the set, its padded copy;
    * a step's carries and gate pre-activations: 3 rows of the gates' width (the first
      layer's parameters over its inputs, hidden units and bias: H for the Elman cells,
      4H for the LSTM, 3H for the GRU, both directions), and the logits;
    * where layers feed layers, every step's outputs ``[T, chunk, width]`` of one layer (of
      three where bidirectional: each direction's and their concatenation; one more from
      the third layer on);
    * scanned ``u`` > 1 steps at a time (``model.unroll``; 0 is all ``T``), the gates' input
      products of those ``u`` steps, which XLA schedules ahead of the recurrent chain (the
      seed's chunk fully unrolled: 57 MiB where unroll 1 plans 5.7), or those steps' inputs
      where they are wider (a few hidden units);
    * computing in another dtype than float32, one float32 ``[T, chunk, F]`` more (the
      inputs' casts).

    Fitted to XLA's own plan (``memory_analysis``) on XLA:CPU, jax 0.10.2: within
    0.97-2.1x of it for the three cells at hidden 16-256, 1-3 layers, either direction and
    order (75 shapes, chunks slices of the set); the seed's chunk of the whole test set
    5.7 MiB alike. Fully unrolled, at unroll 4 and in bfloat16 within 1.0-1.5x (until
    2026-12-06 those read 0.1-0.5x: a run the estimate let through could fail to allocate).
    """
    steps, features = spec.sequence(model.order)
    hidden = model.cell.hidden_size
    width = hidden * (2 if model.bidirectional else 1)
    gates = max(width, sum(math.prod(x.shape) for x in jax.tree.leaves(params["rnn"][0]))
                // (features + hidden + 1))
    layers = model.num_layers
    outputs = (steps * width * (1 + 2 * model.bidirectional + (layers > 2))
               if layers > 1 else 0)
    sliced = examples is None or chunk < examples
    padded = examples + -examples % chunk if examples and examples % chunk else 0
    unrolled = steps if model.unroll == 0 else min(model.unroll, steps)
    ahead = max(gates, features) * unrolled if unrolled > 1 else 0
    cast = steps * features if jnp.dtype(model.compute_dtype) != jnp.float32 else 0
    return 4 * (chunk * (3 * gates + model.num_classes + outputs + ahead + cast
                         + 2 * steps * features * sliced) + steps * features * padded)


def traceable(model: Model) -> Model:
    """``model`` to estimate from, tracing no native layer (whose kernels register when
    traced: that starts the backend and builds them): its hand-written form, which keeps
    the same activations for the backward pass."""
    if model.backward != "native":
        return model
    return dataclasses.replace(model, backward="hand_written")


def estimate(
    config: Config, model: Model, optimizer: optax.GradientTransformation, spec: DataSpec,
    *, examples: int = 0, devices: int = 1, training: bool = True,
    test_examples: int | None = None,
) -> Estimate:
    """What one of ``devices`` devices holds: the state, and the larger of a training
    batch's activations (with the gradients) and an evaluation chunk's (of at most
    ``test_examples``, where the test set's size is known); ``examples`` images on the
    device as float32 (and their labels)."""
    model = dataclasses.replace(model, mesh=None)  # one device's rows, traced as one
    state = abstract_state(model, optimizer)
    params, opt = tree_bytes(state.params), tree_bytes(state.opt_state)
    chunk = -(-min(config.eval_batch_size, test_examples or config.eval_batch_size)
              // devices)
    evaluated = model if config.eval_unroll < 0 else dataclasses.replace(
        model, unroll=config.eval_unroll)  # the evaluations' unroll (model.evaluation_model)
    evaluation = evaluation_activations(
        evaluated, state.params, spec, chunk,
        None if test_examples is None else -(-test_examples // devices))
    grads, batch, acts = 0, chunk, evaluation
    if training:
        batch = max(1, config.batch_size // devices)
        acts = training_activations(model, state.params, spec, batch)
        grads = params
        if evaluation > acts + grads:
            grads, batch, acts = 0, chunk, evaluation
    dataset = examples * (4 * math.prod(spec.image_shape) + 4)
    return Estimate(params, opt, grads, acts, dataset, batch)


def available(device: jax.Device | None = None) -> tuple[int, str, bool]:
    """``(bytes free, where, per device)``: the device's own memory where its backend
    reports it (GPU, TPU), else the host's available RAM (CPU devices share it)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and stats.get("bytes_limit"):
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return free, f"{device.platform}:{device.id} has {human(free)} free", True
    return host_room()


def host_room() -> tuple[int, str, bool]:
    """:func:`available` for CPU devices, which share the host's RAM: known without
    starting the backend."""
    free = host_available()
    return free, f"the host has {human(free)} of RAM available", False


def host_available() -> int:
    """Bytes of RAM the host can still give (Linux ``MemAvailable``; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62  # unknown: do not refuse


def check_fits(need: Estimate, devices: int = 1, what: str = "the run",
               room: tuple[int, str, bool] | None = None, fix: str | None = None) -> None:
    """Raise :class:`OutOfMemory` when ``need`` (per device, on each of ``devices`` local
    devices) is more than the memory available (``room``, default :func:`available`: each
    device's own where it says so, else the host's RAM, which the devices share and are
    charged together); its message ends with ``fix`` (default: :meth:`Estimate.fix`, a
    run's flags)."""
    free, where, per_device = available() if room is None else room
    total = need.total if per_device else need.total * devices
    if total <= free:
        return
    parts = need.parts()
    if devices == 1:
        each = ""
    elif per_device:  # each device's own memory
        each = f" on each of {devices} devices"
    else:  # CPU devices: the host's RAM, shared; the parts are each device's
        each, parts = f" for its {devices} devices together", f"each: {parts}"
    raise OutOfMemory(
        f"{what} needs about {human(total)} of memory{each} ({parts}) but {where}; "
        f"{fix or need.fix()}"
    )


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation (XLA's RESOURCE_EXHAUSTED, NumPy's)."""
    if isinstance(error, MemoryError):
        return True
    if type(error).__name__ not in ("XlaRuntimeError", "JaxRuntimeError"):
        return False
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def out_of_memory_message(error: BaseException) -> str:
    """One line for a failed allocation: the size asked, what is available, the fix."""
    asked = re.search(r"allocat\w* (\d+) bytes", str(error))
    size = f"{human(int(asked.group(1)))} ({asked.group(1)} bytes)" if asked else "memory"
    _, where, _ = available()
    return (f"out of memory: the run asked for {size} but {where}; use a smaller "
            "--hidden-size, --num-layers, --batch-size or --eval-batch-size (files already "
            "written are kept)")
