"""What only a whole, short-lived process may set: Python's cyclic garbage collector.

``rnnjax`` (:func:`rnnjax.cli.run`) and the tuner's children (``python -m rnnjax.measure``)
import JAX, build a few programs, run them and exit. Each collection the imports set off
scans every object made so far (JAX's modules make hundreds of thousands, alive until the
process ends), and so do the interpreter's last collections at exit. So the collector is
off while the process imports, those objects are then frozen out of every later collection
(``gc.freeze``) with the collector on again for what the run makes (``rnnjax train``: once
it is tuned, a first run's tuning spent waiting on its children), and everything is
frozen at the end. Measured on the seed run, six whole processes each way in turns: the
time outside the training loop 1.08-1.52 s (median 1.27) against 1.56-2.10 (1.71), about
0.15 s of it the imports and 0.3 s the exit.

Never from a library call: a process that goes on after it would keep what was garbage
at the freeze for good.

And what only a process's start can set: transparent huge pages for the buffers XLA:CPU
allocates (:func:`huge_pages_on`). glibc's malloc asks the kernel for them with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, which it reads once, when the process starts;
``rnnjax train`` starts itself again with it (:func:`restart`) where the tuner chose them.

And what a process must set before JAX's backend starts: the CPUs it runs on
(:func:`first_cpus`, :func:`run_on`; ``rnnjax.runtime.apply_cpus``), by which XLA:CPU
sizes its thread pools.

And what a process must set before it imports TensorFlow (``--source tfds``): its start-up
lines on stderr (:data:`QUIET_TENSORFLOW`), which would come before a one-line error.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import NoReturn

HUGE_PAGES = "glibc.malloc.hugetlb=1"  # glibc 2.35+: madvise(MADV_HUGEPAGE) its large blocks
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
GLIBC_WITH_HUGETLB = (2, 35)
# TensorFlow's import prints lines on stderr: that oneDNN is on (whatever
# TF_CPP_MIN_LOG_LEVEL says) and, at INFO, the CPU's instructions. Each is set where the user
# has not set it. Its oneDNN options change only its own math (matrix products, convolutions),
# none of which rnnjax's tf.data pipelines do; XLA reads TF_CPP_MIN_LOG_LEVEL too, so its INFO
# lines (TF_CPP_VMODULE's) then need TF_CPP_MIN_LOG_LEVEL=0 given. Set by the rnnjax program
# for the runs that read --source tfds only (``rnnjax.cli``).
QUIET_TENSORFLOW = {"TF_CPP_MIN_LOG_LEVEL": "1", "TF_ENABLE_ONEDNN_OPTS": "0"}


def quiet_tensorflow(env: MutableMapping[str, str]) -> None:
    """Set each variable of :data:`QUIET_TENSORFLOW` in ``env`` (a process's environment)
    that it does not set already."""
    for name, value in QUIET_TENSORFLOW.items():
        env.setdefault(name, value)


def importing() -> None:
    """At the process's start: no collections while it imports."""
    gc.disable()


def imported() -> None:
    """The process has imported what it runs on: what exists now leaves the collector's
    view for good, and the collector is on again."""
    gc.freeze()
    gc.enable()


def exiting() -> None:
    """The process is about to exit: nothing for the interpreter's last collections."""
    gc.freeze()


def _tunables(env: Mapping[str, str]) -> list[str]:
    """The ``name=value`` settings of ``env``'s ``$GLIBC_TUNABLES``."""
    return [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]


def huge_pages_on(env: Mapping[str, str] | None = None) -> bool:
    """Whether a process started with ``env`` (default: this one's) asks for transparent
    huge pages: ``$GLIBC_TUNABLES`` holds :data:`HUGE_PAGES`."""
    return HUGE_PAGES in _tunables(os.environ if env is None else env)


def hugetlb_setting(env: Mapping[str, str] | None = None) -> str | None:
    """The ``glibc.malloc.hugetlb`` value ``env``'s (default: this process's)
    ``$GLIBC_TUNABLES`` sets, None where it sets none."""
    settings = [t.partition("=")[2] for t in _tunables(os.environ if env is None else env)
                if t.startswith("glibc.malloc.hugetlb=")]
    return settings[-1] if settings else None


def huge_pages_unavailable(env: Mapping[str, str] | None = None) -> str | None:
    """None where asking for huge pages changes what a process gets here, else why not: a
    libc other than glibc 2.35+, a kernel whose transparent huge pages are not given on
    request (``[madvise]``: ``[always]`` gives them to every process, ``[never]`` to none),
    or a ``glibc.malloc.hugetlb`` setting of the user's own in ``env``'s
    ``$GLIBC_TUNABLES`` (left as it is)."""
    env = os.environ if env is None else env
    libc, version = platform.libc_ver()
    try:
        release = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        release = ()
    if libc != "glibc" or release < GLIBC_WITH_HUGETLB:
        return f"needs glibc 2.35 or later, this is {libc or 'another libc'} {version}".strip()
    try:
        mode = THP_MODE.read_text().strip()
    except OSError:
        return f"this kernel has no transparent huge pages ({THP_MODE} unreadable)"
    if "[madvise]" not in mode:
        return f"this kernel's transparent huge pages are '{mode}', not given on request"
    if hugetlb_setting(env) is not None:
        return "$GLIBC_TUNABLES already sets glibc.malloc.hugetlb"
    return None


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a process that asks for huge pages: :data:`HUGE_PAGES` added to its
    ``$GLIBC_TUNABLES`` (the other tunables kept)."""
    return {**env, "GLIBC_TUNABLES": ":".join(
        [t for t in _tunables(env) if not t.startswith("glibc.malloc.hugetlb=")] + [HUGE_PAGES])}


def restart(env: Mapping[str, str]) -> NoReturn:
    """Replace this process with ``python -m rnnjax`` of the same arguments under ``env``
    (the same process id, its output so far flushed). Only from :func:`rnnjax.cli.run`,
    before anything is written: nothing of this process survives."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "rnnjax", *sys.argv[1:]], dict(env))


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity), or [] where the OS gives no way to
    set them (``os.sched_setaffinity``: Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))


