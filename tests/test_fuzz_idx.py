"""The IDX reader fuzzed: whatever the bytes, a correct parse or rnnjax's own ``IdxError``.

Never another exception, never a hang, never an allocation the size of what a header
declares. Exhaustive where the space is small (every dtype code, every truncation point of
a valid file, raw and gzip), hypothesis where it is not (random bytes, header fields over
their whole range, mutated files in a dataset directory, gzip bombs).
"""

from __future__ import annotations

import gzip
import hashlib
import tempfile
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rnnjax.data import idx
from rnnjax.data.idx import FILES, Arrays, IdxError, load_idx_dir, parse_idx, read_idx

# The IDX dtype codes and what they mean, written out independently of idx._DTYPES.
CODES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
U32 = 2**32 - 1
# Generous for a shared 2-core machine; a hang or a declared-size allocation is far worse.
FUZZ = settings(max_examples=300, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def header(code: int, shape: tuple[int, ...], magic: bytes = b"\0\0") -> bytes:
    return magic + bytes([code, len(shape)]) + np.asarray(shape, ">u4").tobytes()


def idx_file(array: np.ndarray, code: int) -> bytes:
    return header(code, array.shape) + array.astype(CODES[code]).tobytes()


def reference(data: bytes) -> np.ndarray:
    """What a well-formed IDX file holds, decoded here without rnnjax."""
    code, ndim = data[2], data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, CODES[code], offset=4 + 4 * ndim).reshape(shape)


def bounded(fn: Callable[[], object], budget: int, seconds: float = 1.5) -> object:
    """Run ``fn``; assert it allocates at most ``budget`` bytes at peak and returns fast.

    tracemalloc counts every thread's allocations and the clock every pause of the machine,
    so a call past either bound runs once more and the lesser of each counts: what ``fn``
    allocates is the same each time (a 3.9 MB peak from elsewhere came once, on Python
    3.13, and not again). Returns its result, or the ``IdxError`` it raised; any other
    exception propagates.
    """
    peaks, times = [], []
    for _ in range(2):
        tracemalloc.start()
        start = time.perf_counter()
        try:
            try:
                result: object = fn()
            except IdxError as e:
                result = e
            times.append(time.perf_counter() - start)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        if peaks[-1] <= budget and times[-1] < seconds:
            break
    assert min(peaks) <= budget, f"peak allocation {min(peaks)} bytes > {budget}"
    assert min(times) < seconds, f"took {min(times):.2f} s"
    return result


