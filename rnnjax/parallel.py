"""Data parallelism over every device, and across processes (hosts), with ``jax.sharding``.

One 1-D :class:`~jax.sharding.Mesh` with the axis ``"data"`` spans the chosen devices of
every process. Parameters, optimizer state and (for MNIST) the device-resident dataset are
*replicated* on it; each step's batch is *sharded* over ``"data"``. The pure functions of
``rnnjax.train`` are jitted on arrays already placed with these shardings (``put_*``,
:class:`DataParallel`), results replicated by ``out_shardings``:
the loss is a mean over the global batch, so XLA's SPMD partitioner computes each device's
part of the forward and backward pass on its rows and inserts the all-reduce of the
gradients (and of the metric sums) itself. No ``pmap``, no hand-written ``psum``.

Several processes (several hosts, or several processes on one host) each run the same
program; :func:`initialize` starts ``jax.distributed`` from the config or the environment
first. Each process then feeds only its own rows of every global batch
(:func:`process_rows`) and :func:`put_process_batch` assembles the global array.

The mesh orders devices by process, so every process owns one contiguous block of rows of
the global batch, and the rows of a batch go to devices in the same order for any device
count: results do not depend on how many devices share the work (up to the summation
order of the all-reduce).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rnnjax.config import Config, ConfigError
from rnnjax.data.idx import Arrays
from rnnjax.data.pipeline import float_images

DATA = "data"
# jax.distributed.initialize's own deadline, past --coordinator-timeout: the one rnnjax
# keeps (_stop_unless_started) stops first, with a line saying what to check.
JAX_GRACE_S = 30
WAIT_NOTE_S = 10  # how long processes wait to join before a note says they are waiting
EXIT_NOT_STARTED = 2  # as the CLI's usage errors


def initialize(config: Config) -> bool:
    """Start ``jax.distributed`` when the config or the environment asks for it.

    ``--coordinator-address HOST:PORT`` with ``--num-processes`` and ``--process-id``
    names everything explicitly; ``--coordinator-address auto`` (or an unset address with
    ``JAX_COORDINATOR_ADDRESS`` in the environment) lets JAX detect the rest (Cloud TPU pod
    slices, SLURM, Open MPI, Kubernetes). Nothing to do for one process. Must run before
    any JAX computation; a second call does nothing. Returns whether it initialised.
    """
    if jax.distributed.is_initialized() or not starts_distributed(config):
        return False
    address = config.coordinator_address
    kwargs: dict[str, Any] = {}
    if address and address != "auto":
        kwargs["coordinator_address"] = address
    if config.num_processes > 1 or kwargs:
        kwargs.update(num_processes=config.num_processes, process_id=config.process_id)
    if "coordinator_address" in kwargs:
        _check_host(address)
        if config.process_id == 0:
            _check_port_free(address)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with _stop_unless_started(config, kwargs.get("coordinator_address", "auto")):
            jax.distributed.initialize(
                **kwargs, initialization_timeout=config.coordinator_timeout + JAX_GRACE_S)
    except (ValueError, RuntimeError) as e:  # nothing detected, or no coordinator found
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"jax.distributed did not start ({first}); pass --coordinator-address HOST:PORT "
            "--num-processes N --process-id I, or run where JAX detects the cluster (SLURM, "
            "Open MPI, Kubernetes, a Cloud TPU slice)"
        ) from None
    _keep_sigterm(sigterm)
    return True


def _keep_sigterm(handler: Any) -> None:
    """Give SIGTERM back the ``handler`` it had before ``jax.distributed.initialize``, whose
    preemption notifier takes it over: a run of several processes then trained on to its
    end through a scheduler's stop (SLURM's, Kubernetes'), as if never asked, until the
    SIGKILL that follows lost everything since its last checkpoint. rnnjax reads no
    preemption sync point, so a process stops at SIGTERM as one alone does. (Only the main
    thread may set a handler; elsewhere it is left.)"""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def _stop_unless_started(config: Config, address: str) -> Iterator[None]:
    """Around ``jax.distributed.initialize``, which waits for every process to join (with its
    GIL released): a note on stderr where it waits long (:data:`WAIT_NOTE_S`, or a third of
    the timeout), and where it has not returned in ``--coordinator-timeout`` seconds one
    line naming what to check, then exit 2. JAX's own deadline (the timeout and
    :data:`JAX_GRACE_S`) killed the process with SIGABRT and a C++ stack trace, after minutes
    of silence, where a process was missing, the address wrong, or its port unreachable."""
    timeout, n = config.coordinator_timeout, config.num_processes
    if address == "auto":
        who, start = "this process (the cluster JAX detected)", "every process of the cluster"
    else:
        who = f"process {config.process_id} of {n} at {address}"
        start = (f"each of --process-id 0 to {n - 1} once, with the same --coordinator-address "
                 f"and --num-processes (process 0 on {address.rpartition(':')[0]})")

    def say(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def stop() -> None:
        say(f"rnnjax: error: jax.distributed did not start in --coordinator-timeout "
            f"{timeout} s: {who} waited for the others. Start {start}, and check that every "
            "host reaches the port; or give a longer --coordinator-timeout")
        os._exit(EXIT_NOT_STARTED)

    timers = [threading.Timer(min(WAIT_NOTE_S, timeout / 3), say, [
                  f"rnnjax: {who}: waiting for the others to join jax.distributed (up to "
                  f"--coordinator-timeout {timeout} s)"]),
              threading.Timer(timeout, stop)]
    for timer in timers:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        for timer in timers:
            timer.cancel()


def _check_host(address: str) -> None:
    """:class:`ConfigError` where ``address``'s host has no address here (a typo): every
    process looked it up again and again, silent, until JAX's deadline killed it."""
    host, _, port = address.rpartition(":")
    try:
        socket.getaddrinfo(host.removeprefix("[").removesuffix("]"), int(port),
                           type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(
            f"--coordinator-address {address}: the host {host} is not found here "
            f"({getattr(e, 'strerror', None) or e}); give process 0's host name or IP "
            "address, the same for every process") from None


def _check_port_free(address: str) -> None:
    """:class:`ConfigError` where process 0 cannot serve ``jax.distributed`` on
    ``address``'s port, which something here already listens on (the service's own failure
    to bind it crashed the process: a segfault, exit 139)."""
    port = int(address.rpartition(":")[2])
    for family in (socket.AF_INET6, socket.AF_INET):  # IPv6 (dual stack) where the host has it
        try:
            probe = socket.socket(family)
        except OSError:  # no such family here (a kernel without IPv6)
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds
            try:
                probe.bind(("", port))
            except OSError as e:
                raise ConfigError(
                    f"--coordinator-address {address}: process 0 serves the run on port "
                    f"{port}, which is in use on this machine ({e.strerror or e}); choose "
                    "another port (the same for every process)") from None
        return


def calls_must_finish() -> bool:
    """Whether each compiled call of a run must finish before the next starts: several
    processes on the CPU backend, whose gloo collectives deadlock under back-to-back
    asynchronous calls with several devices a process (jax 0.10.2: 2 processes of 2 CPU
    devices stopped for good within 100-300 calls, in plain JAX too, and 300 calls with a
    wait after each took 1 s). On the CPU a wait costs little: the host and the devices
    share the cores. Call after :func:`initialize`."""
    return jax.process_count() > 1 and jax.default_backend() == "cpu"


def starts_distributed(config: Config, env: dict[str, str] | None = None) -> bool:
    """Whether :func:`initialize` starts ``jax.distributed`` for ``config`` (``env``: this
    process's environment by default): a run of several processes, whose count
    ``--coordinator-address auto`` leaves to JAX to find."""
    env = os.environ if env is None else env
    return bool(config.coordinator_address or config.num_processes > 1
                or env.get("JAX_COORDINATOR_ADDRESS"))


def agree(refusal: Exception | None) -> None:
    """Raise ``refusal``, this process's reason not to run, in every process of the run
    (a refusal only process 0 can make, its workdir's lock: the others had waited in
    their first collective until jax.distributed gave up, minutes later, and aborted)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = multihost_utils.process_allgather(np.int32(refusal is not None))
        if refusal is None and refused.any():
            first = int(np.flatnonzero(refused)[0])
            raise ConfigError(f"process {first} of this run refused to start it (its error "
                              "says why)")
    if refusal is not None:
        raise refusal


def select_devices(num_devices: int = 0) -> list[jax.Device]:
    """The first ``num_devices`` devices of every process (0: all), ordered by process.

    Every process computes the same list, as the mesh requires.
    """
    local = jax.local_device_count()
    if num_devices > local:
        raise ConfigError(
            f"--num-devices {num_devices} but this process sees only {local} "
            f"{jax.default_backend()} device(s); use at most {local}, or 0 for all"
        )
    by_process: dict[int, list[jax.Device]] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    chosen = []
    for process in sorted(by_process):
        group = sorted(by_process[process], key=lambda d: d.id)
        chosen += group[:num_devices] if num_devices else group
    return chosen


def make_mesh(devices: Sequence[jax.Device] | None = None, num_devices: int = 0) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: :func:`select_devices`)."""
    if devices is None:
        devices = select_devices(num_devices)
    return Mesh(np.array(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, the dataset)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"``: one block of rows per device."""
    return NamedSharding(mesh, P(DATA))


def steps_sharding(mesh: Mesh) -> NamedSharding:
    """``[K, B]`` per-step batch indices: each device holds its rows of every step."""
    return NamedSharding(mesh, P(None, DATA))


def num_shards(mesh: Mesh) -> int:
    """How many ways a batch is split: the size of the ``"data"`` axis (all processes)."""
    return mesh.shape[DATA]


def check_batch(batch_size: int, devices: int, flag: str = "--batch-size") -> None:
    """Raise :class:`ConfigError` naming batch sizes that work when ``batch_size`` does not
    divide evenly over ``devices`` (the size of the mesh's ``"data"`` axis)."""
    n = devices
    if batch_size % n == 0:
        return
    below = batch_size // n * n
    examples = " or ".join(str(b) for b in (below, below + n) if b > 0)
    raise ConfigError(
        f"{flag} {batch_size} does not divide over {n} devices; use a multiple of {n} "
        f"such as {examples} (or fewer devices with --num-devices)"
    )


def _put_global(tree: Any, sharding: NamedSharding) -> Any:
    """Host (or single-device) arrays that every process holds whole, laid out by
    ``sharding``; works across processes (each one fills only its own devices)."""
    if jax.process_count() == 1:  # no host round trip for arrays already on a device
        return jax.device_put(tree, sharding)

    def put(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """``tree`` (the same on every process) replicated on every device of ``mesh``."""
    return _put_global(tree, replicated(mesh))


def put_sharded(tree: Any, sharding: NamedSharding) -> Any:
    """Global host arrays (the same on every process) split by ``sharding``."""
    return _put_global(tree, sharding)


def process_rows(mesh: Mesh, batch_size: int) -> slice:
    """This process's rows of a global batch: the rows its devices hold under
    :func:`batch_sharding` (contiguous, as :func:`make_mesh` orders devices by process)."""
    check_batch(batch_size, num_shards(mesh))
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    starts = sorted({index[0].start or 0 for index in index_map.values()})
    size = batch_size // num_shards(mesh)
    lo, hi = starts[0], starts[-1] + size
    if hi - lo != size * len(starts):
        raise ValueError(f"this process's devices hold non-contiguous rows {starts} of the "
                         "batch; build the mesh with rnnjax.parallel.make_mesh")
    return slice(lo, hi)


def put_process_batch(tree: Any, mesh: Mesh, batch_size: int) -> Any:
    """This process's rows (:func:`process_rows`) of a global batch -> the global array,
    sharded over ``"data"`` (``jax.make_array_from_process_local_data``)."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:  # the local rows are the whole batch; device_put is faster
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda local: jax.make_array_from_process_local_data(
            sharding, np.asarray(local), (batch_size, *np.shape(local)[1:])
        ),
        tree,
    )


def put_dataset(data: Arrays, mesh: Mesh) -> Arrays:
    """The whole dataset replicated on every device of ``mesh``, images normalised once to
    float32 [N, H, W(, C)] in [0, 1] (as ``data.pipeline.to_device``).

    Replicated, not sharded: every device can then cut any batch (in order or shuffled) by
    a local row gather, with no communication. MNIST is 220 MB as float32, small next to
    an accelerator's memory; a dataset that does not fit on one device belongs on
    ``--feed stream``, where each process only holds its rows of the current batch.
    The uint8 images cross and are normalised on the devices, asynchronously
    (``data.pipeline.float_images``).
    """
    return float_images(put_replicated(data, mesh), replicated(mesh))


@dataclass(frozen=True)
class DataParallel:
    """A data-parallel layout over ``mesh``: its shardings and how to place arrays on it."""

    mesh: Mesh

    @classmethod
    def from_config(cls, config: Config) -> DataParallel:
        """The mesh over ``--num-devices`` devices of every process; the batch must divide
        evenly over them (:class:`ConfigError` naming sizes that do, otherwise)."""
        mesh = make_mesh(num_devices=config.num_devices)
        check_batch(config.batch_size, num_shards(mesh))
        return cls(mesh)

    def model(self, model: Any) -> Any:
        """``model`` (an ``rnnjax.model.Model``) to run on this mesh: where it has several
        devices, one whose native layers run each device's rows (``cells.split_rows``)."""
        return dataclasses.replace(model, mesh=self.mesh) if num_shards(self.mesh) > 1 \
            else model

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    @property
    def batch(self) -> NamedSharding:
        return batch_sharding(self.mesh)

    @property
    def steps(self) -> NamedSharding:
        return steps_sharding(self.mesh)

    def replicate(self, tree: Any) -> Any:
        """:func:`put_replicated`."""
        return put_replicated(tree, self.mesh)

    def shard_steps(self, indices: np.ndarray) -> jax.Array:
        """Global int32 [K, B] batch indices (the same on every process), split on B."""
        return put_sharded(indices, self.steps)

    def rows(self, batch_size: int) -> slice:
        """:func:`process_rows`."""
        return process_rows(self.mesh, batch_size)

    def global_batch(self, local: Any, batch_size: int) -> Any:
        """:func:`put_process_batch`."""
        return put_process_batch(local, self.mesh, batch_size)

    def dataset(self, data: Arrays) -> Arrays:
        """:func:`put_dataset`."""
        return put_dataset(data, self.mesh)

    def describe(self) -> dict[str, Any]:
        return describe(self.mesh)


def describe(mesh: Mesh) -> dict[str, Any]:
    """JSON-able facts of the layout: devices in the mesh (all, this process's), processes."""
    return {
        "mesh_devices": int(mesh.size),
        "local_mesh_devices": len(mesh.local_devices),
        "processes": jax.process_count(),
        "process_index": jax.process_index(),
    }
