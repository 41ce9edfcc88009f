"""``rnnjax``: the command line, a thin shell over ``rnnjax.loop``.

Every :class:`~rnnjax.config.Config` field is a flag (``hidden_size`` -> ``--hidden-size``).
Bad flags or data print one line, ``rnnjax: error: <problem>; <fix>``, and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import functools
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rnnjax import atomic, process
from rnnjax.config import MAX_WAIT_S, TUNED, Config, ConfigError, flag_name

if TYPE_CHECKING:
    from rnnjax.data.sources import Loader
    from rnnjax.data.spec import DataSpec
    from rnnjax.model import Model

EXIT_USAGE = 2
EXIT_DIVERGED = 3
# Output read by a pipe whose reader has gone (`rnnjax eval RUN | head -3`): stop quietly,
# with the status a shell reports for a program killed by SIGPIPE (128 + 13), as `yes | head`.
EXIT_BROKEN_PIPE = 141
# Set by the rnnjax program for the process it starts again with huge pages (process.restart):
# the tuned settings and how they were chosen, as JSON, so that it does not tune again.
RESTARTED = "RNNJAX_RESTARTED"

# The OS errors that a run can meet writing its files and that have a fix to name: one line
# and exit 2. Any other OSError is not a problem of the user's input or machine that rnnjax
# can explain, and keeps its traceback.
OS_ERROR_FIXES = {
    errno.ENOSPC: "free disk space or choose another --workdir",
    errno.EDQUOT: "free space within your disk quota or choose another --workdir",
    errno.EFBIG: "choose a --workdir on a file system that allows larger files",
    errno.EACCES: "give this user access to it (check its permissions) or choose another "
                  "--workdir",
    errno.EPERM: "give this user access to it (check its permissions) or choose another "
                 "--workdir",
    errno.EROFS: "its file system is read-only; choose a --workdir on a writable one",
    errno.ENAMETOOLONG: "a name in the path is longer than the file system takes; choose a "
                        "shorter path",
}


class UsageError(Exception):
    """A bad command line or input; the message says what and how to fix it."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: Mapping[str, argparse.ArgumentParser] = {}  # subcommands, by name

    def error(self, message: str) -> Any:  # one line, not argparse's usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """As argparse's, but an unknown flag is reported by the subcommand that was given
        it (pointing at its --help, which lists its flags), with the nearest flag it has."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = self.commands.get(getattr(parsed, "command", None) or "", self)
            flags = [flag for action in command._actions for flag in action.option_strings]
            guesses = [difflib.get_close_matches(arg.split("=")[0], flags, n=1, cutoff=0.85)
                       for arg in extra if arg.startswith("-")]
            near = sorted({guess[0] for guess in guesses if guess})
            command.error(f"unrecognized arguments: {' '.join(extra)}"
                          + (f"; did you mean {' or '.join(near)}?" if near else ""))
        return parsed


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    hints = {f.name: f.type for f in dataclasses.fields(Config)}
    for f in dataclasses.fields(Config):
        flag = flag_name(f.name)
        default = getattr(defaults, f.name)
        # argparse %-formats help strings: a literal % (as in 'train[:90%]') must be doubled
        help_text = f.metadata.get("help", "")
        if "(default:" not in help_text:  # else the help says what the default means
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")
        if hints[f.name] in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(hints[f.name]), str)
        parser.add_argument(flag, type=kind, default=None, choices=f.metadata.get("choices"),
                            metavar=f.name.upper(), help=help_text)


def _path(value: str) -> Path:
    """argparse's type of a path argument: an empty one is refused, not taken for the
    working directory (``Path("")`` is ``.``), as ``--workdir="$RUN"`` with ``RUN`` unset
    would otherwise train into it."""
    if not value:
        raise argparse.ArgumentTypeError("the path is empty (an unset shell variable?); "
                                          "pass a path")
    return Path(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnnjax", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.commands = sub.choices
    train = sub.add_parser("train", help="train and evaluate (defaults: the seed experiment)")
    _add_config_flags(train)
    train.add_argument("--workdir", type=_path, default=None,
                       help="write config, metrics and summary here (default: print only)")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on stderr (default: when stderr is a terminal)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --workdir from its latest checkpoint; flags "
                       "left out keep the checkpoint's values (and its tuned settings), but "
                       "for where it runs (--num-devices, --compile-cache and the "
                       "multi-process flags: as given, or their defaults)")
    train.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                       help="choose " + ", ".join(flag_name(n) for n in TUNED) + " (those "
                       "not given) by timing them here, once per shape, cached (default: on, "
                       "unless $RNNJAX_TUNE is off; --no-tune: the documented defaults)")
    train.add_argument("--tune-budget", type=float, default=None, metavar="SECONDS",
                       help="seconds the first run of a shape may spend tuning (default: "
                       "30; for a long run a tenth of its training time at the defaults, up "
                       "to 120; for a short run a quarter of it, at least 10)")
    tune = sub.add_parser(
        "tune", help="time the candidate settings of a run on this machine, print the table "
        "and the choice, and cache it for rnnjax train")
    _add_config_flags(tune)
    tune.add_argument("--tune-budget", type=float, default=None, metavar="SECONDS",
                      help="seconds to spend (default: 120)")
    evaluate = sub.add_parser(
        "eval", help="evaluate a checkpoint on its dataset's test set: loss, accuracy, "
        "per-class accuracy, confusion-matrix PNG")
    evaluate.add_argument("checkpoint", type=_path, metavar="CHECKPOINT",
                          help="a step directory (WORKDIR/checkpoints/STEP) or a workdir "
                          "(its latest checkpoint)")
    evaluate.add_argument("--out", type=_path, default=None,
                          help="confusion-matrix PNG (default: "
                          "WORKDIR/confusion_matrix_stepSTEP.png)")
    evaluate.add_argument("--data-dir", default=None,
                          help="root of named datasets, if not where the run found them")
    evaluate.add_argument("--dataset", default=None,
                          help="evaluate on this dataset's test set (a name, or a directory "
                          "of IDX files) instead of the checkpoint's; its images and classes "
                          "must be the model's")
    evaluate.add_argument("--tfds-dir", default=None,
                          help="a run of --source tfds: the tfds data dir holding its dataset, "
                          "if not where the run found it")
    evaluate.add_argument("--tfds-download", action="store_true",
                          help="a run of --source tfds: let tfds download and prepare its "
                          "dataset where it is not prepared (needs network)")
    predict = sub.add_parser(
        "predict", help="classify image files (PNG, JPEG, any size, grey or colour)")
    predict.add_argument("checkpoint", type=_path, metavar="CHECKPOINT",
                         help="a step directory (WORKDIR/checkpoints/STEP) or a workdir")
    predict.add_argument("images", type=_path, nargs="+", metavar="IMAGE",
                         help="image files of single digits")
    predict.add_argument("--as-is", action="store_true",
                         help="read each image as the model's dataset holds its images, "
                         "pixels unchanged (its size, grey or colour), not made an MNIST "
                         "digit: for datasets that are not digits (Fashion-MNIST, colour)")
    for command in (evaluate, predict):
        command.add_argument("--eval-batch-size", type=int, default=None, metavar="N",
                             help="images run through the model at a time (default: the "
                             "checkpoint's --eval-batch-size, at most the images given)")
    return parser


