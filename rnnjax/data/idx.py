"""A strict NumPy reader for IDX files (the MNIST format), raw or gzip-compressed.

IDX layout: two zero bytes, a dtype code, the number of dimensions ``n``, then ``n``
big-endian uint32 sizes and the data. Every fault (missing file, bad gzip, wrong magic,
wrong dtype code, truncated or over-long data, sizes that disagree, labels out of range,
wrong checksum of the content or of the file as stored, a checksum file that names none
of the files) raises :class:`IdxError` naming the file and the fault.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

# The canonical MD5s of the *uncompressed* MNIST files (LeCun et al.).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Far above any 28x28 set (MNIST's train images are 47 MB); guards against a header that
# declares terabytes: such a file is rejected before anything that size is allocated.
MAX_BYTES = 1 << 32
# IDX allows 255 dimensions; NumPy holds 32 (NumPy 1) or 64 (NumPy 2). Real files use 1-4.
MAX_NDIM = 32


class IdxError(ValueError):
    """A malformed, truncated or corrupted IDX file; the message names the file."""


class Arrays(NamedTuple):
    """One dataset in memory.

    train_images, test_images: uint8 [N, 28, 28] from IDX files (any source: [N, H, W] for
    one channel, [N, H, W, C] for more; ``rnnjax.data.spec.DataSpec``); labels int32 [N].
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def fingerprint(self, every: int = 64) -> str:
        """SHA-256 of both splits' labels and of every ``every``-th image, in order, with
        their dtypes and shapes: what tells this dataset (and this order of it) from
        another, whatever source read it. MNIST: about 1 ms at 64; ``every`` 1 hashes
        every image (an edited copy of a few images told apart too)."""
        h = hashlib.sha256()
        for a in (self.train_images[::every], self.train_labels, self.test_images[::every],
                  self.test_labels):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape};".encode())
            h.update(a.tobytes())
        return h.hexdigest()


def find_file(directory: Path, stem: str) -> Path:
    """``directory/stem`` or ``directory/stem.gz``, whichever exists."""
    for name in (stem + ".gz", stem):
        path = directory / name
        if path.is_file():
            return path
    raise IdxError(
        f"{directory}: missing {stem}(.gz); a dataset directory needs the four IDX files "
        f"{', '.join(FILES.values())} (gzip-compressed or not)"
    )


def read_file(path: Path) -> bytes:
    """The bytes of ``path`` as stored (gzip-compressed or not)."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise IdxError(f"{path}: cannot read ({e.strerror or e})") from e


def gunzip(raw: bytes, path: Path) -> bytes:
    """The uncompressed content of ``raw``, the bytes of ``path`` (``raw`` itself when they
    are not gzip); ``path`` only names the file in errors."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        # Bound the output so a gzip bomb cannot exhaust memory.
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = d.decompress(raw, MAX_BYTES + 1)
        # A gzip file may be several concatenated members (zero padding between them
        # allowed, as in gzip(1) and Python's gzip): read them all; other trailing bytes fail.
        while d.eof and len(out) <= MAX_BYTES and (rest := d.unused_data.lstrip(b"\0")):
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += d.decompress(rest, MAX_BYTES + 1 - len(out))
        if len(out) > MAX_BYTES:
            raise IdxError(f"{path}: decompresses to more than {MAX_BYTES} bytes")
        if not d.eof:
            raise IdxError(f"{path}: truncated gzip stream; download the file again")
        return out
    except (zlib.error, EOFError, gzip.BadGzipFile) as e:
        raise IdxError(f"{path}: corrupt gzip data ({e}); download the file again") from e


