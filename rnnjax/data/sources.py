"""Where a dataset's arrays come from: a name or a directory, read as IDX or through tfds.

``load_arrays(config)`` is the one entry point. Names resolve to ``DATA_DIR/NAME/``; the
name ``mnist`` falls back to the copy shipped inside the package (``rnnjax/data/mnist``,
verified by the canonical MD5s), so a fresh clone trains with no network.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from rnnjax.config import Config, ConfigError
from rnnjax.data.idx import MNIST_MD5, Arrays, IdxError, load_idx_dir

EMBEDDED_MNIST = Path(__file__).resolve().parent / "mnist"
KNOWN_CHECKSUMS = {"mnist": MNIST_MD5}


def default_data_dir() -> Path:
    return Path(os.path.expanduser("~")) / "rnnjax_data"


def resolve_dataset(dataset: str, data_dir: str = "") -> tuple[str, Path, dict[str, str] | None]:
    """Map ``--dataset``/``--data-dir`` to ``(name, directory, checksums)``.

    A value that is an existing directory (or contains a path separator) is used as is;
    otherwise it is a name looked up under ``data_dir``. Checksums are the canonical ones
    for known names (MNIST), else None (an ``MD5SUMS`` file in the directory is used).
    """
    looks_like_path = os.sep in dataset or dataset.startswith(".") or Path(dataset).is_dir()
    if looks_like_path:
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
    if name == "mnist":
        return name, EMBEDDED_MNIST, MNIST_MD5
    raise IdxError(
        f"--dataset {name}: not found at {path}; put its four IDX files there "
        "(or pass --data-dir ROOT holding NAME/, or --dataset DIRECTORY)"
    )


def import_tfds() -> ModuleType:
    """``rnnjax.data.tfds_mnist`` (imports TensorFlow), or a ConfigError saying what to install."""
    try:
        from rnnjax.data import tfds_mnist
    except ImportError as e:
        raise ConfigError(
            f"--source tfds needs TensorFlow and tensorflow-datasets ({e}); "
            "pip install -e '.[tfds]', or use --source idx"
        ) from e
    return tfds_mnist


def load_arrays(config: Config) -> Arrays:
    """The dataset of ``config`` as NumPy arrays (uint8 images [N,28,28], int32 labels [N])."""
    name, directory, checksums = resolve_dataset(config.dataset, config.data_dir)
    if config.source == "tfds":
        return import_tfds().load_arrays(name, directory, checksums, config.tfds_dir)
    return load_idx_dir(directory, checksums)