# Where this process runs, never taken from a checkpoint on --resume: the flags given, or
# the defaults (a 2-process run may well be resumed by one process, on other devices).
MACHINE_SETTINGS = ("num_devices", "coordinator_address", "num_processes", "process_id",
                    "coordinator_timeout", "compile_cache")


def flag_changes(args: argparse.Namespace, source: str = "idx") -> dict[str, object]:
    """The Config fields set on the command line; a ``--dataset`` directory, and local
    ``--data-dir`` and ``--tfds-dir``, made absolute (``config.json`` and the checkpoints
    record them: eval, predict and ``--resume`` find the data from any working directory).
    ``source``: the run's ``--source`` where the command line gives none (a resumed run's
    checkpoint's)."""
    names = {f.name for f in dataclasses.fields(Config)}
    changes = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if isinstance(changes.get("dataset"), str):
        changes["dataset"] = recorded_dataset(changes["dataset"],
                                              str(changes.get("source", source)))
    for name in ("data_dir", "tfds_dir"):
        value = changes.get(name)
        if isinstance(value, str):
            changes[name] = recorded_dir(value)
    return changes


def recorded_dir(directory: str) -> str:
    """``--data-dir`` or ``--tfds-dir`` as a run records it: a local directory absolute;
    empty (the default) and a URL (``gs://`` and the like) as they are."""
    if directory and "://" not in directory:
        return os.path.abspath(os.path.expanduser(directory))
    return directory


def recorded_dataset(dataset: str, source: str) -> str:
    """``--dataset`` as a run records it: a directory (``sources.is_path_like`` for
    ``source``) absolute, a name as it is."""
    from rnnjax.data.sources import is_path_like

    if is_path_like(dataset, source):
        return os.path.abspath(os.path.expanduser(dataset))
    return dataset


def config_from_args(args: argparse.Namespace) -> Config:
    """The defaults, overridden by the flags given."""
    return Config(**flag_changes(args))


FORM_FLAGS = ("backward", "projection", "weight_grad")


def check_forms(config: Config, given: Mapping[str, object]) -> None:
    """Refuse a form flag given (``given``: the flags set) that the run would not honour:
    ``resolve_form`` reads a choice the cell or the backward cannot make as the one it
    makes (the tuner relies on it: such candidates are one program), and the run went on
    with another form than the flag and ``config.json`` said (``--backward hand_written``
    on a cell without a hand-written backward, a Flax cell's; ``--weight-grad per_step``
    under autodiff or native; ``--projection in_loop`` under native)."""
    named = [name for name in FORM_FLAGS
             if name in given and getattr(config, name) != "auto"]
    if not named:  # nothing to import JAX for
        return
    from rnnjax.cells import get_cell, unhonoured

    try:
        cell = get_cell(config.cell, config.hidden_size)
        form, differ = unhonoured(cell, config.batch_size,
                                  **{name: getattr(config, name) for name in FORM_FLAGS})
    except ValueError:  # a cell or a backward that cannot work: check_model says so
        return
    for name in (name for name in named if name in differ):
        if name == "backward":
            raise UsageError(
                f"--backward {config.backward}: --cell {config.cell} has none (it runs "
                f"--backward {form.backward}); drop --backward, or choose {form.backward}")
        raise UsageError(
            f"{flag_name(name)} {getattr(config, name)}: --cell {config.cell} with "
            f"--backward {form.backward} runs {flag_name(name)} {getattr(form, name)}; "
            f"drop {flag_name(name)}, or choose a backward that has it")


def pinned_settings(given: Mapping[str, object]) -> frozenset[str]:
    """The tuned settings the flags ``given`` fix: those given, and ``feed`` where
    ``--steps-per-call`` is (which only ``--feed device`` reads)."""
    return frozenset(given) & set(TUNED) | ({"feed"} if "steps_per_call" in given else set())


def check_read(config: Config, given: Mapping[str, object]) -> None:
    """Refuse a flag given that the run would not read, as :func:`check_forms` a form:
    ``--tfds-dir`` without ``--source tfds``; ``--steps-per-call`` with ``--feed stream`` (one
    step a call; a tuned run given ``--steps-per-call`` keeps ``--feed device``,
    :func:`pinned_settings`); ``--coordinator-timeout`` for one process. (``--native-lanes``
    without native kernels is moot, not refused: the tuner's choice, printed as flags by
    ``rnnjax tune``, names every tuned setting whatever the backward.)"""
    if "steps_per_call" in given and config.feed == "stream":  # given, or a resumed run's
        raise UsageError(f"--steps-per-call {config.steps_per_call}: --feed stream runs one "
                         "step a call; drop --steps-per-call, or use --feed device")
    if "coordinator_timeout" in given:
        from rnnjax.parallel import starts_distributed

        if not starts_distributed(config):
            raise UsageError(f"--coordinator-timeout {config.coordinator_timeout}: this run is "
                             "one process, which waits for no others (no --coordinator-address "
                             "or $JAX_COORDINATOR_ADDRESS); drop it, or start several processes")
    if "tfds_dir" in given and config.source != "tfds":  # as Config refuses --tfds-download
        raise UsageError(f"--tfds-dir {config.tfds_dir}: only --source tfds reads it (this "
                         f"run reads --source {config.source}); add --source tfds, or drop "
                         "--tfds-dir")


def check_cpus(config: Config, resumed: Path | None = None) -> None:
    """Refuse, before any work, a ``--cpus`` this process cannot run on (``resumed``: the
    workdir of a checkpoint trained with it, which a resumed run must keep)."""
    try:
        process.first_cpus(config.cpus)
    except ValueError as e:
        if resumed is None:
            raise UsageError(str(e)) from None
        usable = len(process.usable_cpus())
        here = (f"this process may use {usable}" if usable else
                "this OS cannot set the CPUs a process runs on")
        raise UsageError(f"the checkpoint in {resumed} was trained with --cpus {config.cpus} "
                         f"(it changes results), and {here}: resume where a process may use "
                         f"{config.cpus} CPUs (e.g. not under taskset), or train into another "
                         "--workdir") from None


def check_writable(directory: Path, flag: str = "--workdir", given: bool = True,
                   named: Path | None = None) -> None:
    """Fail before training, not after, when ``directory`` could not be written.

    Leaves nothing behind: the run makes the directory once its data has loaded. Whether
    the nearest existing parent takes a file is tried (a probe file, removed at once), not
    read from permission bits: those do not bind root, nor tell a read-only file system.
    ``given``: whether the user named ``directory`` (or ``named``, a file in it) with
    ``flag``; else it is ``flag``'s default, and the error says so.
    """
    existing = directory
    while not _exists(existing) and existing.parent != existing:
        existing = existing.parent
    shown = named or directory
    where = f"{flag} {shown}" if given else f"{shown} (where it writes without {flag})"
    fix = "choose" if given else f"pass {flag} in"
    if not existing.is_dir():
        raise UsageError(f"{where}: {existing} is not a directory; {fix} another path")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for name in directory.relative_to(existing).parts:
        if len(os.fsencode(name)) > name_max:
            raise UsageError(f"{where}: a name in it is {len(os.fsencode(name))} bytes, longer "
                             f"than the {name_max} its file system takes; {fix} a shorter path")
    try:
        atomic.probe(existing)
    except OSError as e:
        raise UsageError(f"{where}: {existing} is not writable "
                         f"({e.strerror or e}); {fix} a writable directory") from e


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; False for one that cannot (a name too long)."""
    try:
        return path.exists()
    except OSError:
        return False


def resume_config(args: argparse.Namespace) -> Config:
    """For ``--resume``: the latest checkpoint's config, overridden by the flags given."""
    from rnnjax import checkpoint

    if args.workdir is None:
        raise UsageError("--resume needs --workdir DIR, the run to continue")
    checkpoint.check_not_in_use(args.workdir)
    step_dir = checkpoint.latest_checkpoint(args.workdir)
    meta = checkpoint.read_meta(step_dir)
    saved = checkpoint.read_config(step_dir, meta)
    defaults = Config()
    machine = {name: getattr(defaults, name) for name in MACHINE_SETTINGS}
    config = saved.replace(**{**machine, **flag_changes(args, saved.source)})
    checkpoint.check_resumable(saved, config, step_dir, meta)
    check_recorded_dataset(config, args, f"rnnjax train --workdir {args.workdir} --resume "
                                         "--dataset NEW_PLACE")
    return config


def check_recorded_dataset(config: Config, args: argparse.Namespace, command: str) -> None:
    """A :class:`UsageError` naming the checkpoint's own dataset directory (a run of
    ``--dataset PATH``, ``--source idx`` or ``tfds``) where it is gone and no ``--dataset``
    was given: it was reported as a ``--dataset`` flag the user never passed. ``command``:
    the fix, with its new place."""
    from rnnjax.data.sources import is_path_like

    if args.dataset is not None or not is_path_like(config.dataset, config.source):
        return
    if not Path(config.dataset).expanduser().is_dir():
        raise UsageError(f"the checkpoint's dataset {config.dataset} is gone (no such "
                         f"directory); if it moved, pass its new place: {command}")


