"""The data layer: the strict IDX reader, dataset resolution, batch order, pixels, tfds.

Fixtures stay in this module (tests/conftest.py belongs to the suite); the session-wide
``mnist`` fixture (the embedded MNIST, verified) comes from conftest.
"""

from __future__ import annotations

import gzip
import hashlib
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax.config import Config
from rnnjax.data import idx, sources
from rnnjax.data.idx import (
    FILES,
    MNIST_MD5,
    Arrays,
    IdxError,
    load_idx_dir,
    parse_idx,
    read_idx,
    read_md5sums,
    write_idx,
)
from rnnjax.data.pipeline import (
    PIXEL_SCALE,
    batch_indices,
    host_batches,
    normalize,
    normalize_host,
)
from rnnjax.data.sources import EMBEDDED_MNIST, load_arrays, prefetch, resolve_dataset

# Canonical facts about MNIST, independent of rnnjax.
MNIST_TRAIN_HEAD = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
MNIST_TEST_HEAD = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """IDX bytes built by hand (independent of write_idx): magic, dims, big-endian data."""
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def derived_set(mnist: Arrays, n_train: int = 600, n_test: int = 100) -> Arrays:
    """A second, different 28x28 set: the first MNIST examples inverted, labels shifted."""
    return Arrays(
        (255 - mnist.train_images[:n_train]).astype(np.uint8),
        ((mnist.train_labels[:n_train] + 1) % 10).astype(np.int32),
        (255 - mnist.test_images[:n_test]).astype(np.uint8),
        ((mnist.test_labels[:n_test] + 1) % 10).astype(np.int32),
    )


