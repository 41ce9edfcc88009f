"""Where a dataset's arrays come from: a name or a directory, read as IDX or through tfds.

``load_dataset(config)`` is the one entry point: the arrays and their
:class:`~rnnjax.data.spec.DataSpec` (image shape, classes). With ``--source idx`` names
resolve to ``DATA_DIR/NAME/``; the name ``mnist`` falls back to the copy shipped inside the
package (``rnnjax/data/mnist``, verified by the canonical MD5s), so a fresh clone trains
with no network. With ``--source tfds`` a name is first a prepared tfds dataset
(``rnnjax.data.tfds_datasets.resolve`` says how a name resolves).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from rnnjax.config import TUNED, Config, ConfigError
from rnnjax.data.idx import MNIST_MD5, SPLITS, Arrays, IdxError, load_idx_dir
from rnnjax.data.spec import IDX_SPEC, DataSpec

EMBEDDED_MNIST = Path(__file__).resolve().parent / "mnist"
KNOWN_CHECKSUMS = {"mnist": MNIST_MD5}


@dataclass(frozen=True)
class Dataset:
    """A dataset in memory: uint8 images ``[N, H, W]`` (one channel) or ``[N, H, W, C]`` and
    int32 labels ``[N]`` of the train and test splits, what they are, and a name to print."""

    arrays: Arrays
    spec: DataSpec
    title: str


def default_data_dir() -> Path:
    return Path(os.path.expanduser("~")) / "rnnjax_data"


def is_path_like(dataset: str, source: str = "idx") -> bool:
    """Whether the ``--dataset`` value ``dataset`` is a path (a directory of IDX files)
    rather than a name, by its spelling alone: absolute, starting with ``.`` or ``~``, or
    holding a path separator. A bare name is always a name, even where a directory of that
    name is in the working directory (``./NAME`` is that directory).

    ``source``: ``"tfds"`` keeps tfds' ``NAME/CONFIG`` names (a separator inside, none of
    the starts above) names, unless such a directory exists; ``"idx"`` (default) has none.
    """
    seps = tuple(sep for sep in (os.sep, os.altsep) if sep)
    if dataset.startswith((".", "~", *seps)) or os.path.isabs(dataset):
        return True
    if not any(sep in dataset for sep in seps):
        return False
    return source != "tfds" or Path(dataset).is_dir()


def resolve_dataset(dataset: str, data_dir: str = "") -> tuple[str, Path, dict[str, str] | None]:
    """Map ``--dataset``/``--data-dir`` to ``(name, directory, checksums)``.

    A value that :func:`is_path_like` is a directory used as is; otherwise it is a name
    looked up under ``data_dir``, or where none is given under :func:`default_data_dir`
    and then, for ``mnist``, in the copy inside the package; never in the working
    directory. A ``data_dir`` given and not holding the name is an error, for ``mnist``
    too: the run would read other files than it records. Checksums are the canonical
    ones for known names (MNIST), else None (an ``MD5SUMS`` file in the directory is used).
    """
    if is_path_like(dataset):
        path = Path(dataset).expanduser()
        if not path.is_dir():
            raise IdxError(f"--dataset {dataset}: no such directory; pass a directory that "
                           "holds the four IDX files, or a dataset name")
        return path.resolve().name, path, None
    name = dataset
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    path = root / name
    if path.is_dir():
        return name, path, KNOWN_CHECKSUMS.get(name)
    if name == "mnist" and not data_dir:
        return name, EMBEDDED_MNIST, MNIST_MD5
    here = (f"; the directory {name} here is --dataset ./{name}" if Path(name).is_dir()
            else "")
    packaged = ("; leave --data-dir out for the copy inside rnnjax" if name == "mnist"
                else "")
    raise IdxError(
        f"--dataset {name}: not found at {path}; put its four IDX files there "
        f"(or pass --data-dir ROOT holding NAME/, or --dataset DIRECTORY){here}{packaged}"
    )


def import_tfds() -> ModuleType:
    """``rnnjax.data.tfds_mnist`` (imports TensorFlow), or a ConfigError saying what to install."""
    try:
        from rnnjax.data import tfds_mnist
    except ImportError as e:
        raise ConfigError(
            f"--source tfds needs TensorFlow and tensorflow-datasets ({e}); "
            "pip install -e '.[tfds]' (or train with --source idx)"
        ) from e
    return tfds_mnist


def import_tfds_datasets() -> ModuleType:
    """``rnnjax.data.tfds_datasets`` (imports TensorFlow); a ConfigError as :func:`import_tfds`."""
    import_tfds()
    from rnnjax.data import tfds_datasets

    return tfds_datasets


def load_dataset(config: Config, splits: tuple[str, ...] = SPLITS) -> Dataset:
    """The dataset of ``config``: both splits in NumPy and its spec (``splits``: those
    read; ``("test",)`` for an evaluation, the train split then empty and never read, nor
    needed)."""
    if config.source == "tfds":
        return import_tfds_datasets().load(config, splits)
    name, directory, checksums = resolve_dataset(config.dataset, config.data_dir)
    return Dataset(load_idx_dir(directory, checksums, splits), IDX_SPEC, f"{name} (IDX)")


def dataset_spec(config: Config, splits: tuple[str, ...] = SPLITS) -> DataSpec:
    """The images and classes of ``config``'s dataset without reading its examples: the
    IDX layout's for ``--source idx``, a tfds dataset's from its builder's metadata
    (``rnnjax tune``, which times synthetic images of that shape; ``rnnjax eval``). The
    split flags of ``splits`` (those :func:`load_dataset` would read) are checked."""
    if config.source == "tfds":
        return import_tfds_datasets().spec(config, splits)
    return IDX_SPEC


Loader = Callable[[Config], Dataset]  # load_dataset, or a prefetch's


def prefetch(config: Config) -> Loader:
    """Start reading ``config``'s dataset on a thread now; the loader returned gives it (or
    raises what reading it raised) for a config naming the same data (the tuned fields
    may differ), and reads anew for any other.

    For ``rnnjax train``: the IDX files decompress and verify while Python imports JAX
    (zlib, MD5 and NumPy's copies release the GIL), 0.1-0.4 s of a 6-second seed run
    here. With ``--source tfds`` nothing starts early (TensorFlow imports on the caller's
    thread): the dataset is read on the first call and kept, so that the tuner (which
    needs its images' shape) and the run read it once.
    """
    if config.source != "idx":
        read: list[Dataset] = []

        def first() -> Dataset:
            if not read:
                read.append(load_dataset(config))
            return read[0]
    else:
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rnnjax-data")
        future = pool.submit(load_dataset, config)
        pool.shutdown(wait=False)  # the thread ends with the read
        first = future.result

    def load(wanted: Config) -> Dataset:
        if wanted.replace(**{name: getattr(config, name) for name in TUNED}) == config:
            return first()
        return load_dataset(wanted)

    return load


def load_arrays(config: Config) -> Arrays:
    """The arrays of :func:`load_dataset`."""
    return load_dataset(config).arrays


def tfds_train_batches(
    config: Config, num_examples: int, *, start_step: int = 0, rows: slice | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The tf.data training feed of ``config``'s dataset (``--source tfds``), from
    ``start_step`` on; ``rows``: this process's rows of each batch."""
    return import_tfds_datasets().train_batches(config, num_examples, start_step=start_step,
                                                rows=rows)
