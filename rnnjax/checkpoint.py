"""Checkpoints: the whole train state and the run's config, with orbax (a leaf module).

Layout, ``WORKDIR/checkpoints/<S>/`` for the state after ``S`` steps::

    state/   the TrainState pytree (step, params, opt_state), orbax StandardSave
    meta/    JSON: the run's config, the step, the train-metric sums not yet logged,
             the wall time so far, a SHA-256 of the state's bytes and the data the
             model reads (image shape, classes: ``rnnjax.data.spec.DataSpec``)

Writes are atomic. orbax's :class:`CheckpointManager` writes a step into
``<S>.orbax-checkpoint-tmp-<time>/``, puts ``commit_success.txt`` in it once every item
is written, and only then renames it to ``<S>/`` (``AtomicRenameTemporaryPath``, its
default on local file systems). :func:`list_steps` counts only directories named by an
integer that hold ``commit_success.txt``, so a save cut short is never taken for the
latest; the next writer deletes its leftover temporary directory.

orbax is imported on first use, so importing this module (the CLI does) stays cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from rnnjax import __version__
from rnnjax.config import Config, ConfigError, error_line, flag_name, from_dict, to_dict
from rnnjax.data.idx import Arrays
from rnnjax.data.spec import IDX_SPEC, DataSpec

CHECKPOINTS = "checkpoints"
T = TypeVar("T")
COMMIT_FILE = "commit_success.txt"
META_FILE = "metadata"  # orbax JsonSave's file name inside meta/
FORMAT = 1

# Fields that may differ between a checkpoint's config and the run resuming it: where data
# lives, how the work is cut into calls and saved (each call adds its steps' metrics to the
# sums so far, one at a time: rnnjax.loop.SegmentFn). Every other field changes the results
# (``steps`` too when a schedule decays over it; see check_resumable): ``eval_batch_size``
# too, whose chunks sum the test metrics in their own order.
RUN_SETTINGS = frozenset({
    "steps", "data_dir", "tfds_dir", "tfds_download", "source", "feed", "steps_per_call",
    "compile_cache", "checkpoint_every", "keep_checkpoints",
    "num_devices", "coordinator_address", "num_processes", "process_id", "coordinator_timeout",
    "huge_pages",
})


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt or does not fit; the message says the fix."""


def _ocp():
    """orbax.checkpoint, imported on first use, with absl's INFO/WARNING chatter off."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    import orbax.checkpoint as ocp

    return ocp


@contextlib.contextmanager
def _quiet_stragglers(grace_s: float = 0.5) -> Iterator[None]:
    """Keep a failed orbax read or write from spraying tracebacks after its one clean error.

    When one tensorstore read of a restore, or write of a save (a full disk), fails,
    orbax's event loop closes while the others are still in flight; each then reports
    ``RuntimeError: Event loop is closed`` (through ``sys.unraisablehook``, or printed as
    an uncaught error through ``sys.excepthook``), and a failed save's threads log their
    error with its traceback through absl, at ERROR, before orbax raises it. While the
    block runs, and for ``grace_s`` after it fails, those closed-loop errors (and only
    those) are dropped and absl logs only what is fatal; then all is as it was. The error
    raised says what failed.
    """
    from absl import logging as absl_logging

    def closed(error: BaseException | None) -> bool:
        return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)

    previous, previous_except = sys.unraisablehook, sys.excepthook
    verbosity = absl_logging.get_verbosity()

    def hook(unraisable: Any) -> None:
        if not closed(unraisable.exc_value):
            previous(unraisable)

    def except_hook(kind: Any, error: BaseException, trace: Any) -> None:
        if not closed(error):
            previous_except(kind, error, trace)

    sys.unraisablehook, sys.excepthook = hook, except_hook
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        yield
    except BaseException:
        time.sleep(grace_s)
        raise
    finally:
        sys.unraisablehook, sys.excepthook = previous, previous_except
        absl_logging.set_verbosity(verbosity)


def checkpoints_dir(workdir: Path | str) -> Path:
    """Where the checkpoints of a run in ``workdir`` live."""
    return Path(workdir) / CHECKPOINTS


def list_steps(directory: Path | str) -> list[int]:
    """The finished checkpoints in a checkpoints directory, oldest first.

    A directory counts only when its name is an integer and it holds orbax's commit file:
    temporary directories of a save in flight (or killed) never do.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(child.name) for child in directory.iterdir()
                  if _is_step(child) and (child / COMMIT_FILE).is_file())