def write_set(directory: Path, arrays: Arrays, *, compress: bool = True) -> Path:
    """Write ``arrays`` as the four IDX files (labels as uint8, like MNIST) into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for key, stem in FILES.items():
        array = getattr(arrays, key)
        if key.endswith("labels") and array.min() >= 0 and array.max() <= 255:
            array = array.astype(np.uint8)
        write_idx(directory / (stem + suffix), array)
    return directory


def content_md5s(directory: Path) -> dict[str, str]:
    """Uncompressed MD5 of each of the four files, computed with gzip/hashlib alone."""
    sums = {}
    for stem in FILES.values():
        gz = directory / (stem + ".gz")
        data = gzip.decompress(gz.read_bytes()) if gz.exists() else (directory / stem).read_bytes()
        sums[stem] = hashlib.md5(data).hexdigest()
    return sums


def assert_arrays_equal(got: Arrays, want: Arrays) -> None:
    for field in Arrays._fields:
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == (np.uint8 if field.endswith("images") else np.int32), field
        assert g.shape == w.shape, field
        np.testing.assert_array_equal(g, w, err_msg=field)


def raises_idx(path, *fragments):
    """Context: an IdxError whose message names ``path`` and contains every fragment."""
    return _RaisesIdx(str(path), fragments)


class _RaisesIdx:
    def __init__(self, path: str, fragments):
        self.path, self.fragments = path, fragments
        self._ctx = pytest.raises(IdxError)

    def __enter__(self):
        self.info = self._ctx.__enter__()
        return self.info

    def __exit__(self, *exc):
        suppressed = self._ctx.__exit__(*exc)
        message = str(self.info.value)
        assert self.path in message, f"{self.path!r} not named in: {message}"
        for fragment in self.fragments:
            assert fragment in message, f"{fragment!r} not in: {message}"
        return suppressed


@pytest.fixture(scope="module")
def small(mnist) -> Arrays:
    """600 train / 100 test examples of the derived set."""
    return derived_set(mnist)


@pytest.fixture
def small_dir(tmp_path, small) -> Path:
    return write_set(tmp_path / "myset", small)


@pytest.fixture
def sample_file(tmp_path) -> tuple[Path, bytes, np.ndarray]:
    """A valid uncompressed IDX file of uint8 [5, 28, 28], its bytes and its array."""
    array = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    data = idx_bytes(array, 0x08)
    path = tmp_path / "sample-idx3-ubyte"
    path.write_bytes(data)
    return path, data, array


# --------------------------------------------------------------------------- IDX: round trip


@pytest.mark.parametrize(
    ("dtype", "code"),
    [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C),
     (np.float32, 0x0D), (np.float64, 0x0E)],
)
@pytest.mark.parametrize("name", ["a-idx", "a-idx.gz"])
def test_round_trip(tmp_path, dtype, code, name):
    rng = np.random.default_rng(1)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, (4, 3, 7), dtype=dtype, endpoint=True)
    else:
        array = rng.normal(size=(4, 3, 7)).astype(dtype)
    path = tmp_path / name
    write_idx(path, array)
    raw = path.read_bytes()
    if name.endswith(".gz"):
        assert raw[:2] == b"\x1f\x8b"
        raw = gzip.decompress(raw)
    assert raw == idx_bytes(array, code)  # the standard layout, big-endian
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    assert got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert not list(tmp_path.glob("*.tmp*"))  # the atomic write leaves no temporary


def test_round_trip_forced_compression_and_checksum(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    path = tmp_path / "plain-name"
    write_idx(path, array, compress=True)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    checksum = hashlib.md5(idx_bytes(array, 0x08)).hexdigest()
    np.testing.assert_array_equal(read_idx(path, checksum), array)
    write_idx(path, array, compress=False)
    assert path.read_bytes() == idx_bytes(array, 0x08)
    np.testing.assert_array_equal(read_idx(str(path), checksum), array)


def test_big_endian_input_round_trips(tmp_path):
    array = np.arange(-50, 50, dtype=">i4").reshape(10, 10)
    write_idx(tmp_path / "be", array)
    got = read_idx(tmp_path / "be")
    assert got.dtype == np.dtype("=i4")
    np.testing.assert_array_equal(got, array)


def test_write_rejects_dtype_without_code(tmp_path):
    with raises_idx(tmp_path / "x", "int64"):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))
    assert not (tmp_path / "x").exists()


def test_multi_member_gzip_is_read_whole(tmp_path, sample_file):
    _, data, array = sample_file
    path = tmp_path / "multi.gz"
    # Concatenated gzip members (as `cat a.gz b.gz`, bgzip) are one valid gzip file.
    path.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]) + b"\0" * 16)
    np.testing.assert_array_equal(read_idx(path), array)


# --------------------------------------------------------------------------- IDX: faults


def test_truncated_data(tmp_path, sample_file):
    path, data, _ = sample_file
    path.write_bytes(data[:-1])
    with raises_idx(path, "truncated", "3920 bytes", "file holds 3919"):
        read_idx(path)
    gz = tmp_path / "cut.gz"
    gz.write_bytes(gzip.compress(data[: len(data) // 2]))
    with raises_idx(gz, "truncated"):
        read_idx(gz)


@pytest.mark.parametrize("keep", [0, 3, 4, 8, 15])
def test_truncated_header(sample_file, keep):
    path, data, _ = sample_file
    path.write_bytes(data[:keep])
    fragment = "too short for an IDX header" if keep < 4 else "truncated header"
    with raises_idx(path, fragment):
        read_idx(path)


@pytest.mark.parametrize("magic", [b"\x01\x00", b"\x00\x01", b"\x89P"])
def test_wrong_magic(sample_file, magic):
    path, data, _ = sample_file
    path.write_bytes(magic + data[2:])
    with raises_idx(path, "wrong magic number", "not an IDX file"):
        read_idx(path)


@pytest.mark.parametrize("code", [0x00, 0x0A, 0x0F, 0xFF])
def test_unknown_dtype_code(sample_file, code):
    path, data, _ = sample_file
    path.write_bytes(data[:2] + bytes([code]) + data[3:])
    with raises_idx(path, f"unknown IDX dtype code 0x{code:02x}"):
        read_idx(path)


def test_zero_dimensions(sample_file):
    path, _, _ = sample_file
    path.write_bytes(b"\x00\x00\x08\x00")
    with raises_idx(path, "0 dimensions"):
        read_idx(path)


@pytest.mark.parametrize("extra", [1, 3, 784])
def test_trailing_bytes(sample_file, extra):
    path, data, _ = sample_file
    path.write_bytes(data + b"\x00" * extra)
    with raises_idx(path, f"{extra} bytes after the declared (5, 28, 28) data"):
        read_idx(path)


def test_corrupt_gzip(tmp_path, sample_file):
    _, data, _ = sample_file
    good = gzip.compress(data)
    path = tmp_path / "bad.gz"
    cases = {
        "crc": good[:-8] + bytes([good[-8] ^ 0xFF]) + good[-7:],
        "length": good[:-1] + bytes([good[-1] ^ 0x01]),
        "method": good[:2] + b"\x07" + good[3:],  # compression method 7: not deflate
        "garbage": b"\x1f\x8b" + bytes(range(200)),
        "junk after the stream": good + b"junk",
    }
    for case, content in cases.items():
        path.write_bytes(content)
        with raises_idx(path, "corrupt gzip", "download the file again"):
            read_idx(path)
        assert content != good, case


@pytest.mark.parametrize("keep", [10, 100, -8, -1])
def test_truncated_gzip_stream(tmp_path, sample_file, keep):
    _, data, _ = sample_file
    good = gzip.compress(data)
    path = tmp_path / "cut.gz"
    path.write_bytes(good[:keep])
    with raises_idx(path, "truncated gzip stream"):
        read_idx(path)


def test_wrong_checksum(sample_file):
    path, data, array = sample_file
    right = hashlib.md5(data).hexdigest()
    np.testing.assert_array_equal(read_idx(path, right), array)
    wrong = "0" * 32
    with raises_idx(path, "content MD5", right, wrong):
        read_idx(path, wrong)
    # Verified on the uncompressed content, whatever the wrapper.
    gz = path.with_name(path.name + ".gz")
    gz.write_bytes(gzip.compress(data, compresslevel=1))
    np.testing.assert_array_equal(read_idx(gz, right), array)
    with raises_idx(gz, "content MD5"):
        read_idx(gz, hashlib.md5(gz.read_bytes()).hexdigest())


@pytest.mark.parametrize(
    ("code", "shape"),
    [(0x08, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)), (0x0E, (0xFFFFFFFF,)),
     (0x08, (60000, 28, 28, 28, 28))],
)
def test_enormous_header_is_refused_before_allocating(tmp_path, code, shape):
    """A header declaring more than MAX_BYTES is refused before the reader allocates for it
    (the peak under 1 MiB). No wall-clock bound: a pause of the machine is not the
    reader's (timing lives in benchmarks)."""
    path = tmp_path / "huge"
    path.write_bytes(bytes([0, 0, code, len(shape)]) + np.asarray(shape, ">u4").tobytes()
                     + b"\x00" * 64)
    tracemalloc.start()
    try:
        with raises_idx(path, "header declares", f"over {idx.MAX_BYTES} bytes"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_decompression_is_bounded(tmp_path, monkeypatch, sample_file):
    _, data, _ = sample_file
    monkeypatch.setattr(idx, "MAX_BYTES", 1000)
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(data))
    with raises_idx(path, "decompresses to more than 1000 bytes"):
        read_idx(path)
    path.write_bytes(gzip.compress(data[:500]) + gzip.compress(data[500:]))
    with raises_idx(path, "decompresses to more than 1000 bytes"):
        read_idx(path)