def reads_tensorflow(config: Config, whole_process: bool) -> None:
    """Before a run of ``--source tfds`` imports TensorFlow, in the rnnjax program's own
    process (``whole_process``): TensorFlow's start-up lines off stderr, where they would
    come before a one-line error (``process.QUIET_TENSORFLOW``)."""
    if whole_process and config.source == "tfds":
        process.quiet_tensorflow(os.environ)


def tune_budget(args: argparse.Namespace, default: float) -> float:
    """``--tune-budget``, checked (:func:`checked_budget`)."""
    return checked_budget(default if args.tune_budget is None else args.tune_budget)


def checked_budget(budget: float) -> float:
    """``budget``, a tuning budget, checked: a positive number of seconds, at most
    ``config.MAX_WAIT_S`` (else :class:`UsageError`: the tuner's timers wait for a share of
    it, and 1e11 gave a traceback per timer). The benchmarks' ``--tune-budget`` takes the
    same."""
    if not (budget > 0 and budget < float("inf")):
        raise UsageError(f"--tune-budget must be a positive number of seconds, got {budget}")
    if budget > MAX_WAIT_S:
        raise UsageError(f"--tune-budget {budget:g}: more seconds than the tuner's timers can "
                         f"wait; give at most {MAX_WAIT_S:g}")
    return budget


def tuning_enabled(args: argparse.Namespace) -> bool:
    """``--tune``/``--no-tune``, else :func:`tuning_by_default`."""
    if args.tune is not None:
        return args.tune
    return tuning_by_default()


def tuning_by_default() -> bool:
    """Whether ``rnnjax train`` tunes without ``--tune``/``--no-tune``: unless
    ``$RNNJAX_TUNE`` is off (0, false, no). The benchmarks run as it does."""
    from rnnjax.tune import ENV_VAR

    return os.environ.get(ENV_VAR, "").strip().lower() not in ("0", "off", "false", "no")


def check_native_resume(config: Config, workdir: Path) -> None:
    """Refuse to resume a run of the native kernels where they cannot be built, saying so:
    a resume keeps its ``--backward`` (another form rounds apart), so the fix that a new
    run's line gives, another ``--backward``, would be refused."""
    from rnnjax.cells import get_cell
    from rnnjax.model import native_unavailable

    if config.backward != "native":
        return
    try:
        cell = get_cell(config.cell, config.hidden_size)
    except ValueError:
        return  # make_model's line names it
    reason = native_unavailable(cell)
    if reason is not None:
        raise UsageError(f"--resume: the run in {workdir} trains with --backward native, "
                         f"which its resume keeps (another form rounds apart), and {reason}; "
                         "rnnjax eval and predict read its checkpoints without one")


def check_model(config: Config, spec: DataSpec | None = None, examples: int = 0,
                test_examples: int | None = None) -> None:
    """Build the model (for the images of ``spec``) and the optimizer, starting no
    backend: a cell (the user's own traced on one step: ``cells.check_step``) or optimizer
    that cannot work is one line before tuning, not a failure
    in each of the tuner's children and a 'not timed' line first. So is a run that cannot
    fit in the host's RAM, where the backend will be the CPU's (``runtime.starts_on_cpu``):
    one CPU device's estimate (``memory.estimate``: the state, a batch's activations and
    ``examples`` images, of which ``test_examples`` are the test set's, where known), no
    more than the run's on any number of them."""
    from rnnjax import memory, runtime
    from rnnjax.data.spec import IDX_SPEC
    from rnnjax.model import make_model
    from rnnjax.optim import make_optimizer

    model = make_model(config, spec)
    check_cell(config, model)
    optimizer = make_optimizer(config, model.param_shapes())
    if runtime.starts_on_cpu():
        memory.check_fits(memory.estimate(config, memory.traceable(model), optimizer,
                                          spec or IDX_SPEC, examples=examples,
                                          test_examples=test_examples),
                          room=memory.host_room())


def check_cell(config: Config, model: Model) -> None:
    """A ``--cell`` of the user's own (``rnnjax.cells.shipped``: registered in Python over
    or beside rnnjax's, or a Flax cell class) traced on one step as ``model`` (``config``'s,
    for its dataset's images) has it (``cells.check_step``, abstractly: no backend starts):
    one line naming what is wrong, before anything is written, where it cannot work."""
    from rnnjax import cells

    if cells.shipped(config.cell):
        return
    try:
        cells.check_step(model.cell, model.layer_inputs, model.compute_dtype)
    except ValueError as e:
        raise ConfigError(f"--cell {config.cell}: {e}") from None


def tuned_config(args: argparse.Namespace, config: Config,
                 load: Loader) -> tuple[Config, dict[str, Any]]:
    """For a new run: ``config`` with the tuned settings (cached, or measured now within
    ``--tune-budget``) for the fields not given as flags, and how they were chosen
    (``load``: the run's dataset, checked before any time is spent tuning)."""
    from rnnjax import checkpoint, tune

    budget = tune_budget(args, tune.DEFAULT_BUDGET_S)
    if not tuning_enabled(args):
        if args.tune_budget is not None:  # (with --no-tune it is refused: _train)
            print(f"rnnjax: note: --tune-budget not read: ${tune.ENV_VAR} is off, so this "
                  "run is not tuned; pass --tune to tune it", file=sys.stderr)
        return config, {"mode": "off"}
    from rnnjax.parallel import starts_distributed

    if starts_distributed(config):  # every process must choose the same: pass the flags
        return config, {"mode": "off", "reason": "several processes"}

    pinned = pinned_settings(flag_changes(args))
    recorded = recorded_settings(args.workdir, config, pinned)
    if recorded is not None:
        try:
            checkpoint.prepare(recorded, args.workdir, resume=False)
        except checkpoint.CheckpointError:
            pass  # checkpoints, or another run's records: check_run refuses before tuning
        else:  # this run, stopped before its first checkpoint, starts over as it was tuned
            asked = [flag for flag, value in (("--tune", args.tune),
                                              ("--tune-budget", args.tune_budget))
                     if value is not None and value is not False]
            if asked:  # not read here: said so (a scheduler runs its command again as it was)
                print(f"rnnjax: note: {' and '.join(asked)} not read: {args.workdir} holds the "
                      "records of a run stopped before its first checkpoint, and this one "
                      "starts it over with the settings its config.json records (never tuned "
                      "again: the same run)", file=sys.stderr)
            return recorded, {"mode": "recorded"}

    def check_run() -> None:  # what the run would refuse, refused before tuning
        from rnnjax.loop import check_data

        checkpoint.prepare(recorded or config, args.workdir, resume=False)
        dataset = load(config)
        check_data(config, dataset.arrays, dataset.spec)
        check_model(config, dataset.spec, examples=len(dataset.arrays.train_labels)
                    + len(dataset.arrays.test_labels),
                    test_examples=len(dataset.arrays.test_labels))

    # No --tune-budget: the default, shrunk to what a short run can pay back.
    return tune.resolve(config, pinned, None if args.tune_budget is None else budget,
                        before_tuning=check_run, spec=data_spec(config, load))


def recorded_settings(workdir: str | None, config: Config,
                      pinned: frozenset[str]) -> Config | None:
    """``config`` with the tuned settings (those not in ``pinned``) that ``workdir``'s
    ``config.json`` records; None where there is none that loads (``checkpoint.prepare``
    says what is wrong with it)."""
    saved = None if workdir is None else Path(workdir) / "config.json"
    if saved is None or not saved.is_file():
        return None
    try:
        old = json.loads(saved.read_text())
        return config.replace(**{k: old[k] for k in TUNED if k in old and k not in pinned})
    except (OSError, ValueError, TypeError, ConfigError):
        return None


def restarted_config(config: Config, restarted: str) -> tuple[Config, dict[str, Any]]:
    """In the process :func:`start_with_huge_pages` started: ``config`` with the settings
    the process it replaced chose, and how it chose them (``restarted``: $RNNJAX_RESTARTED)."""
    try:
        record = json.loads(restarted)
        settings, tuning = record["settings"], record["tuning"]
        if not (isinstance(tuning, dict) and isinstance(settings, dict)
                and set(settings) <= set(TUNED)):
            raise TypeError("not rnnjax's record")
        config = config.replace(**settings)
    except (ValueError, TypeError, KeyError, ConfigError) as e:
        raise UsageError(f"${RESTARTED} is not the record rnnjax sets for the process it starts "
                         f"again ({e}); unset it") from None
    return config, {**tuning, "process": "started again with huge pages"}


def start_with_huge_pages(config: Config, tuning: dict[str, Any], whole_process: bool) -> None:
    """Where ``config.huge_pages`` is chosen and this process lacks them, start the rnnjax
    program again with them (``rnnjax.process.restart``: glibc reads its tunables only at
    a process's start), handing it ``tuning`` so that it does not tune again. Nothing has
    been written yet. Where huge pages are not to be had here, or this is not the rnnjax
    program's own process (``whole_process``), a note says so and the run goes on."""
    if not config.huge_pages or process.huge_pages_on():
        return
    why = process.huge_pages_unavailable()
    if why is None and not whole_process:
        why = ("this process started without them and is not the rnnjax program's own; set "
               f"GLIBC_TUNABLES={process.HUGE_PAGES} before starting Python")
    if why is not None:
        print(f"rnnjax: note: running without huge pages: {why}", file=sys.stderr)
        return
    env = process.with_huge_pages(os.environ)
    env[RESTARTED] = json.dumps({"settings": {k: getattr(config, k) for k in TUNED},
                                 "tuning": tuning})
    print(f"rnnjax: starting again with huge pages (GLIBC_TUNABLES={process.HUGE_PAGES})",
          file=sys.stderr)
    process.restart(env)


def data_spec(config: Config, load: Loader) -> DataSpec:
    """The images and classes of ``config``'s dataset, for the tuner of a run: the IDX
    layout's without waiting for the files (``--source idx`` holds nothing else), else the
    loaded dataset's (``load`` keeps it for the run)."""
    from rnnjax.data.sources import dataset_spec

    return load(config).spec if config.source == "tfds" else dataset_spec(config)


