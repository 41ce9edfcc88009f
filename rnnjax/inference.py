"""Using a checkpoint: load it, evaluate it on a test set, classify image files.

The functions named ``*_logits`` are pure (jit them where used); :func:`load` reads files.
Images reach the model exactly as in training: uint8 pixels through
``data.pipeline.normalize_host``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnnjax import checkpoint, memory, probes, train
from rnnjax.config import Config, ConfigError
from rnnjax.data.pipeline import normalize_host
from rnnjax.data.spec import DataSpec
from rnnjax.model import Model, evaluates_natively, evaluation_model, make_model
from rnnjax.optim import make_optimizer


@dataclass(frozen=True)
class Loaded:
    """A restored checkpoint and the model it describes."""

    config: Config
    state: train.TrainState
    model: Model
    step_dir: Path
    note: str = ""  # how this machine runs it otherwise than the run did (:func:`model_config`)

    @property
    def step(self) -> int:
        return int(np.asarray(self.state.step))

    @property
    def spec(self) -> DataSpec:
        """The images and classes the model reads."""
        return DataSpec(self.model.image_shape, self.model.num_classes)


def model_config(config: Config) -> tuple[Config, str]:
    """``config`` as eval and predict build its model here, and a note where that is not as
    the run evaluated. A 'native' checkpoint's evaluations run XLA's hand-written form
    where its own did (``--no-eval-native``, a GPU: ``model.evaluation_model``) and where
    the native kernels cannot be built (no C++ compiler): its parameters are the same in
    every form, so reading it needs no compiler (one was required, and the refusal named
    ``--backward``, a flag eval and predict do not have)."""
    from rnnjax import native

    if config.backward != "native":
        return config, ""
    xla = config.replace(backward="hand_written")
    if not evaluates_natively(config):
        return xla, ""
    reason = native.unavailable()
    if reason is None:
        return config, ""
    return xla, (f"run in XLA's hand-written form, not the native kernels its run "
                 f"evaluated with ({reason}); the same parameters, its sums may round apart "
                 "in the last digits")


def state_shapes(config: Config, spec: DataSpec | None = None) -> tuple[Any, Model]:
    """The shapes, dtypes and placement (the default device) of a new state of ``config``
    (the loop's initialisation, traced, not run: ``jax.ShapeDtypeStruct`` leaves, the
    restore target of a checkpoint) and its model (for the images and classes of
    ``spec``; default: the IDX layout). :class:`memory.OutOfMemory` first when the state
    alone would not fit (:func:`check_memory` checks the images beside it). (Running the
    initialisation, as this did, compiled it and drew the orthogonal kernels: 1-1.5 s of
    every eval and predict.)"""
    from rnnjax.loop import initial_state

    model = make_model(config, spec)
    optimizer = make_optimizer(config, check=False)  # its run took the options
    need = memory.estimate(config, model, optimizer, spec or DataSpec(model.image_shape,
                                                                      model.num_classes),
                           training=False, test_examples=1)  # the images: check_memory
    memory.check_fits(need, what=f"the checkpoint's {config.cell} {config.hidden_size} model")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(functools.partial(initial_state, model, optimizer),
                            np.int64(config.seed))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        shapes), model


def load(path: Path | str) -> Loaded:
    """The checkpoint ``path`` names (a step directory, or a workdir: its latest, also
    while a run still trains there: :func:`checkpoint.read_latest`)."""
    return checkpoint.read_latest(path, _load_step)


def _load_step(step_dir: Path) -> Loaded:
    meta = checkpoint.read_meta(step_dir)
    config = checkpoint.read_config(step_dir, meta)
    here, note = model_config(config)
    spec = checkpoint.data_spec(meta, config)
    try:
        target, model = state_shapes(here, spec)
    except ConfigError as e:  # its cell or optimizer not made here: not a flag given
        raise ConfigError(f"checkpoint {step_dir}: its {e}") from None
    state = checkpoint.restore(step_dir, target, meta)  # another layout named first
    probes.check(meta, here, spec, model.param_shapes(), step_dir, kinds=("cell", "order"))
    return Loaded(config, state, evaluation_model(here, model), step_dir, note)


def batched_logits(params: Any, images: jax.Array, *, model: Model, chunk: int) -> jax.Array:
    """Logits float32 [N, C] of images float32 [N, H, W(, C)], ``chunk`` at a time."""
    n = images.shape[0]
    chunk = max(1, min(chunk, n))
    pad = -n % chunk
    padded = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
    logits = jax.lax.map(lambda x: model.apply(params, x),
                         padded.reshape(-1, chunk, *images.shape[1:]))
    return logits.reshape(n + pad, -1)[:n]


def check_images(spec: DataSpec, images: np.ndarray) -> None:
    """A ValueError, naming what the model reads, for images that are not uint8 pixels of
    ``spec``'s shape ``[N, H, W(, C)]`` (others would index the pixel table wrongly or
    not at all)."""
    h, w, c = spec.image_shape
    if images.dtype != np.uint8:
        raise ValueError(
            f"images of dtype {images.dtype}: the model reads uint8 pixels 0..255; convert "
            "them first (floats in [0, 1]: np.rint(x * 255).astype(np.uint8))"
        )
    shapes = [(h, w, c)] + ([(h, w)] if c == 1 else [])
    if images.ndim < 2 or images.shape[1:] not in shapes:
        wanted = " or ".join("[N, " + ", ".join(map(str, s)) + "]" for s in shapes)
        raise ValueError(f"images of shape {list(images.shape)}: the model reads {wanted}")


def check_memory(loaded: Loaded, examples: int, chunk: int) -> None:
    """:class:`memory.OutOfMemory` (one line, with the fix) where evaluating ``examples``
    images ``chunk`` at a time would not fit beside the loaded state (which the memory
    available already leaves out): the images as float32 with their copy padded to whole
    chunks, and a chunk's activations (``memory.estimate``; the checkpoint's own
    ``eval_batch_size`` could be far larger than the images)."""
    config = loaded.config.replace(eval_batch_size=chunk)
    need = dataclasses.replace(
        memory.estimate(config, loaded.model,
                        make_optimizer(config, check=False), loaded.spec,
                        examples=examples, training=False, test_examples=examples),
        parameters=0, optimizer=0)  # loaded already: in use
    if need.activations > need.dataset and chunk > 1:
        fix = f"pass a smaller --eval-batch-size than {chunk}"
    else:
        fix = ("evaluate fewer images at a time (rnnjax predict: fewer IMAGE files; in "
               "Python, inference.evaluate or inference.probabilities on parts of them)")
    memory.check_fits(need, what=f"evaluating {examples} images with the checkpoint's "
                      f"{config.cell} {config.hidden_size} model beside it", fix=fix)


def logits_of(loaded: Loaded, images: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Logits float32 [N, C] of uint8 images [N, H, W(, C)] (:func:`check_images`),
    ``chunk`` at a time (default: the checkpoint's ``eval_batch_size``); none for none."""
    images = np.asarray(images)
    check_images(loaded.spec, images)
    return _logits(loaded, images, chunk)