def test_unreadable_file(tmp_path):
    with raises_idx(tmp_path / "absent", "cannot read"):
        read_idx(tmp_path / "absent")


def test_parse_idx_names_its_source():
    with pytest.raises(IdxError, match=r"^my-name: wrong magic"):
        parse_idx(b"\x01\x00\x08\x01\x00\x00\x00\x00", "my-name")
    np.testing.assert_array_equal(
        parse_idx(idx_bytes(np.array([1, 2, 3], np.int16), 0x0B)), [1, 2, 3]
    )


# --------------------------------------------------------------------------- IDX: directories


@pytest.mark.parametrize("compress", [True, False])
def test_load_idx_dir(tmp_path, small, compress):
    directory = write_set(tmp_path / "d", small, compress=compress)
    assert_arrays_equal(load_idx_dir(directory), small)
    assert_arrays_equal(load_idx_dir(str(directory), content_md5s(directory)), small)


@pytest.mark.parametrize("stem", list(FILES.values()))
def test_missing_file(small_dir, stem):
    (small_dir / (stem + ".gz")).unlink()
    with raises_idx(small_dir, f"missing {stem}"):
        load_idx_dir(small_dir)


def test_missing_directory(tmp_path):
    with raises_idx(tmp_path / "nowhere", "no such dataset directory"):
        load_idx_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("split", ["train", "test"])
def test_count_mismatch(small_dir, small, split):
    labels = getattr(small, f"{split}_labels")[:-1].astype(np.uint8)
    write_idx(small_dir / (FILES[f"{split}_labels"] + ".gz"), labels)
    n = len(labels) + 1
    with raises_idx(small_dir, f"{n} {split} images but {n - 1} labels"):
        load_idx_dir(small_dir)


@pytest.mark.parametrize(
    ("split", "bad"),
    [("train", np.uint8(10)), ("test", np.uint8(255)), ("train", np.int8(-1))],
)
def test_labels_out_of_range(small_dir, small, split, bad):
    labels = getattr(small, f"{split}_labels").astype(np.asarray(bad).dtype)
    labels[17] = bad
    write_idx(small_dir / (FILES[f"{split}_labels"] + ".gz"), labels)
    with raises_idx(small_dir, f"{split} labels outside 0-9"):
        load_idx_dir(small_dir)


@pytest.mark.parametrize(
    "images",
    [np.zeros((600, 28, 27), np.uint8), np.zeros((600, 784), np.uint8),
     np.zeros((600, 28, 28, 1), np.uint8), np.zeros((600, 28, 28), np.float32),
     np.zeros((600, 32, 32), np.uint8)],
    ids=["28x27", "flat", "4d", "float", "32x32"],
)
def test_images_not_28x28_uint8(small_dir, images):
    write_idx(small_dir / "train-images-idx3-ubyte.gz", images)
    with raises_idx(small_dir, "train images are", "expected uint8 [N, 28, 28]"):
        load_idx_dir(small_dir)


@pytest.mark.parametrize(
    "labels", [np.zeros((100, 1), np.uint8), np.zeros(100, np.float32)], ids=["2d", "float"]
)
def test_labels_not_integer_vector(small_dir, labels):
    write_idx(small_dir / "t10k-labels-idx1-ubyte.gz", labels)
    with raises_idx(small_dir, "test labels are", "expected integers [N]"):
        load_idx_dir(small_dir)