def _train(args: argparse.Namespace, whole_process: bool = False) -> int:
    """``rnnjax train``; ``whole_process`` (:func:`run`): the garbage collector, off until
    now, is set once the run is tuned and JAX imported (``rnnjax.process``)."""
    given = [flag for flag, value in (("--tune", args.tune), ("--tune-budget", args.tune_budget))
             if value is not None and value is not False]  # a budget of 0 is given too
    if args.tune is False and args.tune_budget is not None:
        raise UsageError("--tune-budget: --no-tune tunes nothing; drop one of them")
    if args.resume and given:  # the checkpoint's settings, as recorded: never tuned again
        flags = " and ".join(given)
        raise UsageError(f"{flags}: --resume takes the checkpoint's tuned settings and never "
                         f"tunes (so it stays bitwise); drop {flags}")
    config = resume_config(args) if args.resume else config_from_args(args)
    check_cpus(config, args.workdir if args.resume else None)
    if args.resume:
        check_native_resume(config, args.workdir)
    if args.workdir is not None:
        check_writable(args.workdir)
    if config.compile_cache not in ("auto", "off"):  # 'auto' may be unwritable: then no cache
        check_writable(Path(config.compile_cache).expanduser(), flag="--compile-cache")
    from rnnjax.data.sources import prefetch

    reads_tensorflow(config, whole_process)
    load = prefetch(config)  # the dataset is read while JAX is imported
    changes = flag_changes(args)
    check_forms(config, changes)
    check_read(config, changes)
    from rnnjax import cells

    if not cells.shipped(config.cell):  # the user's own, at the dataset's input width
        from rnnjax.model import make_model

        check_cell(config, make_model(config, data_spec(config, load)))
    if "keep_checkpoints" in changes and args.workdir is None:  # as --checkpoint-every
        raise UsageError(f"--keep-checkpoints {config.keep_checkpoints}: without --workdir "
                         "no checkpoint is written; add --workdir DIR, or drop "
                         "--keep-checkpoints")
    restarted = os.environ.pop(RESTARTED, None)
    if args.resume:  # the checkpoint's settings, as recorded: never tuned again
        tuning: dict[str, Any] = {"mode": "resumed"}
    elif restarted is not None:  # tuned by the process this one replaced
        config, tuning = restarted_config(config, restarted)
    else:
        config, tuning = tuned_config(args, config, load)
    start_with_huge_pages(config, tuning, whole_process)
    from rnnjax import runtime, tune
    from rnnjax.loop import TrainingDiverged, train_and_evaluate

    if whole_process:
        process.imported()
    try:
        runtime.apply_process_settings(config.xla_flags, config.cpus)  # before the backend
    except ValueError as e:
        raise UsageError(str(e)) from None
    tune.check_device(tuning)
    try:
        train_and_evaluate(config, args.workdir, progress=args.progress, resume=args.resume,
                           tuning=tuning, load=load)
    except TrainingDiverged as e:
        print(f"rnnjax: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def choice_flags(choice: Mapping[str, Any], pinned: frozenset[str] = frozenset()) -> str:
    """The command-line flags that give ``rnnjax train`` the tuned ``choice`` (its fields
    not in ``pinned``), as a shell reads them."""
    def flag(name: str, value: Any) -> str:
        if isinstance(value, bool):
            return flag_name(name) if value else f"--no-{flag_name(name)[2:]}"
        if name == "xla_flags":
            return f"{flag_name(name)}={shlex.quote(value)}"
        return f"{flag_name(name)} {value}"

    return " ".join(flag(k, v) for k, v in choice.items() if k not in pinned)


def _tune(args: argparse.Namespace, whole_process: bool = False) -> int:
    """``rnnjax tune``: its children do the work, this process waits (up to its budget),
    with the garbage collector on (``rnnjax.process``)."""
    from rnnjax import tune

    if whole_process:
        process.imported()

    config = config_from_args(args)
    from rnnjax.parallel import starts_distributed

    if starts_distributed(config):  # it timed one process at the whole batch, cached as one's
        raise UsageError(
            "rnnjax tune times one process, and a run of several processes is never tuned "
            "(every process must choose alike): drop --num-processes, --coordinator-address "
            "and $JAX_COORDINATOR_ADDRESS, tune one process at its share of --batch-size, "
            "and give every process the flags it prints")
    check_cpus(config)
    changes = flag_changes(args)
    check_forms(config, changes)
    check_read(config, changes)
    budget = tune_budget(args, tune.TUNE_COMMAND_BUDGET_S)
    if config.compile_cache not in ("auto", "off"):
        check_writable(Path(config.compile_cache).expanduser(), flag="--compile-cache")
    pinned = pinned_settings(changes)
    from rnnjax.data.sources import dataset_spec

    reads_tensorflow(config, whole_process)
    spec = dataset_spec(config)  # the dataset is never read: the children time its shape
    check_model(config, spec)
    tune.child_sources(config)  # a cell, order or optimizer no child can import

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    directory = tune.cache_dir(config.compile_cache)
    with tune.shape_lock(directory, tune.key(config, pinned, spec=spec), lambda lock: log(
            f"rnnjax: another process is tuning this shape here (it holds {lock}): waiting "
            "for it to finish, so that neither times under the other's load")):
        log(f"rnnjax: timing {config.cell} {config.hidden_size} x{config.num_layers} "
            f"{config.order} batch {config.batch_size} for up to {budget:g} s")
        result = tune.tune(config, pinned, budget, log=log, spec=spec)
        print(tune.format_table(result), end="")
        print(tune.choice_line(result))
        if result.choice is None:
            return 1
        path = tune.save(directory, result.record())
    flags = choice_flags(result.choice, pinned)
    # As flags either way: the processes of a multi-process run are never tuned, and
    # other machines do not read this cache.
    print(f"cached in {path}: rnnjax train uses it for this shape; as flags: {flags}" if path
          else f"not cached ({tune.unsaved(directory)}); pass: {flags}")
    return 0


def _check_out(path: Path, given: bool = True) -> None:
    """Fail before the work when the file ``path`` could not be written. ``given``:
    whether the user named it with ``--out`` (else it is the default, and the error says
    so)."""
    if path.is_dir():
        if not given:
            raise UsageError(f"{path} (where it writes without --out) is a directory; pass "
                             "--out with a file name ending in .png")
        raise UsageError(f"--out {path} is a directory; pass a file name ending in .png")
    if path.suffix.lower() != ".png":  # it is written as a PNG whatever its name says
        raise UsageError(f"--out {path}: the confusion matrix is written as a PNG; pass a "
                         "file name ending in .png")
    check_writable(path.parent, flag="--out", given=given, named=path)


def _check_eval_batch_size(args: argparse.Namespace) -> None:
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise UsageError(f"--eval-batch-size must be at least 1, got {args.eval_batch_size}")


def _eval(args: argparse.Namespace, whole_process: bool = False) -> int:
    from rnnjax import checkpoint, inference, plots
    from rnnjax.data.sources import dataset_spec, load_dataset
    from rnnjax.metrics import seed_line, steps_phrase

    _check_eval_batch_size(args)
    step_dir = checkpoint.resolve(args.checkpoint)  # cheap, before the slow part
    if args.out is None:  # named after loading: a run still training may save a newer one
        check_writable(checkpoint.workdir_of(step_dir), flag="--out", given=False)
    else:
        _check_out(args.out)
    loaded = inference.load(args.checkpoint)
    _note(loaded)
    step_dir = loaded.step_dir
    if args.out is None:
        args.out = checkpoint.workdir_of(step_dir) / f"confusion_matrix_step{loaded.step}.png"
        _check_out(args.out, given=False)
    config = eval_data_config(loaded.config, args)
    check_recorded_dataset(config, args, f"rnnjax eval {args.checkpoint} --dataset NEW_PLACE")
    reads_tensorflow(config, whole_process)
    # Images of another shape are refused before the data is read (or built into a tfds
    # dataset): their shape is known without it. An IDX set's classes are known once read.
    shape = dataset_spec(config, splits=("test",))
    if shape.image_shape != loaded.spec.image_shape:
        checkpoint.check_data_spec(loaded.spec, shape, step_dir)
    dataset = load_dataset(config, splits=("test",))  # the train split neither read nor needed
    checkpoint.check_data_spec(loaded.spec, dataset.spec, step_dir)
    data = dataset.arrays
    if not len(data.test_labels):
        raise UsageError(f"the test set of {config.dataset} is empty: nothing to evaluate; "
                         "pass --dataset with a test set")
    result = inference.evaluate(loaded, data.test_images, data.test_labels,
                                args.eval_batch_size)
    print(f"checkpoint {step_dir}: {config.cell} {config.hidden_size} on {config.dataset} "
          f"after {steps_phrase(loaded.step)}; {len(data.test_labels)} test examples")
    print(seed_line(result.loss, result.accuracy))
    print(result.table(), end="")
    title = f"{config.dataset} test, step {loaded.step}: accuracy {result.accuracy:.4f}"
    try:
        path = plots.confusion_matrix(result.confusion, args.out, title=title)
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot write ({e.strerror or e}); "
                         "pass a writable path") from e
    print(f"confusion matrix: {path}")
    return 0