def check_parse(data: bytes) -> np.ndarray | IdxError:
    """parse_idx(data): IdxError, or exactly the reference decoding; memory ~ len(data)."""
    result = bounded(lambda: parse_idx(data, "fuzzed"), budget=4 * len(data) + (1 << 16))
    if isinstance(result, IdxError):
        assert str(result).startswith("fuzzed: "), result  # names its source
        return result
    assert isinstance(result, np.ndarray)
    want = reference(data)
    assert result.shape == want.shape
    assert result.dtype == want.dtype.newbyteorder("=") and result.dtype.isnative
    assert result.flags.owndata and result.flags.writeable  # a copy, not a view of data
    np.testing.assert_array_equal(result, want)
    return result


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A directory for hypothesis examples (function-scoped tmp_path would be shared)."""
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------- parse_idx


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data):
    check_parse(data)


@FUZZ
@given(code=st.sampled_from(sorted(CODES)), ndim=st.integers(0, 255), body=st.binary(max_size=64))
def test_random_bytes_behind_a_plausible_header(code, ndim, body):
    # Random dimension words and data: most declare sizes the body does not hold.
    check_parse(b"\0\0" + bytes([code, ndim]) + body)


sizes = st.one_of(st.integers(0, 6), st.integers(0, U32), st.sampled_from([U32, 2**31, 2**16]))


@FUZZ
@given(
    magic=st.one_of(st.just(b"\0\0"), st.binary(min_size=2, max_size=2)),
    code=st.one_of(st.sampled_from(sorted(CODES)), st.integers(0, 255)),
    shape=st.lists(sizes, min_size=0, max_size=70).map(tuple),
    ndim=st.one_of(st.none(), st.integers(0, 255)),
    extra=st.integers(-3, 3),
)
def test_header_fields_over_their_range(magic, code, shape, ndim, extra):
    """Every header field anywhere in its range; the data as long as declared (capped) +-3."""
    head = magic + bytes([code, len(shape) if ndim is None else ndim])
    head += np.asarray(shape, ">u4").tobytes()
    itemsize = np.dtype(CODES.get(code, "u1")).itemsize
    declared = itemsize * int(np.prod(shape, dtype=object)) if shape else 0
    length = max(0, min(declared, 4096) + extra)
    data = head + bytes(range(256)) * (length // 256) + bytes(length % 256)
    result = check_parse(data)
    if ndim is None:  # a consistent header: it parses exactly when everything is right
        ok = magic == b"\0\0" and code in CODES and 0 < len(shape) <= 32
        if not ok or declared > idx.MAX_BYTES or length != declared:
            assert isinstance(result, IdxError)
        elif 0 not in shape:
            assert isinstance(result, np.ndarray)


@pytest.mark.parametrize("code", range(256))
def test_every_dtype_code(code):
    array = np.arange(6).reshape(2, 3)
    data = idx_file(array, code if code in CODES else 0x08)
    data = data[:2] + bytes([code]) + data[3:]
    result = check_parse(data)
    if code in CODES:
        np.testing.assert_array_equal(result, array)
    else:
        assert isinstance(result, IdxError) and f"dtype code 0x{code:02x}" in str(result)


@pytest.mark.parametrize("ndim", [0, 1, 2, 3, 31, 32, 33, 64, 65, 100, 255])
def test_every_rank(ndim):
    """Ranks 1..255 with every size 1: a parse where NumPy can hold the array, else IdxError."""
    result = check_parse(header(0x08, (1,) * ndim) + b"\x07")
    if ndim == 0:
        assert "0 dimensions" in str(result)
    elif isinstance(result, np.ndarray):
        assert result.shape == (1,) * ndim and result.item() == 7
    else:
        assert ndim > 32 and "dimensions" in str(result), result


@pytest.mark.parametrize(
    "shape",
    [(0, U32, U32, U32), (0, U32, U32), (U32, 0), (0,) + (U32,) * 20, (2**31, 2**31, 0)],
)
def test_empty_array_with_enormous_dimensions(shape):
    # Zero elements, but sizes NumPy cannot index: an IdxError, not NumPy's ValueError.
    result = check_parse(header(0x08, shape))
    if isinstance(result, np.ndarray):
        assert result.shape == shape and result.size == 0


@FUZZ
@given(code=st.sampled_from(sorted(CODES)),
       shape=st.lists(st.integers(1, U32), min_size=1, max_size=8).map(tuple))
def test_huge_declared_sizes_are_not_allocated(code, shape):
    declared = np.dtype(CODES[code]).itemsize * int(np.prod(shape, dtype=object))
    assume(declared > 1 << 20)
    data = header(code, shape) + bytes(4096)  # far less than declared: nothing that big
    result = bounded(lambda: parse_idx(data, "huge"), budget=1 << 16, seconds=0.5)
    assert isinstance(result, IdxError)


# --------------------------------------------------------------------------- truncation


VALID = {
    "uint8 [3, 4, 5]": idx_file(np.arange(60).reshape(3, 4, 5) % 256, 0x08),
    "int32 [7]": idx_file(np.arange(-3, 4), 0x0C),
    "float64 [2, 2]": idx_file(np.array([[0.5, -1.0], [np.inf, 3.0]]), 0x0E),
    "int16 [1, 1, 1, 1]": idx_file(np.array([[[[-2]]]]), 0x0B),
}


@pytest.mark.parametrize("name", list(VALID))
def test_truncation_at_every_byte_raw(tmp_path, name):
    data = VALID[name]
    path = tmp_path / "f"
    path.write_bytes(data)
    np.testing.assert_array_equal(read_idx(path), reference(data))
    for cut in range(len(data)):  # every boundary: inside the magic, dims and data
        path.write_bytes(data[:cut])
        with pytest.raises(IdxError, match=r"too short|truncated") as info:
            read_idx(path)
        assert str(path) in str(info.value)
    for extra in (b"\0", b"\xff" * 9):
        path.write_bytes(data + extra)
        with pytest.raises(IdxError, match="bytes after the declared"):
            read_idx(path)


@pytest.mark.parametrize("name", list(VALID))
def test_truncation_at_every_byte_gzip(tmp_path, name):
    data = VALID[name]
    compressed = gzip.compress(data, mtime=0)
    path = tmp_path / "f.gz"
    for cut in range(len(compressed)):  # the gzip stream cut anywhere
        path.write_bytes(compressed[:cut])
        with pytest.raises(IdxError) as info:
            read_idx(path)
        assert str(path) in str(info.value)
    for cut in range(len(data)):  # a valid gzip of a cut IDX file
        path.write_bytes(gzip.compress(data[:cut], mtime=0))
        with pytest.raises(IdxError, match=r"too short|truncated"):
            read_idx(path)
    path.write_bytes(compressed)
    np.testing.assert_array_equal(read_idx(path), reference(data))


# --------------------------------------------------------------------------- gzip


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_as_gzip(scratch, body):
    path = scratch / "random.gz"
    path.write_bytes(b"\x1f\x8b" + body)
    result = bounded(lambda: read_idx(path), budget=1 << 20)
    if isinstance(result, IdxError):
        assert str(path) in str(result)


@FUZZ
@given(name=st.sampled_from(list(VALID)), data=st.data())
def test_mutated_gzip(scratch, name, data):
    """A valid .gz with bytes flipped, removed or inserted anywhere."""
    good = bytearray(gzip.compress(VALID[name], mtime=0))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(good) - 1))
        kind = data.draw(st.sampled_from(["flip", "drop", "insert"]))
        if kind == "flip":
            good[at] ^= data.draw(st.integers(1, 255))
        elif kind == "drop":
            del good[at]
        else:
            good[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    path = scratch / "mutated.gz"
    path.write_bytes(bytes(good))
    result = bounded(lambda: read_idx(path), budget=1 << 20)
    if isinstance(result, np.ndarray):  # e.g. a flip in the header's mtime or OS byte
        np.testing.assert_array_equal(result, reference(VALID[name]))


def bomb(size: int, members: int = 1) -> bytes:
    """A small gzip file of ``members`` members that together expand to ``size`` zeros."""
    part = size // members
    member = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    one = member.compress(bytes(part)) + member.flush()
    return one * members


@pytest.mark.parametrize("members", [1, 2, 50])
def test_gzip_bomb(tmp_path, monkeypatch, members):
    monkeypatch.setattr(idx, "MAX_BYTES", 1 << 20)
    path = tmp_path / "bomb.gz"
    path.write_bytes(bomb(64 << 20, members))  # 64 MiB of zeros in a few KiB
    assert path.stat().st_size < 200_000
    result = bounded(lambda: read_idx(path), budget=4 << 20, seconds=3)
    assert isinstance(result, IdxError)
    assert "decompresses to more than 1048576 bytes" in str(result)
    # Just under the bound it is read (and then judged as IDX: zeros are no valid header).
    path.write_bytes(bomb((1 << 20) - 64, members))
    with pytest.raises(IdxError, match=r"0 dimensions|wrong magic|dtype code"):
        read_idx(path)


@FUZZ
@given(size=st.integers(0, 3000), members=st.integers(1, 5), limit=st.integers(16, 2048))
def test_decompression_bound_is_exact(scratch, size, members, limit):
    """Output over MAX_BYTES fails as a bomb; at or under it, the content is judged as IDX."""
    # An IDX uint8 vector of size - 8 zeros (or, under 8 bytes, a cut header of zeros).
    payload = (header(0x08, (size - 8,)) if size >= 8 else b"") + bytes(max(size - 8, size))
    payload = payload[:size]
    step = max(1, -(-len(payload) // members))
    parts = [payload[i : i + step] for i in range(0, len(payload), step)] or [b""]
    path = scratch / "bounded.gz"
    path.write_bytes(b"".join(gzip.compress(p, mtime=0) for p in parts))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(idx, "MAX_BYTES", limit)
        result = bounded(lambda: read_idx(path), budget=1 << 20)
    if size > limit:
        assert isinstance(result, IdxError) and "decompresses to more than" in str(result)
    elif size >= 8:
        np.testing.assert_array_equal(result, np.zeros(size - 8, np.uint8))
    else:  # a cut header of zeros
        assert isinstance(result, IdxError)


# --------------------------------------------------------------------------- load_idx_dir


def tiny_set() -> Arrays:
    rng = np.random.default_rng(3)
    return Arrays(
        rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        np.array([1, 9, 0], np.int32),
        rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        np.array([4, 2], np.int32),
    )


def tiny_files() -> dict[str, bytes]:
    arrays = tiny_set()
    return {stem: idx_file(getattr(arrays, key), 0x08) for key, stem in FILES.items()}


def mutations() -> st.SearchStrategy:
    """A replacement for one file's content: random, mutated, or a valid IDX of any shape."""
    any_idx = st.builds(
        lambda code, shape, fill: header(code, shape)
        + bytes([fill]) * (np.dtype(CODES[code]).itemsize * int(np.prod(shape))),
        st.sampled_from(sorted(CODES)),
        st.lists(st.sampled_from([0, 1, 2, 3, 27, 28]), min_size=1, max_size=3).map(tuple),
        st.integers(0, 255),
    )
    return st.one_of(
        st.binary(max_size=100),
        st.tuples(st.integers(0, 5000), st.binary(max_size=8)).map(lambda t: ("splice", *t)),
        any_idx,
    )