def test_empty_split(small_dir):
    write_idx(small_dir / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28), np.uint8))
    write_idx(small_dir / "t10k-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
    with raises_idx(small_dir, "test split is empty"):
        load_idx_dir(small_dir)


def test_file_fault_in_directory_names_the_file(small_dir):
    path = small_dir / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with raises_idx(path, "gzip"):
        load_idx_dir(small_dir)


def test_wider_label_dtypes_become_int32(small_dir, small):
    write_idx(small_dir / "train-labels-idx1-ubyte.gz", small.train_labels.astype(np.int16))
    got = load_idx_dir(small_dir)
    assert got.train_labels.dtype == np.int32
    np.testing.assert_array_equal(got.train_labels, small.train_labels)


# --------------------------------------------------------------------------- embedded MNIST


def test_embedded_mnist_files_have_canonical_md5():
    assert content_md5s(EMBEDDED_MNIST) == MNIST_MD5


def test_mnist_name_falls_back_to_embedded_copy(tmp_path, monkeypatch, mnist):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/rnnjax_data/mnist
    name, directory, checksums = resolve_dataset("mnist")
    assert (name, directory, checksums) == ("mnist", EMBEDDED_MNIST, MNIST_MD5)
    arrays = load_arrays(Config(dataset="mnist"))
    assert arrays.train_images.shape == (60000, 28, 28)
    assert arrays.test_images.shape == (10000, 28, 28)
    assert arrays.train_labels.shape == (60000,) and arrays.test_labels.shape == (10000,)
    assert arrays.train_images.dtype == arrays.test_images.dtype == np.uint8
    assert arrays.train_labels.dtype == arrays.test_labels.dtype == np.int32
    assert arrays.train_labels[:10].tolist() == MNIST_TRAIN_HEAD
    assert arrays.test_labels[:10].tolist() == MNIST_TEST_HEAD
    assert np.bincount(arrays.train_labels).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(arrays.test_labels).tolist() == MNIST_TEST_COUNTS
    assert_arrays_equal(arrays, mnist)


def test_mnist_under_data_dir_is_held_to_canonical_sums(tmp_path, small):
    write_set(tmp_path / "mnist", small)
    _, directory, checksums = resolve_dataset("mnist", str(tmp_path))
    assert directory == tmp_path / "mnist" and checksums == MNIST_MD5
    with raises_idx(tmp_path / "mnist", "content MD5"):
        load_arrays(Config(dataset="mnist", data_dir=str(tmp_path)))


# --------------------------------------------------------------------------- other IDX sets


def test_second_set_from_directory(small_dir, small):
    name, directory, checksums = resolve_dataset(str(small_dir))
    assert (name, directory, checksums) == ("myset", small_dir, None)
    assert_arrays_equal(load_arrays(Config(dataset=str(small_dir))), small)


def test_second_set_from_relative_directory(small_dir, small, monkeypatch):
    monkeypatch.chdir(small_dir.parent)
    assert_arrays_equal(load_arrays(Config(dataset="./myset", data_dir="/nonexistent")), small)


@pytest.mark.parametrize(("dataset", "idx_path", "tfds_path"), [
    ("mnist", False, False),
    ("fashion_mnist:3.0.1", False, False),
    (".hidden", True, True),
    ("./mnist", True, True),
    ("../sets/mnist", True, True),
    ("~/sets/mnist", True, True),
    ("/data/mnist", True, True),
    ("sets/mnist", True, False),  # with tfds: NAME/CONFIG, unless that directory exists
    ("mnist_corrupted/shot_noise", True, False),
])
def test_is_path_like_by_spelling_alone(tmp_path, monkeypatch, dataset, idx_path, tfds_path):
    monkeypatch.chdir(tmp_path)
    assert sources.is_path_like(dataset) is idx_path
    assert sources.is_path_like(dataset, "tfds") is tfds_path
    (tmp_path / dataset.split("/")[0].lstrip("~")).mkdir(exist_ok=True)  # a directory here
    (tmp_path / "sets" / "mnist").mkdir(parents=True, exist_ok=True)
    assert sources.is_path_like(dataset) is idx_path  # a bare name stays a name
    assert sources.is_path_like(dataset, "tfds") is (tfds_path or dataset == "sets/mnist")


def test_a_bare_name_is_never_a_directory_of_the_working_directory(tmp_path, monkeypatch,
                                                                   small, mnist):
    """``--dataset mnist`` run where ``./mnist`` exists is still the verified MNIST, and a
    name found only here says to pass ``./NAME``."""
    here = tmp_path / "here"
    write_set(here / "mnist", small)  # not MNIST: it must not be read unverified
    write_set(here / "myset", small)
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/rnnjax_data/mnist
    assert resolve_dataset("mnist") == ("mnist", EMBEDDED_MNIST, MNIST_MD5)
    assert_arrays_equal(load_arrays(Config(dataset="mnist")), mnist)
    root = str(tmp_path / "root")
    with raises_idx(Path(root) / "myset", "--dataset myset: not found at",
                    "the directory myset here is --dataset ./myset"):
        resolve_dataset("myset", root)
    assert resolve_dataset("./myset", root) == ("myset", Path("myset"), None)
    assert_arrays_equal(load_arrays(Config(dataset="./mnist", data_dir=root)), small)


def test_mnist_falls_back_to_the_packaged_copy_only_under_the_default_root(tmp_path):
    """``--dataset mnist`` with a ``--data-dir`` given that holds no ``mnist/`` (a typo, or
    the directory of the files itself) is refused: it trained on the copy inside rnnjax
    while config.json recorded a directory never read. Without ``--data-dir``, a missing
    ``~/rnnjax_data/mnist`` still falls back to that copy."""
    for root in (tmp_path / "no" / "such", tmp_path):
        with raises_idx(root / "mnist", "--dataset mnist: not found at",
                        "leave --data-dir out for the copy inside rnnjax"):
            resolve_dataset("mnist", str(root))
    with pytest.raises(IdxError, match="not found at") as caught:
        resolve_dataset("myset", str(tmp_path))
    assert "copy inside rnnjax" not in str(caught.value)


def test_second_set_from_name(small_dir, small):
    root = small_dir.parent
    name, directory, checksums = resolve_dataset("myset", str(root))
    assert (name, directory, checksums) == ("myset", root / "myset", None)
    assert_arrays_equal(load_arrays(Config(dataset="myset", data_dir=str(root))), small)


def test_a_prefetched_dataset_is_the_one_read_and_serves_only_its_config(small_dir, small,
                                                                        monkeypatch):
    """rnnjax train reads the dataset on a thread while JAX imports: the loader gives that
    read for the config (whatever tuning changed), and reads anew for other data. A tfds
    dataset is read on the caller's thread when first wanted, once (the tuner wants its
    images' shape, then the run its arrays)."""
    config = Config(dataset=str(small_dir))
    load = prefetch(config)
    first = load(config)
    assert_arrays_equal(first.arrays, small)
    assert load(config.replace(unroll=0, weight_grad="per_step")) is first  # tuned fields
    mnist = load(Config())  # another dataset: read now
    assert len(mnist.arrays.train_labels) == 60000 and mnist.title == "mnist (IDX)"
    reads = []
    monkeypatch.setattr(sources, "load_dataset", lambda c: reads.append(c) or first)
    tfds = Config(source="tfds")
    load = prefetch(tfds)
    assert reads == []  # TensorFlow: nothing on a thread, nothing until wanted
    assert load(tfds) is first and load(tfds.replace(unroll=0)) is first and reads == [tfds]


def test_a_prefetch_that_fails_raises_when_its_data_is_wanted(tmp_path):
    (tmp_path / "broken").mkdir()  # no IDX files: the read fails on the thread
    config = Config(dataset=str(tmp_path / "broken"))
    load = prefetch(config)  # no error yet
    with pytest.raises(IdxError, match="broken"):
        load(config)
    with pytest.raises(IdxError, match="broken"):  # as often as it is asked
        load(config.replace(unroll=0))


def test_md5sums_file_is_verified(small_dir, small):
    sums = content_md5s(small_dir)
    lines = [f"{sums[stem]}  {stem}" for stem in FILES.values()]
    (small_dir / "MD5SUMS").write_text("\n".join(lines) + "\n")
    assert read_md5sums(small_dir) == sums
    assert_arrays_equal(load_arrays(Config(dataset=str(small_dir))), small)

    lines[2] = f"{'f' * 32}  {FILES['test_images']}"
    (small_dir / "MD5SUMS").write_text("\n".join(lines) + "\n")
    with raises_idx(small_dir / "t10k-images-idx3-ubyte.gz", "content MD5", "f" * 32):
        load_arrays(Config(dataset=str(small_dir)))
    with raises_idx(small_dir / "t10k-images-idx3-ubyte.gz", "content MD5"):
        load_arrays(Config(dataset="myset", data_dir=str(small_dir.parent)))


def test_md5sums_raw_takes_precedence(small_dir, small):
    sums = content_md5s(small_dir)
    good = "".join(f"{sums[s]} *{s}.gz\n" for s in FILES.values())  # md5sum -b style names
    bad = "".join(f"{'0' * 32}  {s}\n" for s in FILES.values())
    (small_dir / "MD5SUMS.raw").write_text(good)
    (small_dir / "MD5SUMS").write_text(bad)
    assert read_md5sums(small_dir) == sums
    assert_arrays_equal(load_idx_dir(small_dir), small)
    (small_dir / "MD5SUMS.raw").write_text(bad)
    with raises_idx(small_dir, "content MD5"):
        load_idx_dir(small_dir)


def file_md5s(directory: Path) -> dict[str, str]:
    """MD5 of each of the four .gz files as stored, as ``md5sum *.gz`` lists them."""
    return {stem: hashlib.md5((directory / (stem + ".gz")).read_bytes()).hexdigest()
            for stem in FILES.values()}


def corrupt_last_pixel(path: Path) -> None:
    """Change the last byte of a .gz images file's IDX data (a valid gzip file still)."""
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[-1] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(data)))


