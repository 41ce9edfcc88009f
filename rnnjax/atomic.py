"""Files replaced atomically: written beside their place under a name of their own, then
renamed over it. A reader, or a kill, sees the old file or the new one, never half of one;
two writers of one path never share a temporary file, and nobody's ``NAME.tmp`` is touched.

Imports nothing heavy: the tuner's parent process writes through it before JAX starts.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write(path: Path | str, fill: Callable[[BinaryIO], object]) -> Path:
    """Replace ``path`` by what ``fill`` writes into the binary file it is given. On any
    error the temporary file is removed and the error raised; ``path`` is as it was. An
    OSError that names no file (a write's: a full disk, a file-size limit) names ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600, as open() would have made it
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    return path


def write_text(path: Path | str, text: str) -> Path:
    """Replace ``path`` by ``text`` (UTF-8) atomically (:func:`write`)."""
    return write(path, lambda f: f.write(text.encode()))


def probe(directory: Path | str) -> None:
    """Write a file in ``directory`` and remove it: the OSError where it takes none. Tried,
    not read from permission bits, which bind neither root nor a read-only file system."""
    fd, name = tempfile.mkstemp(prefix=".rnnjax-write-probe-", dir=directory)
    os.close(fd)
    os.unlink(name)


def _umask() -> int:
    """The process's umask, read where Linux shows it: setting it to read it back would
    open a window in which another thread's new files take the wrong mode."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask
