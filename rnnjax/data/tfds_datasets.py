"""Prepared tensorflow-datasets datasets: ``--source tfds --dataset NAME[:VERSION]``.

A tfds user keeps datasets prepared in a tfds data dir (``~/tensorflow_datasets``, a shared
cache, a ``gs://`` bucket). rnnjax reads them through tfds itself:

* ``tfds.builder(NAME[:VERSION], data_dir=--tfds-dir)``: the data dir by tfds' own rules
  (``--tfds-dir`` as given, any path tfds reads; else ``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``); catalog datasets and datasets tfds finds prepared in the dir
  (written by ``tfds.dataset_builders.store_as_tfds_dataset``, ``tfds build`` ...) alike;
* nothing is downloaded unless ``--tfds-download`` asks (``download_and_prepare``);
* records in their stored order (``shuffle_files=False``, shards read one after another),
  so runs are reproducible;
* ``--train-split``/``--test-split`` (default ``train``/``test``; tfds split syntax);
* images and labels from the dataset's supervised keys, else its ``image`` and ``label``
  features: an image of fixed shape HxWxC, uint8, and a ``ClassLabel`` (the number of
  classes).

How ``--dataset`` resolves with ``--source tfds`` (:func:`resolve`): a path
(``rnnjax.data.sources.is_path_like``: starting with ``/``, ``.`` or ``~``, or ``A/B`` where
that directory exists; else ``NAME/CONFIG`` is a tfds name) is a directory of IDX files,
prepared once into rnnjax's ``rnnjax_idx`` builder (``rnnjax.data.tfds_mnist``). A name (a
bare name is never a directory of the working directory) is the prepared tfds dataset of
that name when tfds finds it prepared in the data dir (or a version is named, or
``--tfds-download`` is given); otherwise the IDX files of that name (``DATA_DIR/NAME``, or
the MNIST inside rnnjax), when there are some; otherwise the tfds dataset again, whose
absence is then an error naming the data dir searched and how to prepare the dataset there.

Importing this module imports TensorFlow (CPU only, as ``rnnjax.data.tfds_mnist``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from rnnjax.config import Config, ConfigError
from rnnjax.data import tfds_mnist
from rnnjax.data.idx import SPLITS, Arrays, IdxError, empty_like
from rnnjax.data.sources import Dataset, is_path_like, resolve_dataset
from rnnjax.data.spec import IDX_SPEC, DataSpec

# Examples per tf.data batch while a split is read into NumPy.
READ_BATCH = 4096
T = TypeVar("T")


@dataclass(frozen=True)
class Prepared:
    """A prepared tfds dataset and where its images and labels are."""

    builder: tfds.core.DatasetBuilder
    image_key: str
    label_key: str
    spec: DataSpec
    asked: str = ""  # the --dataset value that named it
    ready: bool = True  # prepared in its data dir (else tfds may download it, if asked)

    @property
    def title(self) -> str:
        return f"{self.builder.name}:{self.builder.version}"


@dataclass(frozen=True)
class IdxBuild:
    """IDX files read through rnnjax's own ``rnnjax_idx`` tfds builder."""

    name: str
    directory: Path
    checksums: dict[str, str] | None


def _where(tfds_dir: str) -> str:
    """The data dir tfds uses for ``--tfds-dir`` (its default when empty)."""
    return tfds_dir or str(tfds.core.constants.DATA_DIR)


def _how_to_prepare(name: str, tfds_dir: str) -> str:
    where = _where(tfds_dir)
    return (f"prepare it there first (`tfds build {name} --data_dir {where}`, or "
            f"tfds.load('{name}', data_dir='{where}') on a machine with network, or "
            "tfds.dataset_builders.store_as_tfds_dataset for your own data), pass "
            "--tfds-dir where it is prepared, or --tfds-download to let tfds download it")


def prepared_versions(directory: Path) -> list[str]:
    """The versions prepared in ``directory`` (a data dir's ``NAME/``): those with their
    ``dataset_info.json``."""
    if not directory.is_dir():
        return []
    return sorted(d.name for d in directory.iterdir() if (d / "dataset_info.json").is_file())


def _builder(dataset: str, tfds_dir: str) -> tfds.core.DatasetBuilder | None:
    """``tfds.builder(dataset, data_dir=...)``; None when tfds knows no dataset of that name
    (neither in its catalog nor prepared in the data dir)."""
    try:
        with tfds_mnist.own_temporaries():
            return tfds.builder(dataset, data_dir=tfds_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        return None
    except tfds_mnist.DAMAGED_INFO as e:  # its dataset_info.json or features.json unreadable
        problem = " ".join(str(e).split())[-200:]
        name = dataset.partition(":")[0]
        raise ConfigError(f"--dataset {dataset}: its prepared metadata in {_where(tfds_dir)}/"
                          f"{name} is damaged ({problem}); prepare it there again (delete "
                          "that version's directory first)") from e
    except (AssertionError, ValueError) as e:  # e.g. a version that does not exist
        problem = " ".join(str(e).split())[-200:]
        raise ConfigError(f"--dataset {dataset}: tfds cannot open it ({problem}); pass a "
                          "version that exists, or the name alone for its latest") from e
    except (RuntimeError, tf.errors.OpError) as e:  # a data dir tfds cannot reach (gs://)
        problem = " ".join(str(e).split())[:300]
        raise ConfigError(f"--dataset {dataset}: tfds cannot read the data dir "
                          f"{_where(tfds_dir)} ({problem}); pass --tfds-dir where it can "
                          "read the dataset (network, credentials)") from e


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    """``builder.is_prepared()``, without absl's WARNING line (tfds' logger) for a dataset
    not prepared in the data dir ("Variant folder ... has no dataset_info.json"), printed
    before rnnjax's own one line, which says that and how to prepare it."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return builder.is_prepared()
    finally:
        logger.setLevel(level)


def resolve(config: Config) -> Prepared | IdxBuild:
    """What ``--dataset`` names with ``--source tfds`` (see the module docstring)."""
    dataset = config.dataset
    # A path: IDX files. "name/config" is a tfds name (unless that directory exists).
    if is_path_like(dataset, "tfds"):
        return IdxBuild(*resolve_dataset(dataset, config.data_dir))
    name, _, version = dataset.partition(":")
    builder = _builder(dataset, config.tfds_dir)
    ready = builder is not None and _is_prepared(builder)  # a file read: asked once
    if builder is not None and (ready or version or config.tfds_download):
        return _prepared(builder, dataset, ready)
    try:
        return IdxBuild(*resolve_dataset(name, config.data_dir))
    except IdxError:
        if builder is not None:
            return _prepared(builder, dataset, ready)
    prepared = prepared_versions(Path(_where(config.tfds_dir)) / name)
    if version and prepared:
        raise ConfigError(
            f"--dataset {dataset}: the tfds data dir {_where(config.tfds_dir)} holds {name} "
            f"in version {', '.join(prepared)} only; pass one of them, or the name alone "
            "for its latest")
    raise ConfigError(
        f"--dataset {dataset}: not prepared in the tfds data dir {_where(config.tfds_dir)} and "
        f"not a dataset of tfds' catalog (nor IDX files in {config.data_dir or '~/rnnjax_data'}"
        f"/{name}); {_how_to_prepare(name, config.tfds_dir)}"
    )


def _prepared(builder: tfds.core.DatasetBuilder, dataset: str, ready: bool) -> Prepared:
    image_key, label_key, spec = image_and_label(builder.info, dataset)
    return Prepared(builder, image_key, label_key, spec, dataset, ready)


def image_and_label(info: tfds.core.DatasetInfo, dataset: str) -> tuple[str, str, DataSpec]:
    """``(image key, label key, spec)`` of a dataset whose features are an image of fixed
    shape (uint8) and a ClassLabel; a :class:`ConfigError` describing them otherwise."""
    features = info.features
    keys = info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        image_key, label_key = "image", "label"
    need = ("rnnjax reads an image (fixed HxWxC, uint8) and a class label (ClassLabel), as "
            "the supervised keys or the features 'image' and 'label'; choose such a dataset")
    names = sorted(features.keys()) if isinstance(features, tfds.features.FeaturesDict) else []
    if image_key not in names or label_key not in names:
        raise ConfigError(f"--dataset {dataset}: features {names or type(features).__name__}"
                          f" have no '{image_key}' and '{label_key}'; {need}")
    image, label = features[image_key], features[label_key]
    shape = tuple(image.shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    if not isinstance(image, tfds.features.Image | tfds.features.Tensor) or len(shape) != 3:
        raise ConfigError(f"--dataset {dataset}: '{image_key}' is {image!r}, not an image; "
                          f"{need}")
    if None in shape or np.dtype(image.np_dtype) != np.uint8:
        raise ConfigError(f"--dataset {dataset}: '{image_key}' is {image!r}: images of "
                          f"varying size or not uint8; resize them to one size as uint8 "
                          f"first ({need})")
    if not isinstance(label, tfds.features.ClassLabel):
        raise ConfigError(f"--dataset {dataset}: '{label_key}' is {label!r}, not a "
                          f"ClassLabel; {need}")
    h, w, c = (int(s) for s in shape)
    return image_key, label_key, DataSpec((h, w, c), int(label.num_classes))


def _split(prepared: Prepared, split: str, flag: str) -> tf.data.Dataset:
    """One split as ``(uint8 [H, W, C], int64 [])`` pairs in their stored order."""
    builder = prepared.builder
    read_config = tfds.ReadConfig(interleave_cycle_length=1)  # shard after shard
    try:
        ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
    except AssertionError as e:  # tfds' "could not find data" when it is not prepared
        raise ConfigError(
            f"--dataset {prepared.asked or prepared.title}: not prepared in the tfds data dir "
            f"{builder.data_dir_root} (tfds looked for {builder.data_dir}); "
            f"{_how_to_prepare(builder.name, str(builder.data_dir_root))}"
        ) from e
    except (ValueError, KeyError) as e:
        problem = " ".join(str(e).split())[-200:]
        if "corresponds to no data" in problem:  # tfds' refusal of a slice with no example
            raise _empty_split(prepared, split, flag) from e
        if "split" not in problem.lower():
            raise ConfigError(f"--dataset {prepared.title}: tfds cannot read it ({problem}); "
                              "prepare it again, or choose another dataset") from e
        # an unknown split, or bad split syntax
        have = ", ".join(builder.info.splits.keys()) or "none recorded"
        raise ConfigError(f"{flag} {split}: {prepared.title} has no such split (it has "
                          f"{have}); pass one of them (tfds split syntax such as "
                          "'train[:90%]' works too)") from e
    image_key, label_key = prepared.image_key, prepared.label_key
    channels = prepared.spec.image_shape[2]

    def pair(example):
        image = example[image_key]
        if len(image.shape) == 2:
            image = image[..., None]
        return tf.reshape(image, (*prepared.spec.image_shape[:2], channels)), example[label_key]

    return ds.map(pair)


def _empty_split(prepared: Prepared, split: str, flag: str) -> ConfigError:
    """The error of a split (or a slice of one, ``test[:0]``) that holds no example."""
    return ConfigError(f"{flag} {split}: the split of {prepared.title} is empty; pass a "
                       "split that holds examples")


def _read(prepared: Prepared, split: str, flag: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split in NumPy: uint8 images ``[N, H, W]`` (C=1) or ``[N, H, W, C]``, int32
    labels ``[N]``."""
    images, labels = [], []
    try:
        for x, y in tfds.as_numpy(_split(prepared, split, flag).batch(READ_BATCH)):
            images.append(x)
            labels.append(y)
    except tf.errors.OpError as e:
        problem = " ".join(str(e.message).split())[-160:]
        raise ConfigError(f"--dataset {prepared.title}: the prepared data in "
                          f"{prepared.builder.data_dir} does not read ({problem}); prepare "
                          "it again") from e
    if not labels:
        raise _empty_split(prepared, split, flag)
    x, y = np.concatenate(images), np.concatenate(labels)
    if y.min() < 0 or y.max() >= prepared.spec.num_classes:
        raise ConfigError(f"--dataset {prepared.title}: {split} labels outside 0 .. "
                          f"{prepared.spec.num_classes - 1}; the prepared data is damaged")
    return (x[..., 0] if x.shape[-1] == 1 else x), y.astype(np.int32)


def _split_flags(config: Config, splits: tuple[str, ...] = SPLITS
                 ) -> list[tuple[str, str]]:
    """The flags of ``splits`` and their values: training's, then evaluation's."""
    flags = {"train": ("--train-split", config.train_split),
             "test": ("--test-split", config.test_split)}
    return [flags[name] for name in SPLITS if name in splits]


def spec(config: Config, splits: tuple[str, ...] = SPLITS) -> DataSpec:
    """The spec of the dataset :func:`load` would read, from the builder's metadata alone
    (IDX files: the IDX layout's), reading no example; the flags of ``splits`` (those
    :func:`load` would read) checked as it checks them, where the dataset is there to
    check them against."""
    target = resolve(config)
    if isinstance(target, IdxBuild):
        _check_idx_splits(target, config, splits)
        return IDX_SPEC
    if target.ready:
        for flag, split in _split_flags(config, splits):
            _split(target, split, flag)  # a pipeline made, nothing read
    return target.spec


def load(config: Config, splits: tuple[str, ...] = SPLITS) -> Dataset:
    """The dataset of ``config`` (``--source tfds``): its two splits and its spec;
    ``splits`` those read (``("test",)``: the test split alone, the train split empty,
    ``rnnjax.data.idx.empty_like``)."""
    target = resolve(config)
    if isinstance(target, IdxBuild):
        _check_idx_splits(target, config)
        if (config.train_split, config.test_split) == ("train", "test"):
            arrays = _leaving_no_empty_dirs(
                config.tfds_dir, lambda: tfds_mnist.load_arrays(
                    target.name, target.directory, target.checksums, config.tfds_dir))
            return Dataset(arrays, IDX_SPEC, f"{target.name} (IDX via tfds)")
        target = _idx_prepared(target, config)
    if config.tfds_download and not target.ready:
        try:
            target.builder.download_and_prepare()
        except Exception as e:  # network, disk, checksum: tfds raises many kinds
            problem = " ".join(str(e).split())[-200:]
            raise ConfigError(f"--tfds-download: tfds could not download and prepare "
                              f"{target.title} ({problem}); prepare it where there is "
                              "network and pass --tfds-dir") from e
    read = {name: _read(target, split, flag) for name, (flag, split)
            in zip(SPLITS, _split_flags(config), strict=True) if name in splits}
    for name in set(SPLITS) - set(read):
        read[name] = empty_like(read[splits[0]][0])
    return Dataset(Arrays(*read["train"], *read["test"]), target.spec, f"{target.title} (tfds)")


def _check_idx_splits(target: IdxBuild, config: Config, splits: tuple[str, ...] = SPLITS
                      ) -> None:
    """IDX files have the splits train and test: another name in the flag of one of
    ``splits`` is refused before a build."""
    for flag, split in _split_flags(config, splits):
        unknown = sorted(set(re.findall(r"[A-Za-z_][\w-]*", split)) - {"train", "test"})
        if unknown:
            raise ConfigError(f"{flag} {split}: the IDX files of {target.name} have no split "
                              f"{unknown[0]} (they have train, test); pass one of them (tfds "
                              "split syntax such as 'train[:90%]' works too)")


def _idx_prepared(target: IdxBuild, config: Config) -> Prepared:
    """The ``rnnjax_idx`` build of IDX files, read like any prepared dataset (other splits)."""
    builder = _leaving_no_empty_dirs(
        config.tfds_dir, lambda: tfds_mnist.prepare(target.name, target.directory,
                                                    target.checksums, config.tfds_dir))
    return Prepared(builder, "image", "label", IDX_SPEC)


def _leaving_no_empty_dirs(tfds_dir: str, build: Callable[[], T]) -> T:
    """``build()``, an ``rnnjax_idx`` build into the (local) tfds data dir; when it raises
    (IDX files that fail their checks, ...), the directories it made there and left empty
    (the data dir itself, ``downloads/extracted``, ``rnnjax_idx/<config>``) are removed, so
    that refused files leave the data dir as it was. Only empty directories are removed."""
    where = _where(tfds_dir)
    if "://" in where:  # gs:// and the like: tfds' business
        return build()
    root = Path(where).expanduser()
    fixed = [root, root / "downloads", root / "downloads" / "extracted", root / "rnnjax_idx"]
    had = {path for path in fixed if path.is_dir()}
    builds = set(_subdirs(root / "rnnjax_idx"))
    try:
        return build()
    except Exception:
        for top in set(_subdirs(root / "rnnjax_idx")) - builds:
            for path, _, _ in os.walk(top, topdown=False):
                _remove_if_empty(Path(path))
        for path in reversed(fixed):
            if path not in had:
                _remove_if_empty(path)
        raise


def _subdirs(directory: Path) -> list[Path]:
    """The directories in ``directory`` (none when it is not a directory)."""
    try:
        return [path for path in directory.iterdir() if path.is_dir()]
    except OSError:
        return []


def _remove_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()  # refuses a directory that is not empty


def train_batches(
    config: Config, num_examples: int, *, start_step: int = 0, rows: slice | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The tf.data training feed of ``config``'s dataset: endless ``(float32 [B, H, W(, C)],
    int32 [B])`` batches, exactly ``data.pipeline.host_batches``' when in order (see
    ``rnnjax.data.tfds_mnist.batches``). ``num_examples``: the train split's size."""
    target = resolve(config)
    if isinstance(target, IdxBuild):
        target = _idx_prepared(target, config)
    ds = _split(target, config.train_split, "--train-split")
    return tfds_mnist.batches(ds, num_examples, config.batch_size, start_step=start_step,
                              shuffle=config.shuffle, seed=config.seed, rows=rows)