def eval_data_config(config: Config, args: argparse.Namespace) -> Config:
    """The checkpoint's ``config`` with ``rnnjax eval``'s data flags: where its dataset is
    now (``--data-dir``, ``--tfds-dir``), or another one (``--dataset``, read as the
    checkpoint's ``--source`` reads it); the tfds ones refused for a run of IDX files."""
    given = [flag for flag, value in (("--tfds-dir", args.tfds_dir is not None),
                                      ("--tfds-download", args.tfds_download)) if value]
    if given and config.source != "tfds":
        flags = " and ".join(given)
        raise UsageError(f"{flags}: the checkpoint's run read --source {config.source}, which "
                         f"never reads {'them' if len(given) > 1 else 'it'}; drop {flags} "
                         "(--data-dir and --dataset say where its data is)")
    changes: dict[str, Any] = {}
    if args.data_dir is not None:
        changes["data_dir"] = recorded_dir(args.data_dir)
    if args.tfds_dir is not None:
        changes["tfds_dir"] = recorded_dir(args.tfds_dir)
    if args.tfds_download:
        changes["tfds_download"] = True
    if args.dataset is not None:
        changes["dataset"] = recorded_dataset(args.dataset, config.source)
    return config.replace(**changes)


def _note(loaded: Any) -> None:
    """How this machine runs the checkpoint otherwise than its run did, on stderr."""
    if loaded.note:
        print(f"rnnjax: note: checkpoint {loaded.step_dir}: {loaded.note}", file=sys.stderr)


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from rnnjax import checkpoint, inference
    from rnnjax.data.images import load_as_is, load_mnist_image

    _check_eval_batch_size(args)
    step_dir, meta = checkpoint.read_latest(args.checkpoint,
                                            lambda d: (d, checkpoint.read_meta(d)))
    config = checkpoint.read_config(step_dir, meta)
    spec = checkpoint.data_spec(meta, config)
    if args.as_is and spec.image_shape[2] not in (1, 3):
        raise UsageError(f"checkpoint {step_dir} reads {spec.describe()}; --as-is reads grey "
                         "or RGB files only: use rnnjax eval on its dataset, or "
                         "inference.probabilities on your own arrays")
    if not args.as_is and spec.image_shape != (28, 28, 1):
        raise UsageError(f"checkpoint {step_dir} reads {spec.describe()}; predict makes "
                         "image files into 28x28 MNIST digits, or reads them as they are "
                         "with --as-is (files of its images' size, grey or RGB)")
    if args.as_is:
        pixels = np.stack([load_as_is(path, spec.image_shape) for path in args.images])
    else:  # all read before any work
        pixels = np.stack([load_mnist_image(path) for path in args.images])
        if not _mnist(config, meta):
            print(f"rnnjax: note: each image is made an MNIST digit (cropped to its ink, "
                  f"fitted to 20x20, centred); checkpoint {step_dir} was trained on "
                  f"{config.dataset}: pass --as-is for images that are not digits",
                  file=sys.stderr)
    loaded = inference.load(args.checkpoint)
    _note(loaded)
    probabilities = inference.probabilities(loaded, pixels, args.eval_batch_size)
    names = [str(path) for path in args.images]
    width = max(5, *(len(name) for name in names))
    classes = probabilities.shape[1]
    print(f"{'image':<{width}}  class  " + " ".join(f"{f'p({c})':>6}" for c in range(classes)))
    for name, p in zip(names, probabilities, strict=True):
        print(f"{name:<{width}}  {int(p.argmax()):>5}  " + " ".join(f"{v:6.4f}" for v in p))
    return 0