def read_bytes(path: Path) -> bytes:
    """The uncompressed content of ``path`` (gunzipped when it is gzip)."""
    return gunzip(read_file(path), path)


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array of the declared dtype and shape (native byte order)."""
    if len(data) < 4:
        raise IdxError(f"{name}: {len(data)} bytes is too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise IdxError(
            f"{name}: wrong magic number {data[:4].hex()} (IDX files start with 0000); "
            "not an IDX file"
        )
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise IdxError(f"{name}: unknown IDX dtype code 0x{code:02x}")
    if ndim == 0:
        raise IdxError(f"{name}: IDX header declares 0 dimensions")
    if ndim > MAX_NDIM:
        raise IdxError(f"{name}: IDX header declares {ndim} dimensions, more than the "
                       f"{MAX_NDIM} supported; not an IDX file of a dataset")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{name}: truncated header ({len(data)} of {header} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[code])
    expected = extent = dtype.itemsize
    for s in shape:
        expected *= s
        extent *= max(s, 1)  # bounded too: NumPy cannot shape even an empty array past 2^63
        if expected > MAX_BYTES:
            raise IdxError(f"{name}: header declares {shape}, over {MAX_BYTES} bytes")
    if extent > MAX_BYTES:
        raise IdxError(f"{name}: header declares {shape}: no data, but sizes whose product "
                       f"is over {MAX_BYTES}; the header is corrupt")
    actual = len(data) - header
    if actual < expected:
        raise IdxError(
            f"{name}: truncated: header declares {shape} = {expected} bytes of data, "
            f"file holds {actual}; download the file again"
        )
    if actual > expected:
        raise IdxError(
            f"{name}: {actual - expected} bytes after the declared {shape} data; "
            "the file is corrupt or not what its header says"
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def read_md5sums(directory: Path) -> dict[str, str]:
    """The checksums listed in ``directory/MD5SUMS.raw`` or else ``directory/MD5SUMS``, in
    the form :func:`load_idx_dir` takes; ``{}`` when there is neither file.

    Lines are ``md5sum``'s (``HASH  NAME`` or ``HASH *NAME``); a NAME is matched on its last
    component (``./``, directories dropped), lines naming no IDX file are ignored. In
    ``MD5SUMS`` a name ``STEM.gz`` stays ``STEM.gz``: its sum is the MD5 of the file as stored
    (``md5sum *.gz > MD5SUMS``, as Fashion-MNIST and KMNIST publish); a sum under ``STEM`` is
    of the uncompressed content. ``MD5SUMS.raw`` lists uncompressed content MD5s only: its
    names lose ``.gz``. A checksum file that names none of the four IDX files (nothing would
    be verified) is an :class:`IdxError`.
    """
    for name in ("MD5SUMS.raw", "MD5SUMS"):
        path = directory / name
        if path.is_file():
            try:
                text = path.read_bytes().decode("utf-8")
            except OSError as e:
                raise IdxError(f"{path}: cannot read ({e.strerror or e})") from e
            except UnicodeDecodeError as e:
                raise IdxError(f"{path}: not a text checksum file ({e.reason} at byte "
                               f"{e.start}); fix or delete it") from e
            return _parse_md5sums(text, path, content_only=name == "MD5SUMS.raw")
    return {}


def _parse_md5sums(text: str, path: Path, content_only: bool) -> dict[str, str]:
    """``{STEM or STEM.gz: md5}`` of the lines of ``text`` that name one of :data:`FILES`
    (``content_only``: every name as its STEM); ``path`` names the file in errors."""
    known = {*FILES.values(), *(stem + ".gz" for stem in FILES.values())}
    sums = {}
    for line in text.splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            continue
        base = PurePosixPath(parts[1].strip().lstrip("*")).name
        if base in known:
            sums[base.removesuffix(".gz") if content_only else base] = parts[0].lower()
    if not sums:
        how = ("the uncompressed files' MD5s (`zcat FILE.gz | md5sum`)" if content_only
               else "`md5sum *.gz > MD5SUMS` in that directory")
        raise IdxError(f"{path}: names none of the IDX files {', '.join(FILES.values())} "
                       f"(.gz), so nothing would be verified; write it as {how}, or delete it")
    return sums


def read_idx(
    path: Path | str, checksum: str | None = None, *, file_checksum: str | None = None
) -> np.ndarray:
    """Read one IDX file; with ``checksum``, verify the uncompressed content's MD5 first,
    with ``file_checksum`` the MD5 of the file as stored (the ``.gz`` itself)."""
    path = Path(path)
    raw = read_file(path)
    _verify(path, raw, file_checksum, "file")
    data = gunzip(raw, path)
    _verify(path, data, checksum, "content")
    return parse_idx(data, str(path))


def _verify(path: Path, data: bytes, expected: str | None, what: str) -> None:
    """IdxError unless ``data`` (the ``what`` of ``path``: its file or its content) has
    the MD5 ``expected`` (None: nothing to check)."""
    if expected is None:
        return
    got = md5(data)
    if got != expected:
        raise IdxError(
            f"{path}: {what} MD5 {got} does not match the expected {expected}; "
            "the file is corrupt or another dataset: replace it with the original"
        )


SPLITS = ("train", "test")


def empty_like(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A split of no examples beside ``images`` (another split's): images of their shape
    and dtype, labels int32, each of length 0."""
    return np.empty((0, *images.shape[1:]), images.dtype), np.empty((0,), np.int32)