@settings(FUZZ, max_examples=120)
@given(
    stem=st.sampled_from(list(FILES.values())),
    replacement=mutations(),
    compress=st.booleans(),
    md5sums=st.one_of(st.none(), st.binary(max_size=120),
                      st.text(st.characters(codec="utf-8"), max_size=120)),
)
def test_load_idx_dir_fuzzed(stem, replacement, compress, md5sums):
    files = tiny_files()
    content = files[stem]
    if isinstance(replacement, tuple):  # splice a few bytes in at a position
        _, at, piece = replacement
        at %= len(content) + 1
        content = content[:at] + piece + content[at + len(piece) :]
    else:
        content = replacement
    files[stem] = content
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for name, data in files.items():
            if compress:
                (directory / (name + ".gz")).write_bytes(gzip.compress(data, mtime=0))
            else:
                (directory / name).write_bytes(data)
        if isinstance(md5sums, bytes):
            (directory / "MD5SUMS").write_bytes(md5sums)
        elif isinstance(md5sums, str):
            (directory / "MD5SUMS").write_text(md5sums, encoding="utf-8")
        total = sum(len(data) for data in files.values())
        result = bounded(lambda: load_idx_dir(directory), budget=4 * total + (1 << 20))
    if isinstance(result, IdxError):
        assert tmp in str(result), result  # names the directory or the file in it
        return
    assert isinstance(result, Arrays)
    for images, labels in ((result.train_images, result.train_labels),
                           (result.test_images, result.test_labels)):
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
        assert labels.dtype == np.int32 and labels.shape == (len(images),) and len(images)
        assert labels.min() >= 0 and labels.max() <= 9


def test_load_idx_dir_tiny_set_is_read():
    """The fuzzed directory's unmutated baseline parses (so the fuzzing is not vacuous)."""
    files = tiny_files()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for name, data in files.items():
            (directory / name).write_bytes(data)
        sums = "".join(f"{hashlib.md5(d).hexdigest()}  {n}\n" for n, d in files.items())
        (directory / "MD5SUMS").write_text(sums)
        got = load_idx_dir(directory)
    for field in Arrays._fields:
        np.testing.assert_array_equal(getattr(got, field), getattr(tiny_set(), field))


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage\x80", "é".encode("latin-1")])
def test_undecodable_md5sums_is_an_idx_error(tmp_path, content):
    for name, data in tiny_files().items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "MD5SUMS").write_bytes(content)
    with pytest.raises(IdxError, match="MD5SUMS"):
        load_idx_dir(tmp_path)