@pytest.mark.parametrize("prefix", ["", "./", "*", "*./", "/data/set/", "set/"])
def test_md5sums_of_the_gz_files_as_md5sum_writes_them(small_dir, small, prefix):
    """``md5sum *.gz > MD5SUMS`` (as Fashion-MNIST and KMNIST publish), ``md5sum ./*.gz``,
    ``md5sum -b``, ...: each .gz file is checked as stored, matched on its base name."""
    sums = file_md5s(small_dir)
    sep = " " if prefix.startswith("*") else "  "
    (small_dir / "MD5SUMS").write_text(
        "".join(f"{sums[s]}{sep}{prefix}{s}.gz\n" for s in sorted(FILES.values())))
    assert read_md5sums(small_dir) == {f"{s}.gz": sums[s] for s in FILES.values()}
    assert_arrays_equal(load_idx_dir(small_dir), small)  # genuine files load
    path = small_dir / "t10k-images-idx3-ubyte.gz"
    corrupt_last_pixel(path)
    with raises_idx(path, "file MD5", sums["t10k-images-idx3-ubyte"]):
        load_idx_dir(small_dir)


def test_md5sums_content_sums_under_dotted_names_are_checked(small_dir):
    """Content MD5s listed under ``./STEM`` names are matched too: never skipped."""
    sums = content_md5s(small_dir)
    (small_dir / "MD5SUMS").write_text("".join(f"{sums[s]}  ./{s}\n" for s in FILES.values()))
    assert read_md5sums(small_dir) == sums
    path = small_dir / "train-images-idx3-ubyte.gz"
    corrupt_last_pixel(path)
    with raises_idx(path, "content MD5", sums["train-images-idx3-ubyte"]):
        load_idx_dir(small_dir)


def test_md5sums_mixing_file_and_content_sums(small_dir, small):
    """A name with .gz is the file's sum, without it the content's, in one MD5SUMS."""
    files, content = file_md5s(small_dir), content_md5s(small_dir)
    stems = list(FILES.values())
    (small_dir / "MD5SUMS").write_text(f"{files[stems[0]]}  {stems[0]}.gz\n"
                                       f"{content[stems[1]]}  {stems[1]}\n")
    assert_arrays_equal(load_idx_dir(small_dir), small)
    (small_dir / "MD5SUMS").write_text(f"{content[stems[0]]}  {stems[0]}.gz\n")
    with raises_idx(small_dir / f"{stems[0]}.gz", "file MD5"):  # a content sum as a file's
        load_idx_dir(small_dir)


def test_md5sums_naming_no_idx_file_is_an_error(small_dir):
    sums = file_md5s(small_dir)
    for text in ("", "# nothing\n", "".join(f"{sums[s]}  {s}.zip\n" for s in FILES.values()),
                 f"MD5 (train-images-idx3-ubyte.gz) = {sums['train-images-idx3-ubyte']}\n"):
        (small_dir / "MD5SUMS").write_text(text)
        with raises_idx(small_dir / "MD5SUMS", "names none of the IDX files",
                        "md5sum *.gz > MD5SUMS", "or delete it"):
            load_idx_dir(small_dir)
    (small_dir / "MD5SUMS.raw").write_text("0" * 32 + "  README\n")
    with raises_idx(small_dir / "MD5SUMS.raw", "names none of the IDX files"):
        load_idx_dir(small_dir)