def _logits(loaded: Loaded, images: np.ndarray, chunk: int | None) -> np.ndarray:
    """:func:`logits_of` of images already checked."""
    n = images.shape[0]
    if n == 0:
        return np.zeros((0, loaded.model.num_classes), np.float32)
    chunk = min(chunk or loaded.config.eval_batch_size, n)
    check_memory(loaded, n, chunk)
    fn = jax.jit(functools.partial(batched_logits, model=loaded.model, chunk=chunk))
    return np.asarray(fn(loaded.state.params, jnp.asarray(normalize_host(images))))


def probabilities(loaded: Loaded, images: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Class probabilities float32 [N, C] of uint8 images [N, H, W(, C)] (:func:`logits_of`)."""
    return np.asarray(jax.nn.softmax(logits_of(loaded, images, chunk), axis=-1))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """``matrix[true, predicted]``: int64 [C, C] counts."""
    flat = np.asarray(labels, np.int64) * classes + np.asarray(predictions, np.int64)
    return np.bincount(flat, minlength=classes * classes).reshape(classes, classes)


@dataclass(frozen=True)
class Evaluation:
    """Test-set results of a checkpoint."""

    loss: float
    accuracy: float
    confusion: np.ndarray  # int64 [C, C], rows true, columns predicted

    def per_class(self) -> list[tuple[int, int, int, float]]:
        """``(class, examples, correct, accuracy)`` per class."""
        rows = []
        for c in range(self.confusion.shape[0]):
            total, correct = int(self.confusion[c].sum()), int(self.confusion[c, c])
            rows.append((c, total, correct, correct / total if total else float("nan")))
        return rows

    def table(self) -> str:
        """The per-class accuracy table, one line per class and a total."""
        lines = ["class  examples  correct  accuracy"]
        for c, total, correct, accuracy in self.per_class():
            lines.append(f"{c:>5}  {total:>8}  {correct:>7}  {accuracy:>8.4f}")
        total, correct = int(self.confusion.sum()), int(np.trace(self.confusion))
        lines.append(f"{'all':>5}  {total:>8}  {correct:>7}  {self.accuracy:>8.4f}")
        return "\n".join(lines) + "\n"


def check_labels(labels: np.ndarray, examples: int, classes: int) -> None:
    """A ValueError, naming the problem, unless ``labels`` are ``examples`` integers
    (:func:`rnnjax.train.check_labels`), at least one, each a class in ``[0, classes)``."""
    train.check_labels(labels, examples, classes)
    if examples == 0:
        raise ValueError("no images to evaluate: give at least one image and its label")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise ValueError(f"labels from {low} to {high}: the model has {classes} classes, "
                         f"0 to {classes - 1}")


def evaluate(loaded: Loaded, images: np.ndarray, labels: np.ndarray,
             chunk: int | None = None) -> Evaluation:
    """Loss, accuracy and confusion matrix on uint8 images [N, H, W(, C)], int labels [N]
    (:func:`check_labels`), ``chunk`` images at a time (:func:`logits_of`)."""
    images, labels = np.asarray(images), np.asarray(labels)
    check_images(loaded.spec, images)
    check_labels(labels, images.shape[0], loaded.model.num_classes)
    logits = _logits(loaded, images, chunk)
    labels = labels.astype(np.int32)
    loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
    predictions = logits.argmax(axis=-1)
    confusion = confusion_matrix(labels, predictions, loaded.model.num_classes)
    return Evaluation(loss, float((predictions == labels).mean()), confusion)
