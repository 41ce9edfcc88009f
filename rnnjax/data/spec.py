"""What the model must know of a dataset: its image shape and its number of classes.

Every source yields a :class:`DataSpec` with its arrays (IDX files: 28x28x1, ten classes;
a prepared tfds dataset: its image feature's shape and its ``ClassLabel``). The model is
built from it (``rnnjax.model.make_model``), checkpoints record it, and
:meth:`DataSpec.sequence` says how an order reads an image as a sequence:

* ``rows``: T = H steps of F = W*C features (a row of pixels, channels interleaved);
* ``pixels`` and ``permuted``: T = H*W steps of F = C features (one pixel, all channels);
* one registered in ``rnnjax.orders.ORDERS``: the T x F positions its function gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rnnjax import orders
from rnnjax.config import ConfigError

# The longest sequence rnnjax scans. Each step is a dependent matrix product and the
# backward pass keeps every step's activations: 16,384 steps (a 128x128 image by pixels)
# is already hours of training per epoch on one CPU.
MAX_TIME_STEPS = 16384


@dataclass(frozen=True)
class DataSpec:
    """Images ``[H, W, C]`` uint8 and ``num_classes`` integer labels ``0 .. num_classes-1``."""

    image_shape: tuple[int, int, int] = (28, 28, 1)
    num_classes: int = 10

    def sequence(self, order: str) -> tuple[int, int]:
        """``(T, F)``: time steps and features per step of an image read in ``order``
        (``rnnjax.orders.shape``: ConfigError naming the fix for an order not known)."""
        return orders.shape(order, self.image_shape)

    def describe(self) -> str:
        h, w, c = self.image_shape
        return f"{h}x{w}x{c} images, {self.num_classes} classes"

    def check_order(self, order: str) -> None:
        """Raise :class:`ConfigError` when the image is too long a sequence for ``order``."""
        steps, features = self.sequence(order)
        h, w, c = self.image_shape
        if steps > MAX_TIME_STEPS:
            fix = (f"use --order rows ({h} steps of {w * c})" if order != "rows"
                   else "resize the images to fewer rows")
            raise ConfigError(
                f"--order {order}: {h}x{w}x{c} images are {steps} time steps of {features}, "
                f"more than the {MAX_TIME_STEPS} rnnjax scans; {fix}"
            )

    def to_json(self) -> dict[str, Any]:
        return {"image_shape": list(self.image_shape), "num_classes": self.num_classes}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> DataSpec:
        h, w, c = (int(v) for v in value["image_shape"])
        return cls((h, w, c), int(value["num_classes"]))


# The IDX (MNIST) layout: 28x28 grey images, labels 0-9.
IDX_SPEC = DataSpec((28, 28, 1), 10)