def _is_step(child: Path) -> bool:
    """A step directory: named by its step, as orbax names one (``6``). One in a
    checkpoints directory named by its step with leading zeros (``06``, renamed by hand)
    is a CheckpointError: orbax would not find it, and its step's directory is not there
    (elsewhere, in a workdir or a folder of runs, ``007`` is no step)."""
    if not (child.name.isdigit() and child.is_dir()):
        return False
    if str(int(child.name)) != child.name:
        if child.parent.name != CHECKPOINTS:
            return False
        raise CheckpointError(
            f"{child} is not named as a step directory is (its step, without leading "
            f"zeros); rename it to {child.parent / str(int(child.name))}, or move it out "
            f"of {child.parent}")
    return True


def latest_step(directory: Path | str) -> int | None:
    """The newest finished checkpoint in ``directory``, or None."""
    steps = list_steps(directory)
    return steps[-1] if steps else None


def has_checkpoints(workdir: Path | str) -> bool:
    """True when ``workdir/checkpoints`` holds a finished checkpoint.

    The leftovers of a save killed before it finished do not count (the next writer
    deletes them): such a workdir holds nothing to resume, and nothing to lose.
    """
    return bool(list_steps(checkpoints_dir(workdir)))


def latest_checkpoint(workdir: Path | str) -> Path:
    """The step directory ``--resume`` continues from: the latest in ``workdir``."""
    directory = checkpoints_dir(workdir)
    step = latest_step(directory)
    if step is None:
        raise CheckpointError(
            f"--resume: no checkpoint in {directory}; train without --resume to start the "
            "run (checkpoints are saved at its end, or every --checkpoint-every steps)"
        )
    return directory / str(step)


