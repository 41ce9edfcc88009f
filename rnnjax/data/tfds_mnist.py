"""The tensorflow-datasets side: an offline builder over verified IDX files, and tf.data.

The official tfds ``mnist`` builder checks the *compressed* files' SHA-256 and refuses any
recompressed copy, even one whose content is byte-exact. rnnjax does not patch tfds;
it registers a small builder of its own, ``rnnjax_idx``, one config per dataset, that reads
the four IDX files from a manual directory with rnnjax's strict reader (content MD5s for
MNIST), keeps the files' example order (``disable_shuffling``) and writes a standard tfds
dataset once into the tfds data dir. Later runs reuse it; tfds writes into a temporary
directory and renames it when complete, so an interrupted build is redone, not reused.
The config is keyed by the files' content as well as their directory: files replaced in
place get a build of their own, never the stale one. A tfds dir that cannot be written is
a :class:`~rnnjax.config.ConfigError` naming it (a finished build there is only read).

Importing this module imports TensorFlow (CPU only: it is hidden from any GPU so that JAX
keeps the accelerator). Training never needs it unless ``--source tfds`` is asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from google.protobuf import json_format

from rnnjax.config import ConfigError
from rnnjax.data.idx import FILES, Arrays, IdxError, find_file, load_idx_dir
from rnnjax.data.pipeline import PIXEL_SCALE

tf.config.set_visible_devices([], "GPU")

BUILD_VERSION = "1.0.0"


@contextlib.contextmanager
def own_temporaries() -> Iterator[None]:
    """Temporary files and directories made inside (``tempfile``'s) go into one directory
    of this process's, removed on the way out. tfds (4.9) makes an empty temporary
    directory for every builder of a dataset not prepared in its data dir
    (``DatasetInfo.initialize_from_bucket``: ``mkdtemp`` before it finds its bucket off)
    and never removes it: one left in /tmp by every ``--source tfds`` run of IDX files, as
    it looks up the catalog dataset of that name first. For the making of builders only:
    ``tempfile.tempdir`` is the process's, and rnnjax makes them on the caller's thread.
    Where no temporary directory can be made, tfds fares as it would have (a prepared
    dataset needs none); so too where it may read its bucket (its GCS access turned on),
    whose metadata a builder then keeps reading from that directory."""
    saved, scratch = tempfile.tempdir, None
    if getattr(tfds.core.utils.gcs_utils, "_is_gcs_disabled", True):
        with contextlib.suppress(OSError):
            scratch = tempfile.mkdtemp(prefix="rnnjax-tfds-")
    if scratch is None:
        yield
        return
    tempfile.tempdir = scratch
    try:
        yield
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(scratch, ignore_errors=True)


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


def content_digest(directory: Path, checksums: dict[str, str] | None = None) -> str:
    """A hash of what a build is made from: the four files' raw bytes (as found, gzip or
    not), any ``MD5SUMS(.raw)`` file and the expected checksums. Cheap next to a build."""
    digest = hashlib.sha1()
    for stem in FILES.values():
        path = find_file(directory, stem)
        try:
            with path.open("rb") as f:
                file_hash = hashlib.file_digest(f, "sha1").digest()
        except OSError as e:
            raise IdxError(f"{path}: cannot read ({e.strerror or e})") from e
        digest.update(path.name.encode() + b"\0" + file_hash)
    for name in ("MD5SUMS.raw", "MD5SUMS"):
        path = directory / name
        if path.is_file():
            try:
                digest.update(name.encode() + b"\0" + path.read_bytes())
            except OSError as e:
                raise IdxError(f"{path}: cannot read ({e.strerror or e})") from e
    digest.update(json.dumps(sorted((checksums or {}).items())).encode())
    return digest.hexdigest()[:12]


def config_name(name: str, directory: Path, checksums: dict[str, str] | None = None) -> str:
    """One tfds config per dataset: its name, a hash of the directory it came from and
    :func:`content_digest` (so replacing the files in place rebuilds, never reuses)."""
    where = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() else "_" for c in name.lower())
    return f"{safe}_{where}_{content_digest(directory, checksums)}"


# A prepared dataset's metadata tfds cannot read: missing, or not JSON (its dataset_info.json
# or features.json emptied or cut short, as by a full disk or an interrupted copy).
DAMAGED_INFO = (json_format.ParseError, json.JSONDecodeError,
                getattr(tfds.core.dataset_info, "DatasetInfoFileError", FileNotFoundError))


def _finished(data_dir: Path) -> bool:
    """tfds renames a build into place with its ``dataset_info.json``, only once complete
    (one that is not a JSON object was damaged since). Another error reading it (too many
    files open, EIO) is raised: a build is never taken for unfinished, and removed, on a
    read that failed."""
    try:
        info = json.loads((data_dir / "dataset_info.json").read_text())
    except (FileNotFoundError, ValueError):  # ValueError: not JSON, or not UTF-8
        return False
    return isinstance(info, dict) and bool(info)


def _build_dir(config: tfds.core.BuilderConfig, tfds_dir: str) -> Path:
    """Where tfds keeps the build of ``config`` (``RnnjaxIdx(...).data_dir``, known without
    the builder, which reads its metadata when made)."""
    root = Path(tfds_dir or tfds.core.constants.DATA_DIR).expanduser()
    return root / RnnjaxIdx.name / config.name / BUILD_VERSION


def _builder_of(config: tfds.core.BuilderConfig, tfds_dir: str,
                checksums: dict[str, str] | None) -> RnnjaxIdx:
    """``RnnjaxIdx`` of ``config``; a finished build whose metadata parses but is not what
    tfds wrote (its fields, or its features, damaged since) is removed and made again."""
    try:
        return _new_builder(config, tfds_dir, checksums)
    except (json_format.ParseError, json.JSONDecodeError, AssertionError):
        build = _build_dir(config, tfds_dir)
        if not build.exists():
            raise
        shutil.rmtree(build)
        return _new_builder(config, tfds_dir, checksums)


def _new_builder(config: tfds.core.BuilderConfig, tfds_dir: str,
                 checksums: dict[str, str] | None) -> RnnjaxIdx:
    """``RnnjaxIdx`` of ``config`` in ``tfds_dir`` (tfds' default where empty), made
    leaving no temporary behind (:func:`own_temporaries`)."""
    with own_temporaries():
        return RnnjaxIdx(config=config, data_dir=tfds_dir or None, checksums=checksums)


def prepare(
    name: str, directory: Path, checksums: dict[str, str] | None, tfds_dir: str = ""
) -> tfds.core.DatasetBuilder:
    """The ``rnnjax_idx`` builder for ``directory``, prepared (built once, then reused).

    A build killed midway (tfds' ``incomplete.*`` directory, or a version directory without
    its ``dataset_info.json``) or damaged since (metadata that does not parse, or not as
    tfds' own) is never used: it is built again. When another process finishes the same
    build first, its build is used.
    """
    config = tfds.core.BuilderConfig(name=config_name(name, directory, checksums),
                                     description=f"{name} from {directory}")
    download_config = tfds.download.DownloadConfig(manual_dir=str(directory))
    where = tfds_dir or "~/tensorflow_datasets"
    try:
        build = _build_dir(config, tfds_dir)
        if build.exists() and not _finished(build):  # damaged, or never finished: again
            shutil.rmtree(build)
        builder = _builder_of(config, tfds_dir, checksums)
        where = str(builder.data_dir_root)
        data_dir = Path(builder.data_dir)
        if data_dir.exists() and not _finished(data_dir):  # not tfds' work: damaged
            shutil.rmtree(data_dir)
        builder.download_and_prepare(download_config=download_config)
    except OSError as e:
        # Another process may have renamed the same build into place first: use it.
        builder = _finished_builder(config, tfds_dir, checksums, download_config)
        if builder is None:
            raise ConfigError(
                f"--tfds-dir {where}: cannot write the tfds build of {name} there ({e}); "
                "pass --tfds-dir a writable directory (a build finished there once is "
                "only read afterwards)"
            ) from e
    return builder


def _finished_builder(config, tfds_dir, checksums, download_config) -> RnnjaxIdx | None:
    """The builder of ``config`` if its build is finished (and readable), else None."""
    try:
        builder = _new_builder(config, tfds_dir, checksums)
        if not _finished(Path(builder.data_dir)):
            return None
        builder.download_and_prepare(download_config=download_config)
    except OSError:
        return None
    return builder


def load_arrays(
    name: str, directory: Path, checksums: dict[str, str] | None, tfds_dir: str = ""
) -> Arrays:
    """The whole dataset through tfds, as the IDX reader returns it."""
    builder = prepare(name, directory, checksums, tfds_dir)
    out = []
    for split in ("train", "test"):
        try:
            images, labels = tfds.as_numpy(
                builder.as_dataset(split=split, batch_size=-1, as_supervised=True,
                                   shuffle_files=False)
            )
        except tf.errors.OpError as e:
            problem = " ".join(str(e.message).split())[-160:]
            raise ConfigError(
                f"--tfds-dir: the tfds build {builder.data_dir} is damaged ({problem}); "
                "delete that directory and run again: it is rebuilt from the IDX files"
            ) from e
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
    rows: slice | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The tf.data training feed of IDX files: endless ``(float32 [B, 28, 28], int32 [B])``
    batches (:func:`batches`).

    In order (the default) it yields exactly ``data.pipeline.host_batches``' batches: one
    continuous stream that wraps after the last example. Shuffled, it uses tf.data's
    seeded full-buffer shuffle, reshuffled each epoch (deterministic for a seed, but not
    the same order as the device feed's). ``start_step`` skips that many batches.
    ``rows``: keep only these rows of every global batch (a process's share with several
    processes, ``rnnjax.parallel.process_rows``; the same seed gives every process the
    same global order), cut before the float conversion and the host-to-device copy.
    """
    builder = prepare(name, directory, checksums, tfds_dir)
    ds = builder.as_dataset(split="train", as_supervised=True, shuffle_files=False)
    return batches(ds, builder.info.splits["train"].num_examples, batch_size,
                   start_step=start_step, shuffle=shuffle, seed=seed, rows=rows)


def batches(
    ds: tf.data.Dataset,
    num_examples: int,
    batch_size: int,
    *,
    start_step: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    rows: slice | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless ``(float32 [B, H, W(, C)], int32 [B])`` batches of ``ds``, a split's
    ``(uint8 [H, W, C], int [])`` pairs in stored order (``num_examples`` of them); a
    single channel is dropped, as the arrays of every source hold it. See
    :func:`train_batches` for the order, ``start_step`` and ``rows``.
    """
    if shuffle:
        ds = ds.shuffle(num_examples, seed=seed, reshuffle_each_iteration=True)
    table = tf.constant(PIXEL_SCALE)
    ds = ds.repeat().batch(batch_size, drop_remainder=True).skip(start_step)
    if rows is not None:
        ds = ds.map(lambda x, y: (x[rows.start:rows.stop], y[rows.start:rows.stop]))
    single = ds.element_spec[0].shape[-1] == 1

    def to_float(x, y):
        x = tf.cast(x[..., 0] if single else x, tf.int32)
        return tf.gather(table, x), tf.cast(y, tf.int32)

    ds = ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