def _mnist(config: Config, meta: dict[str, Any]) -> bool:
    """Whether the checkpoint of ``config`` and ``meta`` was trained on MNIST: by the
    name, or by its data's fingerprint (a copy in a directory of another name)."""
    from rnnjax.data.sources import EMBEDDED_MNIST, MNIST_MD5, load_idx_dir

    if Path(config.dataset.rstrip("/")).name.split(":")[0].lower() == "mnist":
        return True
    recorded = (meta.get("data") or {}).get("fingerprint")
    return recorded is not None and recorded == load_idx_dir(EMBEDDED_MNIST,
                                                             MNIST_MD5).fingerprint()


def _metrics_file_error() -> tuple[type[Exception], ...]:
    """``rnnjax.metrics.MetricsFileError`` once a run has imported that module (it imports
    JAX, which a bad flag should not wait for); none before."""
    metrics = sys.modules.get("rnnjax.metrics")
    return (metrics.MetricsFileError,) if metrics is not None else ()


def run() -> None:
    """The ``rnnjax`` program (console script, ``python -m rnnjax``): :func:`main` as a
    process of its own, with the garbage collector set for one (``rnnjax.process``)."""
    process.importing()
    try:
        code = main(whole_process=True)
    except SystemExit as e:  # argparse's --help
        code = e.code
    process.exiting()
    try:
        sys.stdout.flush()  # a closed pipe met here, not in Python's own flush at exit
    except BrokenPipeError:
        code = EXIT_BROKEN_PIPE
    if code == EXIT_BROKEN_PIPE:  # nothing more can be read: the exit's flush says nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


def _after_interrupt(args: argparse.Namespace | None) -> str:
    """What a ``rnnjax train`` interrupted (Ctrl-C) in a workdir leaves to do, for its
    line: resume from its latest checkpoint, or, before the first, run it again."""
    from rnnjax.checkpoint import list_steps

    workdir = getattr(args, "workdir", None) if getattr(args, "command", None) == "train" \
        else None
    if workdir is None or not workdir.is_dir():
        return ""
    if list_steps(workdir / "checkpoints"):
        return (f"; {workdir} keeps its checkpoints: go on with rnnjax train --workdir "
                f"{workdir} --resume")
    return (f"; {workdir} holds no checkpoint yet: the same command again starts the run "
            "over")


def main(argv: Sequence[str] | None = None, *, whole_process: bool = False) -> int:
    """Entry point of the command line; returns the exit code. ``whole_process``: called
    by :func:`run`, the garbage collector off; ``rnnjax train`` turns it on once tuned and
    with JAX imported, ``rnnjax tune`` at once, ``eval`` and ``predict`` (short) never
    (``rnnjax.process``)."""
    from rnnjax.checkpoint import CheckpointError
    from rnnjax.data.idx import IdxError
    from rnnjax.data.images import ImageError

    args = None
    try:
        args = build_parser().parse_args(argv)
        commands = {"train": functools.partial(_train, whole_process=whole_process),
                    "tune": functools.partial(_tune, whole_process=whole_process),
                    "eval": functools.partial(_eval, whole_process=whole_process),
                    "predict": _predict}
        return commands[args.command](args)
    except BrokenPipeError:  # stdout's reader has gone (`| head`); the tuner's pipes to its
        return EXIT_BROKEN_PIPE  # children never raise this far
    except (UsageError, ConfigError, IdxError, CheckpointError, ImageError,
            *_metrics_file_error()) as e:
        print(f"rnnjax: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a disk full, a directory not writable: one line, not a traceback
        if e.errno not in OS_ERROR_FIXES:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"rnnjax: error: {where}{e.strerror or e}; {OS_ERROR_FIXES[e.errno]} (files "
              "already written are kept)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"rnnjax: interrupted{_after_interrupt(args)}", file=sys.stderr)
        return 130
    except Exception as e:  # an allocation the estimate did not foresee: one line too
        from rnnjax.memory import is_out_of_memory, out_of_memory_message

        if not is_out_of_memory(e):
            raise
        print(f"rnnjax: error: {out_of_memory_message(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    run()
