"""The tensorflow-datasets side: an offline builder over verified IDX files, and tf.data.

The official tfds ``mnist`` builder checks the *compressed* files' SHA-256 and refuses any
recompressed copy, even one whose content is byte-exact. rnnjax does not patch tfds;
it registers a small builder of its own, ``rnnjax_idx``, one config per dataset, that reads
the four IDX files from a manual directory with rnnjax's strict reader (content MD5s for
MNIST), keeps the files' example order (``disable_shuffling``) and writes a standard tfds
dataset once into the tfds data dir. Later runs reuse it; tfds writes into a temporary
directory and renames it when complete, so an interrupted build is redone, not reused.

Importing this module imports TensorFlow (CPU only: it is hidden from any GPU so that JAX
keeps the accelerator). Training never needs it unless ``--source tfds`` is asked for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from rnnjax.data.idx import Arrays, load_idx_dir
from rnnjax.data.pipeline import PIXEL_SCALE

tf.config.set_visible_devices([], "GPU")

BUILD_VERSION = "1.0.0"


class RnnjaxIdx(tfds.core.GeneratorBasedBuilder):
    """A 28x28 ten-class IDX dataset (MNIST layout), built offline from a manual dir."""

    VERSION = tfds.core.Version(BUILD_VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        BUILD_VERSION: "IDX files verified by content, original example order."
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = "The four IDX files (train/t10k images/labels)."

    def __init__(self, *, checksums: dict[str, str] | None = None, **kwargs):
        self._checksums = checksums
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="28x28 grayscale digits read from IDX files by rnnjax.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        arrays = load_idx_dir(Path(dl_manager.manual_dir), self._checksums)
        return {
            "train": self._generate_examples(arrays.train_images, arrays.train_labels),
            "test": self._generate_examples(arrays.test_images, arrays.test_labels),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image[:, :, None], "label": int(label)}


def config_name(name: str, directory: Path) -> str:
    """One tfds config per dataset: its name, plus a hash of the directory it came from."""
    digest = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() else "_" for c in name.lower())
    return f"{safe}_{digest}"


def prepare(
    name: str, directory: Path, checksums: dict[str, str] | None, tfds_dir: str = ""
) -> tfds.core.DatasetBuilder:
    """The ``rnnjax_idx`` builder for ``directory``, prepared (built once, then reused)."""
    config = tfds.core.BuilderConfig(name=config_name(name, directory),
                                     description=f"{name} from {directory}")
    builder = RnnjaxIdx(config=config, data_dir=tfds_dir or None, checksums=checksums)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(directory))
    )
    return builder


def load_arrays(
    name: str, directory: Path, checksums: dict[str, str] | None, tfds_dir: str = ""
) -> Arrays:
    """The whole dataset through tfds, as the IDX reader returns it."""
    builder = prepare(name, directory, checksums, tfds_dir)
    out = []
    for split in ("train", "test"):
        images, labels = tfds.as_numpy(
            builder.as_dataset(split=split, batch_size=-1, as_supervised=True,
                               shuffle_files=False)
        )
        out += [images[..., 0], labels.astype(np.int32)]
    return Arrays(*out)


def train_batches(
    name: str,
    directory: Path,
    checksums: dict[str, str] | None,
    tfds_dir: str,
    batch_size: int,
    *,
    start_step: int = 0,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The tf.data training feed: endless ``(float32 [B, 28, 28], int32 [B])`` batches.

    In order (the default) it yields exactly ``data.pipeline.host_batches``' batches: one
    continuous stream that wraps after the last example. Shuffled, it uses tf.data's
    seeded full-buffer shuffle, reshuffled each epoch (deterministic for a seed, but not
    the same order as the device feed's). ``start_step`` skips that many batches.
    """
    builder = prepare(name, directory, checksums, tfds_dir)
    ds = builder.as_dataset(split="train", as_supervised=True, shuffle_files=False)
    if shuffle:
        size = builder.info.splits["train"].num_examples
        ds = ds.shuffle(size, seed=seed, reshuffle_each_iteration=True)
    table = tf.constant(PIXEL_SCALE)
    ds = ds.repeat().batch(batch_size, drop_remainder=True).skip(start_step)
    ds = ds.map(
        lambda x, y: (tf.gather(table, tf.cast(x[..., 0], tf.int32)), tf.cast(y, tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
