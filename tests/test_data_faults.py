"""Faults of the data directories: each is recovered from or explained, never a traceback.

A tfds build killed midway is built again, never reused; a tfds dir that cannot be written,
a missing dataset directory, a directory with three of the four files, labels that do not
match the images, ... are an ``IdxError``/``ConfigError`` naming the place and the fix,
and through the CLI one line on stderr and exit code 2. Files replaced in place get a
fresh tfds build, not the stale one.
"""

from __future__ import annotations

import builtins
import gzip
import hashlib
import io
import json
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from rnnjax.cli import main
from rnnjax.config import Config, ConfigError
from rnnjax.data.idx import FILES, Arrays, IdxError, load_idx_dir, write_idx
from rnnjax.data.sources import load_arrays

REPO = Path(__file__).resolve().parent.parent
N_TRAIN, N_TEST = 300, 60


def subset(mnist: Arrays, offset: int = 0) -> Arrays:
    """A small 28x28 set cut from MNIST (a different one for each offset)."""
    return Arrays(
        mnist.train_images[offset : offset + N_TRAIN].copy(),
        mnist.train_labels[offset : offset + N_TRAIN].copy(),
        mnist.test_images[offset : offset + N_TEST].copy(),
        mnist.test_labels[offset : offset + N_TEST].copy(),
    )


def write_set(directory: Path, arrays: Arrays) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in FILES.items():
        array = getattr(arrays, key)
        write_idx(directory / (stem + ".gz"), array.astype(np.uint8))
    return directory


def assert_same(got: Arrays, want: Arrays) -> None:
    for field in Arrays._fields:
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)