def test_md5sums_listing_a_gz_file_that_is_not_there(small_dir, small):
    sums = file_md5s(small_dir)
    write_set(small_dir, small, compress=False)
    (small_dir / "train-images-idx3-ubyte.gz").unlink()
    (small_dir / "MD5SUMS").write_text(
        f"{sums['train-images-idx3-ubyte']}  train-images-idx3-ubyte.gz\n")
    with raises_idx(small_dir / "train-images-idx3-ubyte", "the checksums list "
                    "train-images-idx3-ubyte.gz, which is not in", "put "
                    "train-images-idx3-ubyte.gz back"):
        load_idx_dir(small_dir)


def test_canonical_mnist_sums_are_content_sums_whatever_md5sums_says(tmp_path, mnist):
    """A known name (mnist) keeps the canonical content MD5s: an MD5SUMS there is not read."""
    directory = tmp_path / "mnist"
    directory.mkdir()
    for stem in FILES.values():
        (directory / (stem + ".gz")).write_bytes((EMBEDDED_MNIST / (stem + ".gz")).read_bytes())
    (directory / "MD5SUMS").write_text("nothing here\n")
    assert resolve_dataset("mnist", str(tmp_path))[2] == MNIST_MD5
    assert_arrays_equal(load_arrays(Config(dataset="mnist", data_dir=str(tmp_path))), mnist)


def test_unknown_name_says_where_it_looked(tmp_path):
    with raises_idx(tmp_path / "nope", "--dataset nope: not found"):
        resolve_dataset("nope", str(tmp_path))
    with raises_idx(tmp_path / "nope", "not found"):
        load_arrays(Config(dataset="nope", data_dir=str(tmp_path)))


def test_missing_directory_path(tmp_path):
    with raises_idx(tmp_path / "absent", "no such directory"):
        load_arrays(Config(dataset=str(tmp_path / "absent")))


# --------------------------------------------------------------------------- pipeline


def keras_walk(num_examples: int, batch_size: int, steps: int) -> np.ndarray:
    """The Keras RNN tutorial's BATCH_INDEX loop, literally."""
    batch_index, rows = 0, []
    order = np.arange(num_examples)
    for _ in range(steps):
        rows.append(order[batch_index : batch_index + batch_size])
        batch_index += batch_size
        batch_index = 0 if batch_index >= num_examples else batch_index
    return np.stack(rows)


def test_batch_indices_in_order_is_the_keras_walk():
    got = batch_indices(60000, 50, 0, 4001)
    assert got.dtype == np.int32 and got.shape == (4001, 50)
    np.testing.assert_array_equal(got, keras_walk(60000, 50, 4001))
    np.testing.assert_array_equal(got[1199], np.arange(59950, 60000))
    np.testing.assert_array_equal(got[1200], np.arange(50))
    np.testing.assert_array_equal(batch_indices(60000, 50, 1200, 1)[0], np.arange(50))


def test_batch_indices_in_order_is_a_continuous_stream():
    np.testing.assert_array_equal(
        batch_indices(7, 3, 0, 5), [[0, 1, 2], [3, 4, 5], [6, 0, 1], [2, 3, 4], [5, 6, 0]]
    )
    full = batch_indices(103, 10, 0, 50)
    np.testing.assert_array_equal(full.ravel(), np.arange(500) % 103)
    for k in (0, 1, 10, 11, 37):
        np.testing.assert_array_equal(batch_indices(103, 10, k, 50 - k), full[k:])