def resolve(path: Path | str) -> Path:
    """The step directory that ``path`` names: a step directory itself, a checkpoints
    directory or a workdir (their latest finished checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path}: no such file or directory; pass a step directory "
            "(WORKDIR/checkpoints/STEP) or a workdir that holds checkpoints"
        )
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path}: not a directory; pass a step directory "
            "(WORKDIR/checkpoints/STEP) or a workdir that holds checkpoints"
        )
    holder = path.absolute().parent
    if path.name in ("meta", "state") and (holder / "meta").is_dir() and (
            holder / "state").is_dir():  # orbax marks its items finished too: not a step
        raise CheckpointError(
            f"checkpoint {path}: a part of the checkpoint {path.parent}; pass its step "
            f"directory {path.parent}")
    if (path / "meta").is_dir() or (path / "state").is_dir() or (path / COMMIT_FILE).exists():
        if not (path / COMMIT_FILE).is_file():
            raise CheckpointError(
                f"checkpoint {path} is incomplete (its save never finished); pass another "
                f"step directory of {path.parent}"
            )
        return path
    for directory in (path, checkpoints_dir(path)):
        step = latest_step(directory)
        if step is not None:
            return directory / str(step)
    if (path / "config.json").is_file():  # a run's workdir, stopped before its first save
        raise CheckpointError(
            f"{path} holds no checkpoint: its run stopped before it saved one (a run saves "
            "one at its end, and every --checkpoint-every steps); train it again, or pass "
            "another workdir or step directory")
    raise CheckpointError(
        f"{path} holds no checkpoint; pass a step directory (WORKDIR/checkpoints/STEP) or "
        "a workdir trained with --workdir"
    )


def read_latest(path: Path | str, read: Callable[[Path], T], attempts: int = 5) -> T:
    """``read(step_dir)`` of the checkpoint ``path`` names (:func:`resolve`), also while a
    run still trains there.

    Such a run keeps only its latest ``--keep-checkpoints``: the checkpoint being read may
    be deleted under ``read``, which then fails as if it were corrupt. Given a workdir (or
    its checkpoints directory), the newest checkpoint is read again in its place; given
    that step directory, the error says it was deleted, not that it is corrupt.
    """
    path = Path(path)
    step_dir = resolve(path)
    for _ in range(attempts - 1):
        try:
            return read(step_dir)
        except CheckpointError:
            if step_dir == path:  # asked for this one: deleted, or a true error
                if not (step_dir / COMMIT_FILE).is_file():
                    raise CheckpointError(
                        f"checkpoint {step_dir} was deleted while it was read (a run "
                        "training there keeps only its latest --keep-checkpoints); pass "
                        f"{workdir_of(step_dir)} for its latest checkpoint"
                    ) from None
                raise
            newest = resolve(path)
            if newest == step_dir:  # still the latest: a true error
                raise
            step_dir = newest
    return read(step_dir)


def workdir_of(step_dir: Path) -> Path:
    """The workdir of a step directory (``WORKDIR/checkpoints/STEP``), else its parent
    (``.`` and relative names are read from the working directory)."""
    parent = Path(os.path.abspath(step_dir)).parent
    return parent.parent if parent.name == CHECKPOINTS else parent


def digest(state: Any) -> str:
    """SHA-256 of a pytree's leaves (dtype, shape and bytes, in flattening order)."""
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # noisy_sgd's state
            leaf = jax.random.key_data(leaf)
        array = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def encode_sums(sums: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Additive metric sums -> JSON (each value with its dtype, so it comes back exact)."""
    if sums is None:
        return None
    out = {}
    for name, value in sums.items():
        array = np.asarray(value)
        out[name] = {"dtype": array.dtype.name, "value": array.item()}
    return out


def decode_sums(encoded: Mapping[str, Any] | None) -> dict[str, np.ndarray] | None:
    """Inverse of :func:`encode_sums`: 0-d NumPy arrays of the saved dtypes."""
    if encoded is None:
        return None
    return {name: np.asarray(v["value"], dtype=v["dtype"]) for name, v in encoded.items()}


def sums_digest(encoded: Mapping[str, Any] | None) -> str:
    """SHA-256 of encoded train sums (:func:`encode_sums`), saved beside them: digits
    changed in meta/ that still parse would change the next logged train metrics."""
    return hashlib.sha256(json.dumps(encoded, sort_keys=True).encode()).hexdigest()


def check_sums(encoded: Any) -> None:
    """Raise ValueError unless ``encoded`` (a checkpoint's train sums, :func:`encode_sums`)
    is None or holds each of ``train.METRIC_DTYPES`` as a number of its dtype: the train
    step's compiled program takes nothing else."""
    from rnnjax.train import METRIC_DTYPES  # imports JAX (its backend stays unstarted)

    if encoded is None:
        return
    if not isinstance(encoded, dict) or set(encoded) != set(METRIC_DTYPES):
        raise ValueError(f"the train sums are not {', '.join(METRIC_DTYPES)}")
    for name, dtype in METRIC_DTYPES.items():
        entry = encoded[name]
        if not isinstance(entry, dict) or entry.get("dtype") != dtype:
            raise ValueError(f"the train sum {name} is not of dtype {dtype}")
        value = entry.get("value")
        kinds = (int, float) if dtype.startswith("float") else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"the train sum {name} is not a number of dtype {dtype}")


class CheckpointWriter:
    """Saves train states into a checkpoints directory, keeping the latest ``keep``."""

    def __init__(self, directory: Path | str, keep: int) -> None:
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            create=True,
            cleanup_tmp_directories=True,  # a save cut short by a kill: its tmp dir goes
            enable_async_checkpointing=False,  # the next call may donate the state's buffers
        )
        self._ocp = ocp
        with _quiet_stragglers():  # a step's damaged _CHECKPOINT_METADATA (orbax's own,
            # unread by rnnjax) was an absl ERROR line on a resume that went on fine
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "meta")
            )

    def save(
        self,
        state: Any,
        config: Config,
        *,
        train_sums: Mapping[str, Any] | None = None,
        wall_s: float = 0.0,
        data: Mapping[str, Any] | None = None,
        mesh_devices: int | None = None,
        mesh_processes: int | None = None,
        probes: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save ``state`` as ``<state.step>/`` (no-op when that step exists); its path.

        data: the dataset's ``DataSpec.to_json()`` (image shape, classes) the model reads,
        and its fingerprints (:func:`fingerprints`: :func:`check_same_data`).
        mesh_devices, mesh_processes: the devices it trained on, and the processes they
        were in (a resume on others rounds apart).
        probes: what the run's own cell, order and optimizer compute (``rnnjax.probes``).
        """
        step = int(np.asarray(state.step))
        path = self.directory / str(step)
        if step in self._manager.all_steps() and (path / COMMIT_FILE).is_file():
            return path
        meta = {
            "format": FORMAT,
            "step": step,
            "config": to_dict(config),
            "train_sums": encode_sums(train_sums),
            "train_sums_sha256": sums_digest(encode_sums(train_sums)),
            "wall_s": wall_s if math.isfinite(wall_s) else 0.0,
            "state_sha256": digest(state),
        }
        if data is not None:
            meta["data"] = dict(data)
        if mesh_devices is not None:
            meta["mesh_devices"] = mesh_devices
        if mesh_processes is not None:
            meta["mesh_processes"] = mesh_processes
        if probes is not None:
            meta["probes"] = dict(probes)
        ocp = self._ocp
        try:
            with _quiet_stragglers():
                self._manager.save(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)),
                    force=True,
                )
                self._manager.wait_until_finished()
        except Exception as e:  # orbax raises many types; one line names the directory
            raise CheckpointError(
                f"cannot write checkpoint {path} ({error_line(e, 160)}); free disk space or choose "
                "another --workdir (older checkpoints are intact)"
            ) from e
        return path

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _instead(step_dir: Path) -> str:
    """What to do about the corrupt checkpoint ``step_dir``: as eval and predict take it,
    another step directory; as --resume finds it, the latest, delete it."""
    return (f"pass another step directory of {step_dir.parent}, or delete this one "
            "(--resume then continues from the one before it)")


def read_meta(step_dir: Path | str) -> dict[str, Any]:
    """The JSON saved beside a checkpoint's state.

    Read as plain JSON (the file orbax's JsonSave writes, ``meta/metadata``), not through
    orbax: that would start JAX's backend, which must wait for ``jax.distributed`` when
    several processes resume together.
    """
    step_dir = Path(step_dir)
    try:
        meta = json.loads((step_dir / "meta" / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {step_dir} is corrupt: its meta/ cannot be read ({error_line(e, 160)}); "
            f"{_instead(step_dir)}"
        ) from e
    if not isinstance(meta, dict) or "config" not in meta or "step" not in meta:
        raise CheckpointError(
            f"checkpoint {step_dir} is not an rnnjax checkpoint (meta/ lacks config and "
            "step); pass a directory written by rnnjax train --workdir"
        )
    if meta.get("format", FORMAT) != FORMAT:  # every checkpoint of its run alike: none to delete
        raise CheckpointError(
            f"checkpoint {step_dir} has checkpoint format {meta['format']!r}, and this rnnjax "
            f"{__version__} reads format {FORMAT}; use the rnnjax version that wrote it"
        )
    if step_dir.name.isdigit() and meta["step"] != int(step_dir.name):
        raise CheckpointError(
            f"checkpoint {step_dir} holds step {meta['step']!r}, not {step_dir.name} (a step "
            f"directory renamed, or another's moved in); rename it back to "
            f"{step_dir.parent / str(meta['step'])}, or move it out of {step_dir.parent}"
        )
    try:  # what a resumed run, eval and predict read of it, before they write anything
        check_sums(meta.get("train_sums"))
        decode_sums(meta.get("train_sums"))  # each value within its dtype
        if "train_sums_sha256" in meta and (  # older checkpoints have none
                meta["train_sums_sha256"] != sums_digest(meta.get("train_sums"))):
            raise ValueError("the train sums do not match the checksum saved with them")
        float(meta.get("wall_s") or 0.0)
        if "data" in meta:
            DataSpec.from_json(meta["data"])
            for key in FINGERPRINTS:
                if not isinstance(meta["data"].get(key, ""), str):
                    raise TypeError(f"its data {key} is not a string")
        probes = meta.get("probes", {})  # rnnjax.probes: each {"function": ..., "probe": ...}
        if not (isinstance(probes, dict) and all(
                isinstance(entry, dict) and {"function", "probe"} <= set(entry)
                for entry in probes.values())):
            raise TypeError("its probes are not records of functions")
    except (TypeError, ValueError, OverflowError, KeyError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {step_dir} is corrupt: its meta/ train sums, wall time, data or "
            f"probes do not load ({error_line(e, 160)}); {_instead(step_dir)}"
        ) from e
    return meta


def read_config(step_dir: Path | str, meta: Mapping[str, Any] | None = None) -> Config:
    """The config a checkpoint was trained with."""
    meta = read_meta(step_dir) if meta is None else meta
    try:
        values = dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {step_dir}: its config does not load ({e}); "
                              f"{_instead(Path(step_dir))}") from e
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(Config)})
    if unknown:  # a later rnnjax's: every checkpoint of its run alike, none to delete
        raise CheckpointError(
            f"checkpoint {step_dir} was written by another rnnjax version (its config has "
            f"{', '.join(unknown)}, which this rnnjax {__version__} does not know); use the "
            "rnnjax version that wrote it")
    try:
        return from_dict(values)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {step_dir}: its config does not load ({e}); "
                              f"{_instead(Path(step_dir))}") from e


def data_spec(meta: Mapping[str, Any], config: Config) -> DataSpec:
    """The images and classes a checkpoint's model reads: recorded in ``meta`` (``data``);
    checkpoints written before rnnjax recorded it read 28x28x1 IDX images."""
    if "data" in meta:
        return DataSpec.from_json(meta["data"])
    return DataSpec(IDX_SPEC.image_shape, config.num_classes or IDX_SPEC.num_classes)


def check_data_spec(saved: DataSpec, spec: DataSpec, where: Path | str) -> None:
    """:class:`CheckpointError` when ``spec`` (the dataset's) is not ``saved``, what the
    model of the checkpoint ``where`` reads (:func:`data_spec`)."""
    if saved != spec:
        raise CheckpointError(
            f"checkpoint {where} was trained on {saved.describe()} but the dataset has "
            f"{spec.describe()}; pass the dataset it was trained on (--dataset, --data-dir)"
        )


# The fingerprints of its data a checkpoint records (``data`` in its meta), each with the
# images it hashes (``Arrays.fingerprint``'s every): every 64th (the one older checkpoints
# hold), and all (an edited copy of a few images told apart: what lets --dataset change on
# a resume, :func:`moved_data`).
FINGERPRINTS = {"fingerprint": 64, "fingerprint_all": 1}


def fingerprints(data: Arrays) -> dict[str, str]:
    """:data:`FINGERPRINTS` of ``data``, as a checkpoint records them."""
    return {key: data.fingerprint(every) for key, every in FINGERPRINTS.items()}


def check_same_data(meta: Mapping[str, Any], found: Mapping[str, str], config: Config,
                    where: Path | str) -> None:
    """:class:`CheckpointError` when a resumed run's dataset (``found``, its
    :func:`fingerprints`, which its next checkpoint records) is not the one the checkpoint
    ``where`` (its ``meta``) was trained on, by each fingerprint the checkpoint recorded:
    ``--source``, ``--data-dir``, ``--tfds-dir`` and ``--dataset`` may change on resume
    (the same data moved, or read another way), and a change to other data trained on it
    silently, its metrics appended to the run's. Checkpoints written before rnnjax
    recorded a fingerprint are not checked."""
    recorded = meta.get("data") or {}
    if any(recorded.get(key) not in (None, found[key]) for key in FINGERPRINTS):
        raise CheckpointError(
            f"checkpoint {where} was trained on other data than --dataset {config.dataset} "
            f"(--source {config.source}) reads now (its images or labels, or their order, "
            "differ); pass the --dataset, --source, --data-dir or --tfds-dir of the data it "
            "was trained with"
        )


def restore(step_dir: Path | str, target: Any, meta: Mapping[str, Any] | None = None) -> Any:
    """The state saved in ``step_dir``, with the structure, dtypes and devices of ``target``.

    ``target`` is a state of the checkpoint's config (``train.create_state``), or its
    shapes (``jax.ShapeDtypeStruct`` leaves with shardings: ``inference.state_shapes``):
    they form the abstract restore target, so optimizer states come back as the same
    NamedTuples. The restored bytes are checked against the SHA-256 saved with them; a
    checkpoint without one is refused, never loaded unverified.
    """
    import jax

    step_dir = Path(step_dir)
    meta = read_meta(step_dir) if meta is None else meta
    expected = meta.get("state_sha256")
    if not (isinstance(expected, str) and len(expected) == 64):
        raise CheckpointError(
            f"checkpoint {step_dir} has no SHA-256 of its state in meta/ (rnnjax writes one "
            "with every checkpoint), so its state cannot be verified; pass a checkpoint "
            f"written by rnnjax train --workdir, such as another step directory of "
            f"{step_dir.parent}"
        )
    ocp = _ocp()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    other = None
    try:  # one quiet window for both reads: a failed one's stragglers fire late
        with _quiet_stragglers(), ocp.StandardCheckpointer() as reader:
            other = _other_parameters(reader, step_dir, target)
            if other is None:
                state = reader.restore(step_dir.absolute() / "state", abstract)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {step_dir} is corrupt or does not match its config: the state "
            f"cannot be restored ({error_line(e, 160)}); {_instead(step_dir)}"
        ) from e
    if other is not None:  # not corrupt: nothing to delete (nor read: orbax would cast)
        cell = (meta.get("probes") or {}).get("cell") or {}  # rnnjax.probes' record
        trained = (f" (--cell {meta['config'].get('cell')} = {cell['function']})"
                   if cell.get("function") else "")
        raise CheckpointError(
            f"checkpoint {step_dir} holds the parameters of another model than its config "
            f"makes with this code ({other}): the cell's code changed since it was written "
            "(a cell registered in Python, or a Flax cell class), or rnnjax did; run the "
            f"code it was trained with{trained} (the checkpoint is kept as it is: do not "
            "delete it)")
    if digest(state) != expected:
        raise CheckpointError(
            f"checkpoint {step_dir} is corrupt: the restored state does not match the "
            f"checksum saved with it; {_instead(step_dir)}"
        )
    return state


def _other_parameters(reader: Any, step_dir: Path, target: Any) -> str | None:
    """How the parameters saved in ``step_dir`` (their names, shapes and dtypes, from
    orbax's metadata, read by ``reader``) differ from ``target``'s (a state or its shapes),
    in a few words; None where they do not, or the metadata cannot be read (a corrupt
    checkpoint: the restore says so)."""
    import jax

    def leaves(tree: Any) -> dict[str, str]:
        return {jax.tree_util.keystr(path):
                f"{jax.numpy.dtype(leaf.dtype).name}{list(getattr(leaf, 'shape', ()))}"
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    try:
        saved = reader.metadata(step_dir.absolute() / "state")
        saved = leaves(getattr(saved, "item_metadata", saved)["params"])
    except Exception:  # unreadable: the restore's own error says so
        return None
    mine = leaves(target.params if hasattr(target, "params") else target["params"])
    if saved == mine:
        return None
    differ = sorted(k for k in set(mine) & set(saved) if mine[k] != saved[k])
    parts = [f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
             for label, names in (
                 ("the model has", sorted(set(mine) - set(saved))),
                 ("the checkpoint has", sorted(set(saved) - set(mine))),
                 ("the checkpoint's differ at", [f"{k} ({saved[k]}, not {mine[k]})"
                                                 for k in differ]))
             if names]
    return "; ".join(parts)


def tf_order(config: Config) -> bool:
    """True when batches come shuffled by the tf.data stream, in its own order (the other
    feeds share one order, a function of the seed and the step)."""
    return config.shuffle and config.source == "tfds" and config.feed == "stream"


def moved_data(meta: Mapping[str, Any] | None) -> frozenset[str]:
    """The fields besides :data:`RUN_SETTINGS` a resume of the checkpoint of ``meta`` may
    change: ``dataset`` (a directory moved, or the same set by another name) where it
    recorded the fingerprint of all its data, which then refuses other data
    (:func:`check_same_data`); none for one written before."""
    data = (meta or {}).get("data") or {}
    return frozenset({"dataset"}) if data.get("fingerprint_all") else frozenset()


def same_setting(name: str, saved: Config, other: Config,
                 meta: Mapping[str, Any] | None) -> bool:
    """Whether the field ``name`` of ``saved``, the config of the checkpoint of ``meta``, and
    of ``other`` is one setting: equal, or ``num_classes`` 0 (the dataset's) beside the count
    the checkpoint's model has (:func:`data_spec`)."""
    if getattr(saved, name) == getattr(other, name):
        return True
    if name == "num_classes" and meta is not None:
        classes = data_spec(meta, saved).num_classes
        return (saved.num_classes or classes) == (other.num_classes or classes)
    return False


def check_resumable(saved: Config, current: Config, where: Path | str = "the checkpoint",
                    meta: Mapping[str, Any] | None = None) -> None:
    """Refuse to resume ``saved`` as ``current`` when a field that changes results differs.

    ``steps`` may grow (a constant learning rate), every field of :data:`RUN_SETTINGS`
    may change, and ``dataset`` where the checkpoint's ``meta`` holds its data's
    fingerprint (:func:`moved_data`); ``num_classes`` 0 (the dataset's) and the count the
    checkpoint's model has (:func:`data_spec`) are the same; any other difference is an
    error naming the field and the fix. With
    ``--shuffle``, the tf.data stream (``--source tfds --feed stream``) has its own batch
    order, so switching between it and the other feeds changes results too.
    """
    if tf_order(saved) != tf_order(current):
        raise CheckpointError(
            f"{where} was trained with --shuffle {'through' if tf_order(saved) else 'outside'} "
            "the tf.data stream, whose order differs from the other feeds'; resume with "
            f"--source {saved.source} --feed {saved.feed}"
        )
    for f in dataclasses.fields(Config):
        name, old, new = f.name, getattr(saved, f.name), getattr(current, f.name)
        if same_setting(name, saved, current, meta):
            continue
        flag = flag_name(name)
        if name == "steps" and saved.schedule != "constant":
            raise CheckpointError(
                f"--steps {new} differs from {old} in {where}, and --schedule "
                f"{saved.schedule} decays over --steps; resume with --steps {old}, or "
                "train into another --workdir"
            )
        if name not in RUN_SETTINGS | moved_data(meta):
            raise CheckpointError(
                f"{flag} {new} differs from {old} in {where} (it changes results); resume "
                f"with {flag} {old} (or leave the flag out), or train into another --workdir"
            )


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from."""

    step_dir: Path
    step: int
    meta: dict[str, Any]

    @property
    def train_sums(self) -> dict[str, np.ndarray] | None:
        return decode_sums(self.meta.get("train_sums"))

    @property
    def wall_s(self) -> float:
        return float(self.meta.get("wall_s") or 0.0)


def run_files(workdir: Path | str) -> list[str]:
    """The files a run writes in its workdir (checkpoints aside) that ``workdir`` holds."""
    workdir = Path(workdir)
    named = ["config.json", "metrics.jsonl", "metrics.csv", *FINAL_OUTPUTS]
    events = sorted(p.name for p in workdir.glob("events.out.tfevents.*"))
    return [name for name in named if (workdir / name).is_file()] + events


def results_differ(a: Config, b: Config) -> list[str]:
    """The fields, but for :data:`RUN_SETTINGS`, in which ``a`` and ``b`` differ: those
    that make them two runs, not one."""
    return [f.name for f in dataclasses.fields(Config)
            if f.name not in RUN_SETTINGS and getattr(a, f.name) != getattr(b, f.name)]


def check_fresh_workdir(config: Config, workdir: Path | str) -> None:
    """Refuse to start a run over the records of a different one.

    A workdir without checkpoints may still hold the files of a run stopped before its
    first checkpoint. Starting again over them loses nothing when the new run writes the
    same records and at least as many: the same ``config.json`` but for
    :data:`RUN_SETTINGS` (training is deterministic), the same batch order, and ``--steps``
    no fewer (and unchanged under a decaying ``--schedule``). Any other run would
    overwrite another experiment's records, and is refused.
    """
    workdir = Path(workdir)
    found = run_files(workdir)
    if not found:
        return
    where = workdir / "config.json"
    listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    fix = f"choose another --workdir, or delete {listed} in {workdir} to start over"
    try:
        saved = from_dict(json.loads(where.read_text()))
    except FileNotFoundError:
        raise CheckpointError(
            f"{workdir} holds {listed} of an earlier run but no config.json to tell which; "
            f"{fix}"
        ) from None
    except (OSError, ValueError, TypeError) as err:  # unreadable, bad JSON, bad fields
        raise CheckpointError(f"{where}: unreadable ({err}); {fix}") from None
    differ = [f"{flag_name(name)} {getattr(config, name)} (was {getattr(saved, name)})"
              for name in results_differ(config, saved)]
    if config.steps < saved.steps or (config.steps != saved.steps
                                      and saved.schedule != "constant"):
        differ.append(f"--steps {config.steps} (was {saved.steps})")
    if tf_order(config) != tf_order(saved):
        differ.append(f"the batch order (--source {config.source} --feed {config.feed}, was "
                      f"--source {saved.source} --feed {saved.feed}, with --shuffle)")
    if differ:
        raise CheckpointError(
            f"{workdir} holds the records of another run with no checkpoint to resume; this "
            f"one differs in {', '.join(differ)}; {fix}"
        )


def check_records_match(saved: Config, workdir: Path | str, step_dir: Path,
                        meta: Mapping[str, Any] | None = None) -> None:
    """Refuse to resume the checkpoint ``step_dir`` (of config ``saved``, ``meta``) into
    records of another run: the workdir's ``config.json``, where there is one that loads,
    must be the checkpoint's run but for :data:`RUN_SETTINGS` and :func:`moved_data` (a
    resume may change those, ``--steps`` among them) and :func:`same_setting`. Checkpoints
    copied in from another run resumed, and its metrics were appended to this one's, its
    config written over this one's."""
    where = Path(workdir) / "config.json"
    try:
        recorded = from_dict(json.loads(where.read_text()))
    except (OSError, ValueError, TypeError, ConfigError):  # none, or unreadable: rewritten
        return
    differ = [f"{flag_name(name)} {getattr(recorded, name)} (the checkpoint's: "
              f"{getattr(saved, name)})" for name in results_differ(recorded, saved)
              if name not in moved_data(meta) and not same_setting(name, saved, recorded, meta)]
    if differ:
        raise CheckpointError(
            f"{where} is another run's than the checkpoint {step_dir}: it differs in "
            f"{', '.join(differ)}; where config.json was edited, put the checkpoint's "
            "values back; where the checkpoints came from another run, resume in the "
            f"workdir they were trained in, or move {Path(workdir) / 'checkpoints'} into a "
            "workdir of its own"
        )


LOCK_FILE = ".rnnjax.lock"


def _in_use(workdir: Path) -> CheckpointError:
    """The refusal of a run in a workdir that another holds (:func:`workdir_lock`)."""
    return CheckpointError(
        f"{workdir} is in use by another rnnjax run (it holds {workdir / LOCK_FILE}); wait "
        "for that run to end, or choose another --workdir")


def check_not_in_use(workdir: Path | str) -> None:
    """:func:`workdir_lock`'s refusal, asked before anything else of ``workdir`` is read (a
    run still training there has no checkpoint to resume yet: the advice to start it
    afresh would then be refused in turn); nothing is created or held. The lock is taken
    again when the run starts."""
    import fcntl

    try:
        handle = os.open(Path(workdir) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # none (no run holds it), or unreadable: workdir_lock says
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(Path(workdir)) from None
    except OSError:  # no locks on this file system
        pass
    finally:
        os.close(handle)


@contextlib.contextmanager
def workdir_lock(workdir: Path | str | None) -> Iterator[None]:
    """Hold ``workdir`` for one run: a second run there at once (a scheduler restarting a
    job still running) is a :class:`CheckpointError`. Two resumes at once had deleted each
    other's save in flight, or a checkpoint the other was reading (then called corrupt,
    with the advice to delete it). An advisory lock (``flock``) on ``workdir/.rnnjax.lock``,
    released when the run ends or its process dies; where the file system has no locks,
    the run goes on unheld. The holder removes the file as it lets go (a run refused
    writes nothing), and a workdir made here and left holding nothing goes too."""
    if workdir is None:
        yield
        return
    import fcntl

    workdir = Path(workdir)
    made = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    held = None
    try:
        while held is None:
            handle = open(path, "a")  # noqa: SIM115 (held until the run ends)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise _in_use(workdir) from None
            except OSError:  # no locks on this file system: unheld
                handle.close()
                break
            try:  # the run before removed the file as this one took it: take the new one
                same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                held = handle
            else:
                handle.close()
        yield
    finally:
        if held is not None:
            path.unlink(missing_ok=True)
            held.close()
        if made:
            with contextlib.suppress(OSError):
                workdir.rmdir()  # only where empty


def check_no_unfinished(directory: Path) -> None:
    """Refuse a checkpoints ``directory`` holding a step directory without orbax's commit
    file, but for one older than every finished checkpoint. orbax's saves to a local disk
    never leave one (a finished save is renamed into place; one cut short stays a temporary
    directory, which the writer deletes), but its manager counts one as a step: keeping
    the latest N, it deleted a finished checkpoint instead, and a save of that step failed
    once trained to it. One older than every finished checkpoint is what a deletion of the
    oldest (keeping the latest N) left when cut short (orbax removes the commit file among
    the first): being the oldest step, it goes first at the next save."""
    if not directory.is_dir():
        return
    steps = list_steps(directory)
    unfinished = sorted(step for step in _unfinished_steps(directory)
                        if not steps or step > steps[0])
    if unfinished:
        raise CheckpointError(
            f"{directory / str(unfinished[0])} is a checkpoint whose save never finished (it "
            f"has no {COMMIT_FILE}); delete it, or move it out of {directory}, then run again")


def _unfinished_steps(directory: Path) -> list[int]:
    """The step directories in ``directory`` without orbax's commit file."""
    return [int(child.name) for child in directory.iterdir()
            if _is_step(child) and not (child / COMMIT_FILE).is_file()]


def prepare(config: Config, workdir: Path | str | None, resume: bool) -> ResumePoint | None:
    """Check a run's checkpoint settings before anything is written.

    Checkpoints need a workdir. Without ``resume`` a workdir that already holds
    checkpoints, or the records of a different run (:func:`check_fresh_workdir`), is
    refused (nothing is overwritten); with it, the latest checkpoint is
    found and checked against the workdir's records (:func:`check_records_match`) and
    ``config`` (:func:`check_resumable`, and ``--steps`` beyond its step), and returned.
    """
    if workdir is None:
        if resume:
            raise CheckpointError("--resume needs --workdir DIR, the run to continue")
        if config.checkpoint_every:
            raise CheckpointError(
                "--checkpoint-every needs --workdir DIR (checkpoints go in DIR/checkpoints)"
            )
        return None
    directory = checkpoints_dir(workdir)
    check_no_unfinished(directory)
    if not resume:
        if has_checkpoints(workdir):
            raise CheckpointError(
                f"{workdir} already holds checkpoints ({directory}); pass --resume to "
                "continue that run, or choose another --workdir"
            )
        check_fresh_workdir(config, workdir)
        return None
    step_dir = latest_checkpoint(workdir)
    step = int(step_dir.name)
    meta = read_meta(step_dir)
    saved = read_config(step_dir, meta)
    check_records_match(saved, workdir, step_dir, meta)
    check_resumable(saved, config, step_dir, meta)
    if step == config.steps == saved.steps and unfinished_outputs(workdir, step):
        return ResumePoint(step_dir, step, dict(meta))  # trained: the loop only finishes it
    if step >= config.steps:
        from rnnjax.metrics import steps_phrase  # imports JAX: only on this error

        done = (f"--resume: {step_dir} has already trained {steps_phrase(step)} of --steps "
                f"{config.steps}")
        if saved.schedule != "constant":  # its --steps is fixed (check_resumable)
            raise CheckpointError(
                f"{done}, the whole run (--schedule {saved.schedule} decays over --steps, "
                "so it cannot train on); its records are complete: train into another "
                "--workdir to train again")
        raise CheckpointError(f"{done}; pass a larger --steps to train on")
    return ResumePoint(step_dir, step, dict(meta))


FINAL_OUTPUTS = ("summary.json", "learning_curves.png")


def unfinished_outputs(workdir: Path | str, steps: int) -> list[str]:
    """The files of :data:`FINAL_OUTPUTS` that a run of ``steps`` steps in ``workdir`` has
    still to write: it writes them after its final checkpoint, and one stopped in between
    (a kill, a full disk) is finished by ``--resume``, which writes them without training.
    A ``summary.json`` of another number of steps (a shorter run's, before this one trained
    on) is this run's to write, with its curves."""
    workdir = Path(workdir)
    try:
        summary = json.loads((workdir / FINAL_OUTPUTS[0]).read_text())
        current = isinstance(summary, dict) and summary.get("steps") == steps
    except (OSError, ValueError):
        current = False
    if not current:
        return list(FINAL_OUTPUTS)
    return [name for name in FINAL_OUTPUTS[1:] if not (workdir / name).is_file()]