def cli_error(capsys, args: list[str], workdir: Path) -> str:
    """Run ``rnnjax train ARGS``: assert exit 2, one stderr line, no workdir; the line."""
    code = main(["train", *args, "--steps", "2", "--compile-cache", "off",
                 "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("rnnjax: error: ") and err.count("\n") == 1, err
    assert not workdir.exists()  # nothing half-written
    return err


@pytest.fixture(scope="module")
def small(mnist) -> Arrays:
    return subset(mnist)


@pytest.fixture
def small_dir(tmp_path, small) -> Path:
    return write_set(tmp_path / "myset", small)


# --------------------------------------------------------------------------- IDX directories


def test_missing_dataset_directory_cli(capsys, tmp_path):
    err = cli_error(capsys, ["--dataset", str(tmp_path / "absent")], tmp_path / "run")
    assert f"--dataset {tmp_path / 'absent'}: no such directory" in err
    err = cli_error(capsys, ["--dataset", "myset", "--data-dir", str(tmp_path / "nowhere")],
                    tmp_path / "run")
    assert f"not found at {tmp_path / 'nowhere' / 'myset'}" in err and "--data-dir" in err


def test_dataset_path_is_a_file_cli(capsys, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    err = cli_error(capsys, ["--dataset", str(tmp_path / "file")], tmp_path / "run")
    assert "no such directory" in err


@pytest.mark.parametrize("stem", list(FILES.values()))
def test_three_of_four_files_cli(capsys, tmp_path, small_dir, stem):
    (small_dir / (stem + ".gz")).unlink()
    err = cli_error(capsys, ["--dataset", str(small_dir)], tmp_path / "run")
    assert f"{small_dir}: missing {stem}(.gz)" in err
    assert all(name in err for name in FILES.values())  # says what a directory needs


@pytest.mark.parametrize(("key", "cut"), [("train_labels", 1), ("test_images", 7)])
def test_labels_do_not_match_images_cli(capsys, tmp_path, small_dir, small, key, cut):
    write_idx(small_dir / (FILES[key] + ".gz"), getattr(small, key)[:-cut].astype(np.uint8))
    split = key.split("_")[0]
    n = N_TRAIN if split == "train" else N_TEST
    images, labels = (n, n - cut) if key.endswith("labels") else (n - cut, n)
    err = cli_error(capsys, ["--dataset", str(small_dir)], tmp_path / "run")
    assert f"{small_dir}: {images} {split} images but {labels} labels" in err


def test_truncated_file_cli(capsys, tmp_path, small_dir):
    path = small_dir / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    err = cli_error(capsys, ["--dataset", str(small_dir)], tmp_path / "run")
    assert str(path) in err and "truncated" in err and "download the file again" in err


def test_undecodable_md5sums_cli(capsys, tmp_path, small_dir):
    (small_dir / "MD5SUMS").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    err = cli_error(capsys, ["--dataset", str(small_dir)], tmp_path / "run")
    assert f"{small_dir / 'MD5SUMS'}: not a text checksum file" in err


def test_unreadable_dataset_file(tmp_path, small_dir):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading")
    path = small_dir / "t10k-labels-idx1-ubyte.gz"
    path.chmod(0)
    with pytest.raises(IdxError, match="cannot read"):
        load_idx_dir(small_dir)


def test_batch_larger_than_the_dataset_cli(capsys, tmp_path, small_dir):
    err = cli_error(capsys, ["--dataset", str(small_dir), "--batch-size", str(N_TRAIN + 1)],
                    tmp_path / "run")
    assert f"larger than the {N_TRAIN} training examples; use at most {N_TRAIN}" in err


# --------------------------------------------------------------------------- tfds builds


@pytest.fixture(scope="module")
def tfds_mnist():
    pytest.importorskip("tensorflow_datasets")
    from rnnjax.data import tfds_mnist

    return tfds_mnist


def version_dirs(tfds_dir: Path) -> list[Path]:
    return sorted(tfds_dir.glob("rnnjax_idx/*/1.0.0"))


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rnnjax.data import tfds_mnist

    original = tfds_mnist.RnnjaxIdx._generate_examples

    def generate(self, images, labels):
        for i, example in original(self, images, labels):
            yield i, example
            if len(labels) == {n_test} and i == 10:  # the train split is written by now
                print("WRITING", flush=True)
                time.sleep(300)

    tfds_mnist.RnnjaxIdx._generate_examples = generate
    tfds_mnist.prepare("small", Path(sys.argv[1]), None, sys.argv[2])
    print("FINISHED", flush=True)
    """
)


def test_build_killed_midway_is_redone(tfds_mnist, tmp_path, small_dir, small):
    """A real SIGKILL of a process that is writing the build; the next run builds again."""
    tfds_dir = tmp_path / "tfds"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(n_test=N_TEST), str(small_dir), str(tfds_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        lines: list[str] = []  # tfds prints its progress on stdout too
        while time.monotonic() < deadline and lines[-1:] != ["WRITING"]:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                assert line, f"the child ended before writing: {lines}"
                lines.append(line.strip())
        assert lines[-1:] == ["WRITING"], f"the child did not reach the build: {lines}"
        # Mid-write: tfds' temporary directory holds the train split already.
        incomplete = list(tfds_dir.glob("rnnjax_idx/*/incomplete.*"))
        assert len(incomplete) == 1
        assert list(incomplete[0].glob("*train.tfrecord*"))
        assert version_dirs(tfds_dir) == []
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    builder = tfds_mnist.prepare("small", small_dir, None, str(tfds_dir))
    data_dir = Path(builder.data_dir)
    assert version_dirs(tfds_dir) == [data_dir]
    assert (data_dir / "dataset_info.json").is_file()
    assert data_dir not in incomplete and incomplete[0].name not in str(data_dir)
    splits = builder.info.splits
    assert splits["train"].num_examples == N_TRAIN and splits["test"].num_examples == N_TEST
    assert_same(tfds_mnist.load_arrays("small", small_dir, None, str(tfds_dir)), small)


def test_version_dir_without_dataset_info_is_rebuilt(tfds_mnist, tmp_path, small_dir, small):
    """A build directory that is not finished (e.g. an interrupted copy) is never read."""
    tfds_dir = tmp_path / "tfds"
    data_dir = Path(tfds_mnist.prepare("small", small_dir, None, str(tfds_dir)).data_dir)
    (data_dir / "dataset_info.json").unlink()
    for shard in data_dir.glob("*.tfrecord*"):
        shard.write_bytes(shard.read_bytes()[:100])
    assert_same(tfds_mnist.load_arrays("small", small_dir, None, str(tfds_dir)), small)
    assert (data_dir / "dataset_info.json").is_file()


def test_damaged_finished_build_is_explained(tfds_mnist, tmp_path, small_dir):
    tfds_dir = tmp_path / "tfds"
    data_dir = Path(tfds_mnist.prepare("small", small_dir, None, str(tfds_dir)).data_dir)
    shard = next(data_dir.glob("*train.tfrecord*"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="is damaged") as info:
        tfds_mnist.load_arrays("small", small_dir, None, str(tfds_dir))
    message = str(info.value)
    assert str(data_dir) in message and "delete that directory" in message
    assert "\n" not in message


@pytest.mark.parametrize("damaged", ["", "null", "{}", "[]", '{"name": 3}'])
def test_a_build_whose_metadata_was_damaged_since_is_built_again(tfds_mnist, tmp_path,
                                                                   small_dir, small, damaged):
    """A finished build's dataset_info.json emptied or garbled afterwards (a full disk) was
    a traceback (tfds' ParseError, or its AssertionError) on every later run: it is built
    again, as an unfinished one."""
    tfds_dir = tmp_path / "tfds"
    data_dir = Path(tfds_mnist.prepare("small", small_dir, None, str(tfds_dir)).data_dir)
    (data_dir / "dataset_info.json").write_text(damaged)
    assert_same(tfds_mnist.load_arrays("small", small_dir, None, str(tfds_dir)), small)
    assert json.loads((data_dir / "dataset_info.json").read_text())["name"] == "rnnjax_idx"


def test_a_failed_read_of_a_builds_metadata_never_removes_it(tfds_mnist, tmp_path, small_dir,
                                                             small, monkeypatch):
    """Too many files open while reading dataset_info.json was taken for an unfinished build,
    which was removed (under any other process reading it) and built again."""
    import errno

    tfds_dir = tmp_path / "tfds"
    data_dir = Path(tfds_mnist.prepare("small", small_dir, None, str(tfds_dir)).data_dir)
    (data_dir / "marker").write_text("still here")
    real, failed = Path.read_text, []

    def read_text(self, *args, **kwargs):
        if self.name == "dataset_info.json" and not failed:
            failed.append(self)
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert_same(tfds_mnist.load_arrays("small", small_dir, None, str(tfds_dir)), small)
    assert failed and (data_dir / "marker").read_text() == "still here"


def test_replaced_files_rebuild(tfds_mnist, tmp_path, mnist, small_dir, small):
    tfds_dir = tmp_path / "tfds"
    config = Config(source="tfds", dataset=str(small_dir), tfds_dir=str(tfds_dir))
    assert_same(load_arrays(config), small)
    first = version_dirs(tfds_dir)
    # The same content written again (new mtimes, same bytes): the build is reused.
    write_set(small_dir, small)
    assert_same(load_arrays(config), small)
    assert version_dirs(tfds_dir) == first
    # Other files under the same names in the same directory: a build of their own.
    other = subset(mnist, offset=1000)
    write_set(small_dir, other)
    assert_same(load_arrays(config), other)
    assert len(version_dirs(tfds_dir)) == 2 and first[0] in version_dirs(tfds_dir)
    # And back: the first build is found again.
    write_set(small_dir, small)
    assert_same(load_arrays(config), small)
    assert len(version_dirs(tfds_dir)) == 2


def test_changed_md5sums_rebuild_and_verify(tfds_mnist, tmp_path, small_dir):
    tfds_dir = tmp_path / "tfds"
    tfds_mnist.prepare("small", small_dir, None, str(tfds_dir))
    # Expectations that the files fail: not hidden behind the build made before them.
    lines = "".join(f"{'0' * 32}  {stem}\n" for stem in FILES.values())
    (small_dir / "MD5SUMS").write_text(lines)
    with pytest.raises(IdxError, match="content MD5"):
        tfds_mnist.prepare("small", small_dir, None, str(tfds_dir))


def test_a_build_made_unverified_is_not_reused_where_checksums_apply(tfds_mnist, tmp_path,
                                                                    small):
    """The expected checksums key the build: files built once read by path (no checksums:
    none listed) and then read as ``--dataset mnist --data-dir ROOT`` (MNIST's canonical
    MD5s, which these 300 examples fail) are verified, not served from the first build."""
    tfds_dir, root = tmp_path / "tfds", tmp_path / "data"
    directory = write_set(root / "mnist", small)
    by_path = Config(source="tfds", dataset=str(directory), tfds_dir=str(tfds_dir))
    assert_same(load_arrays(by_path), small)
    assert len(version_dirs(tfds_dir)) == 1
    by_name = Config(source="tfds", dataset="mnist", data_dir=str(root), tfds_dir=str(tfds_dir))
    with pytest.raises(IdxError, match=r"content MD5 \w+ does not match the expected"):
        load_arrays(by_name)
    assert len(version_dirs(tfds_dir)) == 1  # the refused build left nothing


@pytest.mark.parametrize("existing", [False, True])
def test_refused_idx_files_leave_the_tfds_dir_as_it_was_cli(tfds_mnist, capsys, tmp_path,
                                                           small_dir, existing):
    """Files that fail their checks with --source tfds: one line, exit 2, and no empty
    ``downloads/extracted`` or ``rnnjax_idx/<config>`` left in the tfds dir (nor the dir
    itself when the run made it); what was there before stays."""
    tfds_dir = tmp_path / "tfds"
    if existing:  # a tfds dir with a finished build of other files in it
        tfds_mnist.prepare("other", write_set(tmp_path / "other", subset(load_idx_dir(
            small_dir))), None, str(tfds_dir))
        capsys.readouterr()  # tfds' progress
    before = sorted(p.relative_to(tfds_dir) for p in tfds_dir.rglob("*"))
    path = small_dir / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    for split in ([], ["--test-split", "test[:10]"]):  # load_arrays, then prepare
        err = cli_error(capsys, ["--source", "tfds", "--dataset", str(small_dir),
                                 "--tfds-dir", str(tfds_dir), *split], tmp_path / "run")
        assert str(path) in err and "truncated" in err
        assert tfds_dir.exists() is existing
        if existing:
            assert sorted(p.relative_to(tfds_dir) for p in tfds_dir.rglob("*")) == before


def test_md5sums_naming_no_idx_file_cli(capsys, tmp_path, small_dir):
    (small_dir / "MD5SUMS").write_text("d41d8cd98f00b204e9800998ecf8427e  ./README\n")
    err = cli_error(capsys, ["--dataset", str(small_dir)], tmp_path / "run")
    assert f"{small_dir / 'MD5SUMS'}: names none of the IDX files" in err
    assert "`md5sum *.gz > MD5SUMS` in that directory, or delete it" in err


def test_md5sums_of_the_gz_files_cli(capsys, tmp_path, small_dir, small):
    """``md5sum ./*.gz > MD5SUMS``: genuine files train; a changed one is refused."""
    lines = "".join(f"{hashlib.md5((small_dir / (s + '.gz')).read_bytes()).hexdigest()}  "
                    f"./{s}.gz\n" for s in FILES.values())
    (small_dir / "MD5SUMS").write_text(lines)
    assert_same(load_arrays(Config(dataset=str(small_dir))), small)
    write_set(small_dir, subset(small, offset=1))  # other files under the same names
    err = cli_error(capsys, ["--dataset", str(small_dir)], tmp_path / "run")
    assert "file MD5" in err and "replace it with the original" in err


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def deny_writes_under(monkeypatch, root: Path) -> None:
    """Make Python's file system calls refuse to change anything under ``root``, as a
    read-only mount would: creating, opening for writing, renaming, removing, touching.

    Independent of the user (root ignores permission bits) and of the file system. Native
    code (TensorFlow's file system) is not covered: :func:`tree_snapshot` is.
    """
    root = root.resolve()

    def under(path) -> bool:
        if not isinstance(path, str | bytes | os.PathLike):  # a descriptor, a mode, times
            return False
        return Path(os.fsdecode(path)).resolve().is_relative_to(root)

    def refuse(path):
        raise PermissionError(13, "Permission denied", os.fsdecode(path))

    def guard(real, *, check=lambda *a, **k: True, paths=1):
        def wrapper(*args, **kwargs):
            if check(*args, **kwargs) and any(under(p) for p in args[:paths]):
                refuse(next(p for p in args[:paths] if under(p)))
            return real(*args, **kwargs)
        return wrapper

    def writes_mode(file, mode="r", *args, **kwargs):
        return any(c in mode for c in "wax+")

    def writes_flags(path, flags, *args, **kwargs):
        return bool(flags & WRITE_FLAGS)

    for name in ("mkdir", "rmdir", "remove", "unlink", "utime", "chmod", "truncate",
                 "symlink", "link", "rename", "replace"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), paths=2))
    monkeypatch.setattr(os, "open", guard(os.open, check=writes_flags))
    monkeypatch.setattr(builtins, "open", guard(builtins.open, check=writes_mode))
    monkeypatch.setattr(io, "open", guard(io.open, check=writes_mode))


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (and ``root``): type, permissions, size, mtime, ctime and,
    for a file, its SHA-256. A directory's mtime changes when an entry is created or removed
    in it, so even a file made and deleted again between two snapshots shows."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) \
            else None
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                            st.st_ctime_ns, content)
    return out


@pytest.mark.parametrize("how", ["chmod", "denied", "under_a_file"])
def test_unwritable_tfds_dir_cli(tfds_mnist, capsys, monkeypatch, tmp_path, small_dir, how):
    tfds_dir = tmp_path / "tfds"
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("running as root: chmod 0o555 does not stop root from writing "
                        "(the 'denied' case covers it)")
        tfds_dir.mkdir()
        tfds_dir.chmod(0o555)
    elif how == "denied":
        tfds_dir.mkdir()
        deny_writes_under(monkeypatch, tfds_dir)
    else:
        (tmp_path / "file").write_text("x")
        tfds_dir = tmp_path / "file" / "tfds"
    try:
        err = cli_error(capsys, ["--source", "tfds", "--dataset", str(small_dir),
                                 "--tfds-dir", str(tfds_dir)], tmp_path / "run")
    finally:
        if how == "chmod":
            tfds_dir.chmod(0o755)
    assert f"--tfds-dir {tfds_dir}: cannot write the tfds build of myset there" in err
    assert "pass --tfds-dir a writable directory" in err


@pytest.mark.parametrize("how", ["chmod", "denied"])
def test_finished_build_in_read_only_tfds_dir_is_read(tfds_mnist, monkeypatch, tmp_path,
                                                      small_dir, small, how):
    """Reading a finished build changes nothing in the tfds dir: no file or directory is
    created, removed or written, even for a moment (compared entry by entry, whatever the
    user: as root, chmod stops nothing, and a refused write could be caught and ignored)."""
    tfds_dir = tmp_path / "tfds"
    tfds_mnist.prepare("small", small_dir, None, str(tfds_dir))
    if how == "chmod":
        for path in [tfds_dir, *tfds_dir.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
    before = tree_snapshot(tfds_dir)
    assert len(before) > 5 and any(key.endswith("dataset_info.json") for key in before)
    try:
        if how == "denied":
            deny_writes_under(monkeypatch, tfds_dir)
        assert_same(tfds_mnist.load_arrays("small", small_dir, None, str(tfds_dir)), small)
        monkeypatch.undo()
        assert tree_snapshot(tfds_dir) == before
    finally:
        monkeypatch.undo()
        for path in [tfds_dir, *tfds_dir.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_deny_writes_under_refuses_every_kind_of_write(monkeypatch, tmp_path):
    """The control of the 'denied' cases above: each way of writing under the directory
    is refused, reading is not, and the rest of the file system is left alone."""
    root = tmp_path / "ro"
    root.mkdir()
    (root / "file").write_text("x")
    deny_writes_under(monkeypatch, root)
    attempts = {
        "mkdir": lambda: os.mkdir(root / "d"),
        "makedirs": lambda: os.makedirs(root / "a" / "b"),
        "open w": lambda: open(root / "new", "w"),  # noqa: SIM115
        "open a": lambda: open(root / "file", "a"),  # noqa: SIM115
        "open r+": lambda: open(root / "file", "r+b"),  # noqa: SIM115
        "os.open": lambda: os.open(root / "new", os.O_WRONLY | os.O_CREAT),
        "write_text": lambda: (root / "file").write_text("y"),
        "rename": lambda: os.rename(root / "file", root / "moved"),
        "rename out": lambda: os.rename(root / "file", tmp_path / "moved"),
        "replace in": lambda: os.replace(tmp_path / "outside", root / "file"),
        "unlink": lambda: os.unlink(root / "file"),
        "touch": lambda: (root / "file").touch(),
        "chmod": lambda: os.chmod(root / "file", 0o600),
        "tempfile": lambda: tempfile.mkstemp(dir=root),
    }
    (tmp_path / "outside").write_text("o")
    before = tree_snapshot(root)
    for name, attempt in attempts.items():
        with pytest.raises(PermissionError):
            attempt()
            pytest.fail(f"{name}: not refused")
    assert (root / "file").read_text() == "x"
    with open(root / "file", "rb") as f:
        assert f.read() == b"x"
    (tmp_path / "elsewhere").write_text("fine")  # outside the directory: allowed
    monkeypatch.undo()
    assert tree_snapshot(root) == before