def test_batch_indices_shuffled():
    n, b, steps = 103, 10, 52  # 520 examples: five epochs and a bit, batches straddle epochs
    got = batch_indices(n, b, 0, steps, shuffle=True, seed=5)
    assert got.dtype == np.int32 and got.shape == (steps, b)
    flat = got.ravel()
    epochs = [flat[e * n : (e + 1) * n] for e in range(5)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    assert not np.array_equal(epochs[0], np.arange(n))
    assert len({order.tobytes() for order in epochs}) == 5  # reshuffled every epoch
    assert len(set(flat[5 * n :].tolist())) == len(flat) - 5 * n  # partial epoch: no repeats
    np.testing.assert_array_equal(got, batch_indices(n, b, 0, steps, shuffle=True, seed=5))
    assert not np.array_equal(got, batch_indices(n, b, 0, steps, shuffle=True, seed=6))
    for k in (1, 10, 11, 33, 51):
        np.testing.assert_array_equal(
            batch_indices(n, b, k, steps - k, shuffle=True, seed=5), got[k:]
        )


def test_normalize_host_and_device_agree_bitwise():
    rng = np.random.default_rng(2)
    x = np.concatenate([np.arange(256, dtype=np.uint8),
                        rng.integers(0, 256, 4 * 28 * 28 - 256, dtype=np.uint8)])
    x = x.reshape(4, 28, 28)
    want = x.astype(np.float32) / 255
    assert want.dtype == np.float32
    host = normalize_host(x)
    assert host.dtype == np.float32 and host.shape == x.shape
    np.testing.assert_array_equal(host.view(np.uint32), want.view(np.uint32))
    device = np.asarray(normalize(jnp.asarray(x)))
    jitted = np.asarray(jax.jit(normalize)(jnp.asarray(x)))
    for out in (device, jitted):
        assert out.dtype == np.float32 and out.shape == x.shape
        np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
    assert PIXEL_SCALE[0] == 0.0 and PIXEL_SCALE[255] == 1.0


def test_the_device_dataset_is_normalised_there_to_the_hosts_bits(small):
    """put_dataset and to_device send uint8 images and make them float32 on the device:
    the host's bits, the mesh's replicated sharding, the labels as they were."""
    from rnnjax import parallel
    from rnnjax.data.pipeline import float_images, to_device

    dp = parallel.DataParallel.from_config(Config())
    placed = dp.dataset(small)
    assert placed.train_images.sharding.is_equivalent_to(dp.replicated, 3)
    for on_device in (placed, to_device(small)):
        for got, images in ((on_device.train_images, small.train_images),
                            (on_device.test_images, small.test_images)):
            assert got.dtype == jnp.float32 and got.shape == images.shape
            assert np.asarray(got).tobytes() == normalize_host(images).tobytes()
        for got, labels in ((on_device.train_labels, small.train_labels),
                            (on_device.test_labels, small.test_labels)):
            np.testing.assert_array_equal(np.asarray(got), labels)
    with pytest.raises(ValueError, match="images of dtype float32: the dataset's images are "
                                         "uint8"):
        float_images(to_device(small))  # already float32


@pytest.mark.parametrize("shuffle", [False, True])
def test_host_batches(small, shuffle):
    images, labels = small.train_images, small.train_labels
    b, start, steps = 64, 3, 25  # 600 examples: batches straddle the wrap
    batches = list(host_batches(images, labels, b, start, steps, shuffle=shuffle, seed=9,
                                chunk=4))
    assert len(batches) == steps
    rows = batch_indices(600, b, start, steps, shuffle=shuffle, seed=9)
    for (x, y), row in zip(batches, rows, strict=True):
        assert x.shape == (b, 28, 28) and x.dtype == np.float32
        assert y.shape == (b,) and y.dtype == np.int32
        np.testing.assert_array_equal(x, images[row].astype(np.float32) / 255)
        np.testing.assert_array_equal(y, labels[row])
    default_chunk = list(host_batches(images, labels, b, start, steps, shuffle=shuffle, seed=9))
    for (x1, y1), (x2, y2) in zip(batches, default_chunk, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


# --------------------------------------------------------------------------- tfds


@pytest.fixture(scope="module")
def tfds_mnist():
    pytest.importorskip("tensorflow_datasets")
    from rnnjax.data import tfds_mnist

    return tfds_mnist


@pytest.fixture(scope="module")
def tfds_built(tfds_mnist, tmp_path_factory, mnist):
    """The small derived set (600/100) prepared once as rnnjax_idx in a temporary tfds dir."""
    root = tmp_path_factory.mktemp("tfds_case")
    arrays = derived_set(mnist)
    directory = write_set(root / "small", arrays)
    tfds_dir = root / "tfds"
    builder = tfds_mnist.prepare("small", directory, None, str(tfds_dir))
    return SimpleNamespace(arrays=arrays, directory=directory, tfds_dir=tfds_dir,
                           builder=builder, name="small")


def test_tfds_build(tfds_built):
    builder = tfds_built.builder
    assert builder.name == "rnnjax_idx"
    assert builder.builder_config.name.startswith("small_")
    splits = builder.info.splits
    assert splits["train"].num_examples == 600 and splits["test"].num_examples == 100
    assert Path(builder.data_dir).is_dir()
    assert Path(builder.data_dir).is_relative_to(tfds_built.tfds_dir)


def test_tfds_load_arrays_equals_idx(tfds_mnist, tfds_built):
    t = tfds_built
    got = tfds_mnist.load_arrays(t.name, t.directory, None, str(t.tfds_dir))
    assert_arrays_equal(got, t.arrays)
    assert_arrays_equal(got, load_idx_dir(t.directory))


def test_tfds_prepare_reuses(tfds_mnist, tfds_built, monkeypatch, tmp_path):
    t = tfds_built
    data_dir = Path(t.builder.data_dir)
    before = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")}

    class Generated(Exception):
        pass

    def no_generation(self, dl_manager):
        raise Generated

    monkeypatch.setattr(tfds_mnist.RnnjaxIdx, "_split_generators", no_generation)
    builder = tfds_mnist.prepare(t.name, t.directory, None, str(t.tfds_dir))
    assert Path(builder.data_dir) == data_dir
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")} == before
    assert_arrays_equal(tfds_mnist.load_arrays(t.name, t.directory, None, str(t.tfds_dir)),
                        t.arrays)
    # The patch does bite: a fresh tfds dir has to generate.
    with pytest.raises(Generated):
        tfds_mnist.prepare(t.name, t.directory, None, str(tmp_path / "fresh"))


def test_tfds_build_verifies_checksums(tfds_mnist, tfds_built, tmp_path):
    t = tfds_built
    sums = content_md5s(t.directory)
    sums["train-labels-idx1-ubyte"] = "0" * 32
    with pytest.raises(IdxError, match="content MD5"):
        tfds_mnist.prepare(t.name, t.directory, sums, str(tmp_path / "tfds"))


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize(("batch_size", "start_step"), [(64, 0), (64, 7), (50, 12), (600, 2)])
def test_tfds_train_batches_in_order_match_host_batches(
    tfds_mnist, tfds_built, batch_size, start_step
):
    t = tfds_built
    steps = max(25, 1300 // batch_size)  # more than two epochs, crossing the wrap
    got = _take(tfds_mnist.train_batches(t.name, t.directory, None, str(t.tfds_dir),
                                         batch_size, start_step=start_step), steps)
    want = host_batches(t.arrays.train_images, t.arrays.train_labels, batch_size,
                        start_step, steps)
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        assert x.dtype == np.float32 and x.shape == (batch_size, 28, 28)
        assert y.dtype == np.int32 and y.shape == (batch_size,)
        np.testing.assert_array_equal(x.view(np.uint32), wx.view(np.uint32))
        np.testing.assert_array_equal(y, wy)


def _example_ids(images: np.ndarray, lookup: dict[bytes, int]) -> list[int]:
    return [lookup[(image * 255).round().astype(np.uint8).tobytes()] for image in images]


def test_tfds_train_batches_shuffled(tfds_mnist, tfds_built):
    t = tfds_built
    lookup = {image.tobytes(): i for i, image in enumerate(t.arrays.train_images)}
    assert len(lookup) == 600

    def stream(seed, start_step=0):
        it = tfds_mnist.train_batches(t.name, t.directory, None, str(t.tfds_dir), 50,
                                      start_step=start_step, shuffle=True, seed=seed)
        return _take(it, 24 - start_step)  # two epochs of 12 batches

    first = stream(3)
    ids = [i for x, _ in first for i in _example_ids(x, lookup)]
    labels = np.concatenate([y for _, y in first])
    np.testing.assert_array_equal(labels, t.arrays.train_labels[ids])
    epoch0, epoch1 = ids[:600], ids[600:]
    assert sorted(epoch0) == list(range(600)) and sorted(epoch1) == list(range(600))
    assert epoch0 != list(range(600)) and epoch0 != epoch1
    for (x1, y1), (x2, y2) in zip(first, stream(3), strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    other = stream(4)
    assert not all(np.array_equal(y1, y2) for (_, y1), (_, y2) in zip(first, other, strict=True))
    for (x1, y1), (x2, y2) in zip(first[5:], stream(3, start_step=5), strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_tfds_through_config(tfds_built):
    t = tfds_built
    config = Config(source="tfds", dataset=str(t.directory), tfds_dir=str(t.tfds_dir))
    assert_arrays_equal(load_arrays(config), t.arrays)
    # Same name and directory, so the same tfds config: the prepared build, not a second one.
    assert [p.name for p in (t.tfds_dir / "rnnjax_idx").iterdir()] == [
        t.builder.builder_config.name
    ]


def _batches_each_feed_trains_on(monkeypatch, config: Config, data: Arrays) -> list:
    """The ``(images, labels)`` that every train step of ``config``'s feed trains on,
    recorded inside the compiled step: the loop's own feed code (``rnnjax.loop``) runs a
    train step that records its batch and leaves the state as it is."""
    from rnnjax import loop, parallel, train
    from rnnjax.model import gather_sequences, make_model
    from rnnjax.optim import make_optimizer

    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def record(state, xs, labels, model, optimizer, rows=None):
        # xs: the batch's time-major rows [T, B, W] (train_steps: the set's, [T, N, W], and
        # the batch's rows), back to images [B, H, W].
        if rows is not None:
            xs = gather_sequences(xs, rows)
        jax.debug.callback(lambda x, y: seen.append((np.swapaxes(x, 0, 1), np.array(y))),
                           xs, labels, ordered=True)
        return state._replace(step=state.step + 1), train.zero_metrics()

    assert config.order == "rows"
    monkeypatch.setattr(train, "_update", record)  # what train_step and train_steps run
    model, optimizer = make_model(config), make_optimizer(config)
    dp = parallel.DataParallel.from_config(config)
    state = dp.replicate(train.create_state(jax.random.key(0), model, optimizer))
    if config.feed == "device":
        run = loop.device_feed(config, model, optimizer, dp, dp.dataset(data))
    else:
        run = loop.stream_feed(config, model, optimizer, dp, data, 0)
    for first, count, _ in loop.segments(config):
        state, _, _ = run(state, first, count)
    jax.effects_barrier()
    assert int(state.step) == config.steps
    return seen


@pytest.mark.parametrize("shuffle", [False, True], ids=["in_order", "shuffled"])
def test_every_feed_yields_bit_identical_batches(monkeypatch, tfds_built, shuffle):
    """The batches the train step receives from the device feed (cut on the device, 4 steps
    per call), the NumPy stream and the tf.data stream, compared bit for bit over 2.7
    epochs (batches of 64 of 600 examples straddle each epoch's end), in order and with
    --shuffle: the device feed and the NumPy stream alike, the seed's order or the seeded
    permutation of each epoch; the tf.data stream in order alike, shuffled its own
    permutation of each epoch, of the same bits."""
    t = tfds_built
    config = Config(steps=25, eval_every=10, steps_per_call=4, batch_size=64, hidden_size=8,
                    shuffle=shuffle, seed=3, dataset=str(t.directory), tfds_dir=str(t.tfds_dir))
    images, labels = t.arrays.train_images, t.arrays.train_labels
    feeds = {
        "device": config,
        "numpy": config.replace(feed="stream"),
        "tf.data": config.replace(feed="stream", source="tfds"),
    }
    got = {name: _batches_each_feed_trains_on(monkeypatch, c, t.arrays)
           for name, c in feeds.items()}
    rows = batch_indices(len(labels), 64, 0, 25, shuffle=shuffle, seed=3)
    assert len(set(rows.ravel().tolist())) == 600 and rows.size > 2 * 600
    for name, batches in got.items():
        assert len(batches) == 25, name
        for x, y in batches:
            assert x.dtype == np.float32 and x.shape == (64, 28, 28), name
            assert y.dtype == np.int32 and y.shape == (64,), name
    orders = ["device", "numpy"] if shuffle else ["device", "numpy", "tf.data"]
    for name in orders:
        for step, ((x, y), row) in enumerate(zip(got[name], rows, strict=True)):
            assert x.tobytes() == normalize_host(images[row]).tobytes(), (name, step)
            assert y.tobytes() == labels[row].tobytes(), (name, step)
    if shuffle:  # tf.data's own order: each epoch a permutation, each batch exact bits
        lookup = {normalize_host(image).tobytes(): i for i, image in enumerate(images)}
        ids = [lookup[image.tobytes()] for x, _ in got["tf.data"] for image in x]
        assert sorted(ids[:600]) == sorted(ids[600:1200]) == list(range(600))
        assert ids[:600] != ids[600:1200] and ids[:600] != list(range(600))
        assert np.concatenate([y for _, y in got["tf.data"]]).tobytes() == \
            labels[ids].tobytes()