def load_idx_dir(directory: Path | str, checksums: dict[str, str] | None = None,
                 splits: tuple[str, ...] = SPLITS) -> Arrays:
    """Load the four IDX files of a 28x28 classification set from ``directory`` (those of
    ``splits`` alone: ``("test",)`` reads the two t10k files, the train split then empty,
    :func:`empty_like`, as ``rnnjax eval`` reads them).

    checksums: expected MD5s: under a file stem (``train-images-idx3-ubyte``), of its
    uncompressed content; under ``STEM.gz``, of that gzip file as stored (which must then be
    the file there). When None, an ``MD5SUMS.raw`` or ``MD5SUMS`` file in the directory
    gives them, if present (:func:`read_md5sums`). Images come back uint8 [N, 28, 28],
    labels int32 [N].
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IdxError(f"{directory}: no such dataset directory")
    if checksums is None:
        checksums = read_md5sums(directory)
    out = {}
    for key, stem in FILES.items():
        if key.split("_")[0] not in splits:
            continue
        path = find_file(directory, stem)
        file_checksum = checksums.get(stem + ".gz")
        if file_checksum is not None and path.name != stem + ".gz":
            raise IdxError(f"{path}: the checksums list {stem}.gz, which is not in "
                           f"{directory}; put {stem}.gz back, or list {path.name}'s MD5")
        out[key] = read_idx(path, checksums.get(stem), file_checksum=file_checksum)
    for split in splits:
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise IdxError(
                f"{directory}: {split} images are {images.dtype} {images.shape}, "
                "expected uint8 [N, 28, 28]"
            )
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise IdxError(f"{directory}: {split} labels are {labels.dtype} {labels.shape}, "
                           "expected integers [N]")
        if len(images) != len(labels):
            raise IdxError(
                f"{directory}: {len(images)} {split} images but {len(labels)} labels; "
                "the files belong to different sets"
            )
        if len(labels) == 0:
            raise IdxError(f"{directory}: the {split} split is empty")
        if labels.min() < 0 or labels.max() > 9:
            raise IdxError(
                f"{directory}: {split} labels outside 0-9 (min {labels.min()}, "
                f"max {labels.max()})"
            )
        out[f"{split}_labels"] = labels.astype(np.int32)
    for split in set(SPLITS) - set(splits):
        read = out[f"{splits[0]}_images"]
        out[f"{split}_images"], out[f"{split}_labels"] = empty_like(read)
    return Arrays(**out)


def write_idx(path: Path | str, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as IDX (gzip when ``compress`` or the name ends in .gz), atomically."""
    path = Path(path)
    codes = {np.dtype(v).newbyteorder("=").str: k for k, v in _DTYPES.items()}
    dtype = np.dtype(array.dtype).newbyteorder("=")
    code = codes.get(dtype.str)
    if code is None:
        raise IdxError(f"{path}: dtype {array.dtype} has no IDX code")
    big = np.ascontiguousarray(array, dtype=np.dtype(_DTYPES[code]))
    payload = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload += big.tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload, mtime=0)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