def cpu_count() -> int:
    """How many CPUs this process may use: its affinity's, else (no way to set it) the
    machine's."""
    return len(usable_cpus()) or os.cpu_count() or 1


def first_cpus(count: int) -> list[int]:
    """The first ``count`` of :func:`usable_cpus`, all of them for 0 (``--cpus``); a
    ValueError naming the fix where the process may use fewer, or the OS cannot set them."""
    cpus = usable_cpus()
    if count == 0:
        return cpus
    if not cpus:
        raise ValueError(f"--cpus {count}: this OS gives no way to set the CPUs a process runs "
                         "on (Linux does); pass --cpus 0 for all")
    if count > len(cpus):
        have, up_to = (("1 CPU", "--cpus 1") if len(cpus) == 1 else
                       (f"{len(cpus)} CPUs", f"--cpus 1 to {len(cpus)}"))
        raise ValueError(f"--cpus {count}: this process may use only {have}; pass {up_to}, "
                         "or --cpus 0 for all")
    return cpus[:count]


def run_on(cpus: list[int]) -> None:
    """Run every thread of this process on ``cpus`` (threads they start later inherit it;
    the threads are listed again until none is new, for one started meanwhile by a thread
    not yet moved). A ValueError names what the OS refused."""
    done: set[int] = set()
    while True:
        try:
            threads = {int(tid) for tid in os.listdir("/proc/self/task")} - done
        except OSError:
            threads = {0} - done  # no /proc: this thread, whose later threads inherit it
        if not threads:
            return
        for tid in threads:
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
            except OSError as e:
                raise ValueError(f"--cpus {len(cpus)}: the OS refused to run this process on "
                                 f"CPUs {cpus} ({e}); pass --cpus 0 for all") from None
        done |= threads
