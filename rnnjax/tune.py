"""Choose how to run the train step by measuring the candidates on the machine at hand.

What is chosen (the :data:`TUNED` Config fields): the scan's ``unroll`` (1, a middle factor,
full), the form of the cell's computation (``backward`` hand-written, autodiff or, for
``simple_rnn``, ``lstm`` and ``gru`` on a CPU, native (``rnnjax.native``), ``projection`` of
the inputs before the loop or inside it, ``weight_grad`` one product or per step:
``rnnjax.cells.resolve_form``), the ``chunks`` the sequence is scanned in
(``rnnjax.cells.scan_cell``), the ``feed`` (the device-resident dataset with
``steps_per_call`` steps per compiled call, or one step per call streamed from NumPy) and
``xla_flags`` where the backend has alternatives, and on a CPU ``huge_pages`` (transparent
huge pages for XLA's buffers, where glibc and the kernel give them on request:
:mod:`rnnjax.process`) and ``cpus`` (the process on one CPU, where it may use more); and
once the train step is chosen, ``eval_unroll``, the evaluations' unroll, and
``eval_native``, whether a native train step's evaluations run natively too
(:func:`evaluation_choice`). XLA
reads its flags once, when the backend starts, and sizes its thread pools by the CPUs then,
and glibc reads its tunables when the process starts, so every measurement runs in a child
process (:mod:`rnnjax.measure`), one per set of these process settings (a child's
``flags``: XLA flags, :data:`HUGE_PAGES` for a child started with huge pages, ``cpus=1``
for one on one CPU); the process that tunes never starts JAX's backend itself and can still
apply the chosen flags and CPUs (:func:`rnnjax.runtime.apply_process_settings`);
``rnnjax train`` starts itself again for huge pages. XLA's flag sets are compiler flags,
which also apply per compiled program: the first child times each in its own process
(:func:`flag_set_candidates`), and only a set it did not time gets a child of its own.

A candidate counts only when its first train step (the loss, and the gradients as the
optimizer's moments hold them) matches the baseline's (the untuned defaults) to float
tolerance. The same program runs faster in some processes than in others, so the
candidates the first child timed within :data:`SECOND_NEAR` of its fastest are timed again
in a second process under the same flags, and each is judged by its mean over the
processes (:func:`pooled`), the second's timings in the first's terms (:func:`in_terms_of`:
a process that ran everything slower does not count against what it timed). The fastest
wins; the baseline is kept unless another is at least :data:`MARGIN` faster, and the run's
own XLA flags unless other flags are at least :data:`FLAG_MARGIN` faster (timed in other
processes only). The children stay until the end, when the baseline, each one's fastest
and the second process's candidates are timed again in turns across them
(:func:`in_turns`): the choice is made from timings taken side by side, not minutes apart.
Candidates are timed in order of promise and skipped once the time budget is spent (or
when their compile time, predicted from the unrolls measured, would overrun it); the
most promising after the baseline (the native form, the full unroll) may take the later
parts of the budget for that (:data:`REACH_SHARE`).
Fields the user set are never changed (``pinned``).

The choice is cached as JSON beside the compilation cache (``~/.cache/rnnjax/tune/``),
keyed on the machine (CPU, visible devices, ``$XLA_FLAGS``, huge pages asked for in
``$GLIBC_TUNABLES``, the CPUs the process may use), the model's shape, the batch, the
pinned fields and the versions; the backend and device kind the children ran on are
recorded and checked once the run's backend starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rnnjax import __version__, atomic
from rnnjax.config import NATIVE_LANES, TUNED, Config, ConfigError, to_dict
from rnnjax.data.spec import IDX_SPEC, DataSpec
from rnnjax.measure import (
    BEST,  # a field's value: the fastest its child has timed
    ON,  # a candidate's backend, where it is for one only
    evaluation_fields,  # an evaluation way's Config fields
    for_backend,  # the candidates a child on a backend times
)

TUNER_VERSION = 36  # 36: a call's own cost no more than its longer call leaves beside its
# steps (a 1-step call slower than it, noise, had made its steps nearly free); 35: a GPU's
# '+WHILE' flag set timed in a child of its own (as one compilation's option XLA refused
# it), and a child under other flags times the fastest form without an in-process set of
# the same flag; 34: a call's own cost read where it exceeds
# its steps' (it was dropped there, and cut to half a 1-step call elsewhere: measure.call_overhead);
# 33: an SGD whose first step moves nothing (a warmup's learning rate
# of 0) compared by its second step's update (its first hid any gradient's error);
# 32: with --backward native its other vector width timed, no unroll;
# a first child alone leaves the second process its share; the evaluation's compiles kept
# within the budget; SGD's first steps compared by their updates;
# 31: a native train step's evaluations timed in the native form too
# (eval_native), its forward writing the last step alone; 30: the native backward sums a
# step's bias rows before its block, the GRU's product of dv before dh * z is added, and the
# native tanh saturates at +-1 as XLA's;
# 29: the native backward sums its weight gradients in blocks of steps;
# 28: the rounds in turns keep their part where the evaluation is timed; 27: the GPU's
# native kernels' products as three TF32 products (tf32x3)
# and 8 warps at a width of 128; 26: the native form and the full unroll may be timed in the
# budget's later parts, a GPU's compile predicted at its own growth, the GPU's native form
# (Pallas kernels); 25: the native layers read each batch's rows in the dataset's sequences, with
# no gathered copy; 24: the native library's products compiled once (its build 1.3-1.4 s,
# not 1.6-2.0: the seed's 10 s now times both widths); 23: the native kernels' products
# in blocks that fit the registers; 22: the native backward writes no
# input gradient where none is asked for; 21: the native kernels at 16 lanes too
# (native_lanes); 20: lstm's and gru's native kernels, each batch in parts on the pool's
# threads, timed right after the baseline at small batches; 19: simple_rnn's native kernels;
# 18: the second process's timings in the first's terms; 17: the evaluations' unroll; 16:
# XLA flag sets timed in the first child's process; 15: batches read step by step gathered
# so; 14: longer calls in turns, autodiff loops 1.1-1.3x faster; 13: cpus; 12: huge pages;
# 11: chunks; 10: finalists in a second process
ENV_VAR = "RNNJAX_TUNE"  # 'off' (or 0, false, no): rnnjax train does not tune by default
MARGIN = 0.03  # a candidate replaces the baseline only when this much faster
# Other XLA flags replace the run's own only when this much faster: they are timed in other
# processes, and the same program, the same flags, ran up to 3% (the seed) and 11% (rows,
# batch 1024) apart in four child processes called in turns (2-core AVX-512 EPYC,
# 2026-12-01), where a 3% margin had picked flags that then ran 2-6% slower.
FLAG_MARGIN = 0.10
FIRST_SHARE = 0.6  # of the budget, for the model candidates under the run's own XLA flags
TURNS_SHARE = 0.1  # the budget's last part, for timing the children's fastest in turns
TURN_ROUNDS = 5  # of in_turns, at most
# The budget's part kept from in_turns for timing the evaluation of the candidate chosen
# (:func:`evaluation_choice`). The evaluations ran at the train step's unroll: fully
# unrolled, XLA:CPU scheduled all 28 steps' input products ahead of the recurrent chain,
# and the seed's 10,000 test images took 60-83 ms an evaluation against 38-45 ms at unroll
# 1, the same sums (2-core AVX-512 EPYC, 2026-12-03; docs/performance.md).
EVAL_SHARE = 0.1
# The most promising candidates after the baseline (:func:`reaching`: the native forms, the
# full unroll) may start, and be timed, until this share of the budget, where the first
# child's share would leave them untimed: they may take the second process's, the flag
# children's and the turns' parts (not the evaluation's). A GPU run's budget is often the
# floor's 10 s (a short run), whose first share left an H200 too little for the full
# unroll, untimed at every batch with 3 s left, where it ran 1.1-2.1x faster than the
# unroll 1 kept and the flag sets then timed ran level with it (2026-12-04).
REACH_SHARE = 1.0 - EVAL_SHARE
# The same program, timed the same way, ran up to a fifth faster or slower from one process
# to the next, and not alike for every program (the pixel GRU's autodiff and hand-written
# forms, 7 processes of measure.Timed: 56-60 against 48-57 ms; the pixel LSTM's unroll 16,
# 43 ms in the child that chose it, 56-61 in every other process; 2-core AVX-512 EPYC,
# 2026-12-01). So the first child's candidates within SECOND_NEAR of its fastest (at most
# SECOND_MOST of them) are timed again in a second process under the same flags, within
# SECOND_SHARE of the budget, and each is judged by its mean over the processes that timed
# it (:func:`pooled`): the user's run is one more such process. Its timings are first put
# in the first process's terms (:func:`in_terms_of`): where a whole process ran slower, its
# candidates' means would otherwise lose to a baseline timed in the first process alone
# (rows, batch 1024, GRU: the three finalists 24.3-27.9 ms in the first process, 40.8-69.4
# in the second, so means of 33.0-48.6 against the baseline's 27.9, timed once and 4th by
# 0.01 ms, and the baseline kept; 2-core AVX-512 EPYC, 2026-12-03).
SECOND_NEAR = 0.25
SECOND_MOST = 3
SECOND_SHARE = 0.15
# The first child's share where no other process settings follow (the backend has no XLA
# flag alternatives, e.g. a TPU: not a GPU, whose '+WHILE' set is timed in a child of its
# own, runtime.per_compilation; no huge pages and no CPUs to set; or the user set them all):
# all but the second process's, the turns' and the evaluation's parts (without the
# evaluation's, the second process was left a twentieth of the budget, too little to start
# a child).
ALONE_SHARE = 1.0 - SECOND_SHARE - TURNS_SHARE - EVAL_SHARE
# The chunks a sequence is scanned in, timed for the fastest form and unroll: each part at
# least CHUNK_STEPS long (28 rows: 4 parts; 784 pixels: 4 and 8). In turns in one process on
# a 2-core AVX-512 EPYC, 2026-12-01: pixels at batch 50, the GRU 1.17x faster in 8 parts
# (1.11x in 4, 1.04x in 16), the SimpleRNN 1.09x and the LSTM 1.05x in 4; rows at batch 1024
# and unroll 1, 1.07-1.09x in 4; rows at batch 50, and fully unrolled at 1024 and 4096,
# level or slower.
CHUNKS = (4, 8)
CHUNK_STEPS = 4
# A program the first child compiled, loaded from the persistent compilation cache by the
# second: 0.1-0.2 s for compiles of 1.3-3.3 s (GRU, 28 rows, this machine).
CACHED_LOAD = 0.2  # of its compile time, for planning the second child's time
TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2}  # loss and gradients vs the baseline
# XLA flag alternatives per backend, most promising first ('' = XLA's defaults).
FLAG_SETS = {
    # CPU: XLA's own dot kernels in place of YNNPACK's (rows, batch 1024, on a 2-core
    # AVX-512 EPYC: 1.3x faster); 512-bit vectors where the CPU has them (the same machine,
    # in turns across processes: 1.1-4.5% faster in each of 7 runs, rows and pixels, within
    # the spread of identical processes: FLAG_MARGIN; an AVX2 CPU has no 512-bit vectors).
    "cpu": ("--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_prefer_vector_width=512"),
    # GPU: the scan's while loops recorded into CUDA graphs (a step's ~10-25 kernels then
    # launch from the device, not one by one from the host), or no command buffers at all.
    # '+WHILE' adds to XLA's default list, which only $XLA_FLAGS reads: a child of its own
    # (``runtime.per_compilation``).
    "gpu": ("--xla_gpu_enable_command_buffer=+WHILE", "--xla_gpu_enable_command_buffer="),
}
# XLA's flag sets are compiler flags, which apply per compiled program
# (``runtime.compile_options``): the first child times each on the fastest form so far,
# after the forms, in its own process beside the run's own flags
# (:func:`flag_set_candidates`), and a set it timed so needs no child of its own (a set
# that edits a list flag's defaults, ``runtime.per_compilation``, gets one). In one
# process, in turns, rows at batch 1024 on a 2-core AVX-512 EPYC (2026-12-03): the
# SimpleRNN fully unrolled 5.78 -> 3.39 ms with `--xla_cpu_experimental_ynn_fusion_type=`,
# the LSTM 26.4 -> 23.5, the GRU 20.7 -> 17.9; where the same flag timed in a child of its
# own had read 7.54 against 7.34, one process's speed against another's.
FLAGS_IN_PROCESS = True
# A child's process settings besides its XLA flags: started with transparent huge pages
# (rnnjax.process.HUGE_PAGES), timed last, on top of the fastest settings so far. At rows,
# batch 4096, on a 2-core AVX-512 EPYC, pairs of processes: the GRU's train step 1.14-1.30x
# faster, the LSTM's 1.09x, the SimpleRNN's level; pixels, batch 50, the GRU's 1.03-1.09x;
# rows, batch 50, slower. The process starts again for them: a short run pays ~0.5 s.
HUGE_PAGES = "huge_pages"
# ... timed in this many processes, the fastest candidate in each: one process's speed can
# differ from another's by more than their gain (the rows 4096 GRU's fastest form, the same
# program: 85 ms in one child, 126 in another, timed in turns; with against without huge
# pages, four pairs of processes: 135-181 ms against 187-233, each pair 1.18-1.31x).
HUGE_PAGES_PROCESSES = 2
# A child's process settings: on one CPU (``Config.cpus``, ``rnnjax.runtime.apply_cpus``),
# on a CPU backend where the process may use more. XLA:CPU then runs a step's ops on one
# thread. Rows, batch 50, on a 2-core AVX-512 EPYC, pairs of child processes in turns: the
# SimpleRNN 1.13-1.18x faster (the GRU 1.07-1.12x, the LSTM level); at batch 1024 and 4096
# 1.2-1.8x slower; pixels at batch 50 level. So it comes first where a step's batch is at
# most ONE_CPU_FIRST (where other flags were slower), after the XLA flag sets elsewhere.
CPUS = "cpus="
ONE_CPU_FIRST = 64
VISIBLE_DEVICES = ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                   "ROCR_VISIBLE_DEVICES", "TPU_VISIBLE_CHIPS", "TPU_ACCELERATOR_TYPE",
                   "JAX_NUM_CPU_DEVICES")
DEFAULT_BUDGET_S = 30.0  # rnnjax train, first run of a shape
TUNE_COMMAND_BUDGET_S = 120.0  # rnnjax tune
# rnnjax train's default budget follows the run's training time at the defaults (its steps
# at the baseline's measured step, :func:`run_budget`). It never passes what tuning can pay
# back within the run, this share of that time, but is never below the floor (a child's
# start-up, the baseline and a few candidates): a 4-second seed run tunes for 10 s, not 30.
PAY_BACK_SHARE = 0.25
PAY_BACK_FLOOR_S = 10.0
# A long run may tune for this share of its training time where that passes the default
# budget, up to rnnjax tune's budget: at rows, batch 4096, one call of the GRU's autodiff
# baseline took 0.65 s, and 30 s timed 4 of its 11 candidates (2-core AVX-512 EPYC,
# 2026-12-01); its run, 565-605 s at the defaults, now tunes for 57-60 s.
LONG_RUN_SHARE = 0.1
# A cached choice cut short by its budget is tuned again for a run that may spend this many
# times that budget (a longer run of the shape than the one that chose it).
OUTGROWN = 1.5


@dataclass(frozen=True)
class Measurement:
    """One candidate's timing: its Config fields, and ``step_s`` None when not timed."""

    candidate: dict[str, Any]
    flags: str = ""  # the child's process settings (:func:`process_fields`)
    step_s: float | None = None
    compile_s: float | None = None
    difference: float | None = None  # loss and gradients vs the baseline's, relative
    steps: int | None = None  # per timed call
    note: str = ""

    @property
    def fields(self) -> dict[str, Any]:
        """All tuned fields this measurement stands for: its XLA flags are its child's and,
        for an in-process flag set (:func:`flag_set_candidates`), its candidate's."""
        process = process_fields(self.flags)
        flags = " ".join(filter(None, [process["xla_flags"], self.candidate.get("xla_flags")]))
        return {**self.candidate, **process, "xla_flags": flags}


@dataclass
class Child:
    """What one child process reported; while it stays, ``retime(candidate, until, steps)``
    times one more call of a candidate it timed, of ``steps`` steps (None: as many as it
    timed them in; seconds per step, or None), until ``close()``."""

    device: dict[str, Any] | None = None
    measurements: list[Measurement] = field(default_factory=list)
    error: str = ""
    startup_s: float | None = None  # from its start to its first report
    cpus: int | None = None  # the CPUs it ran on
    deadline: float | None = None  # moved by the child (pay_back, alone), if it was
    current: dict[str, Any] | None = None  # the candidate it started and has not reported
    retime: Callable[[dict[str, Any], float, int | None], float | None] | None = None
    # evaluate(candidate, ways, until): measure.evaluation_timing's report of the run's
    # evaluation of a candidate it timed, each way (None: the child cannot)
    evaluate: Callable[[dict[str, Any], list[int | str], float], dict[str, Any] | None] \
        | None = None
    close: Callable[[], None] = lambda: None


# (config, flags, candidates, deadline, steps, reference, call_s, log) -> Child
RunChild = Callable[..., Child]
STOPPED = "child stopped at the time budget"  # Child.error of one the parent stopped


def off_device(child: Child, first: Child | None) -> str:
    """Where ``child`` reported other devices than ``first``, the first child (another
    backend, device kind or count), says so; else ''. A TPU is held by one process at a
    time (libtpu's lock): a later child, while the first one stays, found none and ran on
    the host's CPU, where JAX falls back quietly."""
    ran, ours = (child.device or {}), ((first.device if first else None) or {})
    differ = [k for k in ("backend", "device_kind", "device_count")
              if ran and ours and ran.get(k) != ours.get(k)]
    if not differ:
        return ""
    return ("a child ran on " + ", ".join(f"{k} {ran.get(k)}" for k in differ)
            + ", where the first ran on " + ", ".join(f"{k} {ours.get(k)}" for k in differ))


def timed_baseline(child: Child) -> Measurement | None:
    """The child's first measurement, the baseline, where it timed it; else None."""
    first = child.measurements[0] if child.measurements else None
    return first if first is not None and first.step_s is not None else None


def lost(child: Child) -> dict[str, Any] | None:
    """The candidate (its fields as the child resolved them) ``child`` was timing when its
    process died, where it died after timing its first (the baseline), not stopped at the
    budget: the one it started and did not report (``measure``'s ``trying`` event); else
    None (it died between candidates, or in its final rounds)."""
    if not child.error or child.error == STOPPED or timed_baseline(child) is None:
        return None
    return child.current


def sequence_length(config: Config, spec: DataSpec = IDX_SPEC) -> int:
    """The time steps of ``spec``'s images read in ``config.order`` (28 rows, 784 pixels of
    the IDX layout)."""
    return spec.sequence(config.order)[0]


def process_fields(flags: str) -> dict[str, Any]:
    """A child's process settings as Config fields: ``xla_flags``, ``huge_pages`` and
    ``cpus`` (``flags``: XLA flags, space-separated, :data:`HUGE_PAGES` where it had them,
    and ``cpus=N`` (:data:`CPUS`) where it ran on N of the CPUs)."""
    words = flags.split()
    cpus = [int(w[len(CPUS):]) for w in words if w.startswith(CPUS)]
    return {"xla_flags": " ".join(w for w in words if w.startswith("--")),
            "huge_pages": HUGE_PAGES in words, "cpus": cpus[-1] if cpus else 0}


# A child shares the accelerator with the process that started it and with the other
# children (they stay until the end, for timing in turns): JAX's GPU client takes 75% of the
# device's memory when it starts, which a second process then cannot have. A child takes
# what it uses instead (the user's own $XLA_PYTHON_CLIENT_PREALLOCATE wins; no effect on a
# CPU).
SHARED_DEVICE_MEMORY = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def process_flags(xla_flags: str, huge_pages: bool, cpus: int = 0) -> str:
    """The child's ``flags`` for these Config fields (:func:`process_fields`' inverse)."""
    return " ".join([*xla_flags.split(), *([HUGE_PAGES] if huge_pages else []),
                     *([f"{CPUS}{cpus}"] if cpus else [])])


def child_env(flags: str, env: dict[str, str]) -> dict[str, str]:
    """The environment of a child timing under ``flags``: ``env`` with the XLA flags added
    to ``$XLA_FLAGS``, huge pages asked for in ``$GLIBC_TUNABLES`` where it has them, and,
    unless ``env`` says otherwise, the accelerator's memory taken as needed
    (:data:`SHARED_DEVICE_MEMORY`)."""
    from rnnjax import process

    fields = process_fields(flags)
    env = {**SHARED_DEVICE_MEMORY, **env,
           "XLA_FLAGS": " ".join([*env.get("XLA_FLAGS", "").split(),
                                  *fields["xla_flags"].split()])}
    return process.with_huge_pages(env) if fields["huge_pages"] else env


def describe(fields: dict[str, Any]) -> str:
    """``unroll 0, weight-grad product, ...`` for a set of tuned fields."""
    parts = []
    for name in TUNED:
        if name in fields:
            value = fields[name]
            if name == "xla_flags":
                value = repr(value) if value else "(none)"
            elif name in ("huge_pages", "eval_native"):
                value = "on" if value else "off"
            elif name == "cpus":
                value = value or "all"
            parts.append(f"{name.replace('_', '-')} {value}")
    return ", ".join(parts)


FORMS = ("backward", "projection", "weight_grad")  # the Config fields of a cells.Form
# A form's program: its fields and the native kernels' vector width (Config.native_lanes,
# which only the 'native' form reads), what candidates timed on the fastest so far take
# from it (BEST).
PROGRAM = (*FORMS, "native_lanes")


def child_cells(config: Config) -> dict[str, str]:
    """The cells a child must register as this process did (``rnnjax.cells.source``: the
    run's cell, where registered here over or beside rnnjax's own); ConfigError naming the
    fix where a child cannot import it."""
    from rnnjax import cells

    return _child_source(cells.REGISTRY, config.cell)


def child_sources(config: Config) -> dict[str, dict[str, str]]:
    """What a child must register as this process did: ``{"cells": child_cells(config),
    "orders": ..., "optimizers": ...}``, the run's order and optimizer where registered here;
    ConfigError naming the fix where a child cannot import one."""
    from rnnjax import optim, orders

    return {"cells": child_cells(config),
            "orders": _child_source(orders.REGISTRY, config.order),
            "optimizers": _child_source(optim.REGISTRY, config.optimizer)}


def _child_source(table: Any, name: str) -> dict[str, str]:
    """``{name: MODULE:QUALNAME}`` where ``name`` is registered in ``table`` (a
    ``rnnjax.registry.Registry``) by this process, else ``{}``; ConfigError naming the fix
    where no child can import it (``Registry.source``)."""
    try:
        where = table.source(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {} if where is None else {name: where}


def builtin_cell(config: Config) -> Any:
    """The registered cell ``config`` names, or None for a Flax cell class (``MODULE:CLASS``:
    importing it here could start work the parent process must not do)."""
    from rnnjax import cells

    return cells.CELLS[config.cell](config.hidden_size) if config.cell in cells.CELLS else None


def baseline(config: Config, pinned: frozenset[str]) -> dict[str, Any]:
    """The untuned run's fields (the Config defaults, or the pinned values), its form's
    'auto' choices resolved (``cells.resolve_form``)."""
    from rnnjax import cells

    fields = ("unroll", *PROGRAM, "chunks", "feed")
    defaults = Config()
    base = {name: (getattr(config, name) if name in pinned else getattr(defaults, name))
            for name in fields}
    cell = builtin_cell(config)
    if cell is None:
        return {**base, "backward": "autodiff", "projection": "in_loop", "weight_grad": "product"}
    form = cells.resolve_form(cell, config.batch_size, base["backward"], base["projection"],
                              base["weight_grad"])
    return {**base, **dataclasses.asdict(form)}


def form_candidates(config: Config, pinned: frozenset[str], base: dict[str, Any]
                    ) -> list[dict[str, Any]]:
    """The other forms of the cell worth timing against ``base``'s, each a set of
    ``FORMS`` fields: the other projection, the other weight gradient, the other backward
    (its default projection; first when the baseline is autodiff, and then with its other
    weight gradient and its other projection too: autodiff's form has no such choices of
    its own), as far as the cell has them and they are not pinned."""
    from rnnjax import cells

    cell = builtin_cell(config)
    if cell is None:
        return []
    current = {name: base[name] for name in FORMS}
    out: list[dict[str, Any]] = []

    def other(form: dict[str, Any], name: str) -> str:  # of a projection or weight gradient
        return {"hoisted": "in_loop", "in_loop": "hoisted",
                "product": "per_step", "per_step": "product"}[form[name]]

    def add(**changes: str) -> None:
        if set(changes) & pinned:
            return
        wanted = {**current, **changes}
        if "projection" not in changes and "backward" in changes:
            wanted["projection"] = base["projection"] if "projection" in pinned else "auto"
        if "weight_grad" not in changes and "backward" in changes:
            wanted["weight_grad"] = base["weight_grad"] if "weight_grad" in pinned else "auto"
        form = dataclasses.asdict(cells.resolve_form(cell, config.batch_size, **wanted))
        if form != current and form not in out:
            out.append(form)

    if base["backward"] == "autodiff":  # the hand-written pass first: the likelier to win
        add(backward="hand_written")
        written = out[-1] if out and out[-1]["backward"] == "hand_written" else None
        if written is not None:  # its other forms: autodiff's flips below change nothing
            add(backward="hand_written", weight_grad=other(written, "weight_grad"))
            add(backward="hand_written", projection=other(written, "projection"))
    add(projection=other(base, "projection"))
    add(weight_grad=other(base, "weight_grad"))
    if base["backward"] == "hand_written":
        add(backward="autodiff")
    return out


def model_candidates(config: Config, pinned: frozenset[str], spec: DataSpec = IDX_SPEC,
                     flag_sets: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Candidate ``{unroll, backward, projection, weight_grad, chunks, feed}`` to time, most
    promising first: the baseline; fully unrolled, which won at every batch on the AVX-512
    machine of issue 11 (in the hand-written form where the baseline is autodiff, after that
    form at the baseline's unroll: the GRU's, 28 rows at batch 50, ran 1.82 ms at unroll 1
    and 2.20 fully unrolled, where autodiff at unroll 1 ran slower than both; skipped
    when its compile time, predicted from the unrolls compiled so far, would overrun the
    budget, as for 784 pixels); the cell's native kernels, on a CPU, where it has them
    (:func:`native_offered`: right after the baseline where the batch is at most
    :data:`ONE_CPU_FIRST`, whose steps are chains of small ops, the native form's case:
    there the rows 50 GRU's first 10 s had no time left for it after the unroll probes;
    after them elsewhere; each other vector width right after it,
    :func:`native_lanes_offered`; on a GPU, right after the baseline, ``rnnjax.native_gpu``'s
    kernels); each other form of the cell at the faster of those two
    unrolls (``unroll`` :data:`BEST`, resolved by the child: the forms' order at one unroll
    need not hold at another, as where a full unroll lets the per-step weight gradients run
    beside the recurrence; autodiff, where a hand-written form exists, at the baseline's);
    the fastest form and unroll in :data:`CHUNKS` parts; the fastest form and chunks at the
    middle unroll; then the other feed. (Where the two unrolls timed alike, a form is timed
    at both: ``measure.resolutions``.) ``flag_sets`` (:func:`flag_set_candidates`) come
    after the forms, before the chunks: on the fastest form (timed on the fastest of the
    first two, the pixel GRU's flags ran on its autodiff baseline where its hand-written
    form, timed once, had read 54 ms, and 31-37 since), and worth more than chunks at
    large batches."""
    from rnnjax import native

    base = baseline(config, pinned)
    length = sequence_length(config, spec)
    middle = 2 ** int(math.log2(math.sqrt(length)))  # 4 for 28 steps, 16 for 784
    # A native baseline (--backward native) runs one custom call a pass, no loop over time:
    # no unroll to time (each would run the baseline's program again), its other vector
    # width right after it.
    native_base = base["backward"] == "native"
    tune_unroll = "unroll" not in pinned and not native_base
    forms = form_candidates(config, pinned, base)
    hand_written = [form for form in forms if form["backward"] == "hand_written"]
    has_hand_written = bool(hand_written) or base["backward"] == "hand_written"

    def widths(form: dict[str, Any]) -> list[dict[str, Any]]:  # the CPU's other widths
        return [{**form, "native_lanes": lanes, ON: "cpu"}
                for lanes in native_lanes_offered(base, pinned)]

    out = [base, *(widths(base) if native_base and native.unavailable() is None else ())]
    if tune_unroll and base["unroll"] != 0:  # an autodiff baseline: its hand-written form
        probe = hand_written[0] if hand_written and base["backward"] == "autodiff" else {}
        if probe:  # at the baseline's unroll too, so that the unrolls compare in one form
            out.append({**base, **probe})
        out.append({**base, **probe, "unroll": 0})
    native = {**base, "backward": "native", "projection": "hoisted", "weight_grad": "product"}
    backends = native_offered(config, pinned)  # its unroll and other forms: none to choose
    if "cpu" in backends:
        at = 1 if config.batch_size <= ONE_CPU_FIRST else len(out)
        out[at:at] = [{**native, ON: "cpu"}, *widths(native)]
    if "gpu" in backends:  # one kernel a pass where XLA launches several a step: first
        out.insert(1, {**native, ON: "gpu"})
    for form in forms:
        # Autodiff's fully unrolled program compiled 3x slower than the hand-written one
        # (LSTM, 28 rows: 10.9 s against 3.4 s) and ran 2.5x slower (GRU: 69.6 against 50.7
        # ms at unroll 1): where a hand-written form exists, autodiff is timed at the
        # baseline's unroll.
        slow = form["backward"] == "autodiff" and has_hand_written
        out.append({**base, **form, "unroll": BEST if tune_unroll and not slow
                    else base["unroll"]})
    out += flag_sets
    if "chunks" not in pinned:
        for chunks in CHUNKS:
            if chunks * CHUNK_STEPS <= length and chunks != base["chunks"]:
                out.append({**base, **{name: BEST for name in PROGRAM if name not in pinned},
                            "unroll": BEST if tune_unroll else base["unroll"], "chunks": chunks})
    if tune_unroll and middle != base["unroll"]:
        out.append({**base, **dict.fromkeys(PROGRAM, BEST), "unroll": middle,
                    "chunks": base["chunks"] if "chunks" in pinned else BEST})
    if "feed" not in pinned and config.source == "idx":
        out.append({**base, "feed": "stream" if base["feed"] == "device" else "device"})
    return out


def unroll_probe(candidates: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Of :func:`model_candidates`' ``candidates``, the unroll probe: the first fully
    unrolled where the baseline (the first) is not (None where it is, or the unroll is
    pinned)."""
    if not candidates or candidates[0]["unroll"] == 0:
        return None
    return next((c for c in candidates[1:] if c["unroll"] == 0), None)


def reaching(candidates: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of :func:`model_candidates`' ``candidates``, those that may take the budget's
    :data:`REACH_SHARE` (``measure.reach_until``), as a child sees them (without
    ``measure.ON``): the native candidates (each vector width) and the unroll probe, the
    most promising after the baseline (on the 2-vCPU Xeon the native form won all twelve
    cases of tuner version 25's Flax run, at 16 lanes; on an H200 the full
    unroll ran 1.1-2.1x faster than unroll 1). They keep the candidates' order: where only
    the first child's share was given them, the seed's first run timed the probe and left
    the native kernels at 16 lanes (0.224 ms a step against 0.315 at 8) untimed with 2 s
    left (2026-12-04)."""
    probe = unroll_probe(candidates)
    out: list[dict[str, Any]] = []
    for c in candidates[1:]:
        fields = {name: value for name, value in c.items() if name != ON}
        kernels = c["backward"] == "native" and all(  # the native form, no other setting
            c[name] == value for name, value in candidates[0].items() if name not in PROGRAM)
        if (kernels or c is probe) and fields not in out:
            out.append(fields)  # (the CPU's and the GPU's native: the same fields)
    return out


def native_offered(config: Config, pinned: frozenset[str]) -> list[str]:
    """The backends whose children time the cell's native kernels (backward 'native'),
    where the cell has them (``rnnjax.cells.native_backends``), the run is float32 and no
    form field is pinned (they honour none): a CPU's (``rnnjax.native``) where a C++
    compiler is at hand to build them (once per machine, about 2 s, in the child that
    times them first), a GPU's (``rnnjax.native_gpu``'s Pallas kernels) where the hidden
    width fits them (``native_gpu.fits``)."""
    from rnnjax import native, native_gpu
    from rnnjax.cells import native_backends

    cell = builtin_cell(config)
    if cell is None or config.compute_dtype != "float32" or set(FORMS) & pinned:
        return []
    usable = {"cpu": native.unavailable() is None,
              "gpu": native_gpu.fits(config.hidden_size)}
    return [backend for backend in native_backends(cell) if usable.get(backend, False)]


def native_lanes_offered(base: dict[str, Any], pinned: frozenset[str]) -> list[int]:
    """The native kernels' vector widths (``Config.native_lanes``) timed beside ``base``'s
    (right after it): 16 lanes where the CPU has 512-bit registers
    (``native.wide_vectors``) and the width is not pinned. Which is faster depends on the
    CPU's vector units and the shape. On a 2-vCPU EPYC that runs 512-bit vectors as two
    256-bit halves, 16 lanes had timed 1.04x faster for the GRU at batch 50 and
    1.03-1.33x slower elsewhere (2026-12-02). On a 2-vCPU AVX-512 Xeon, with the products'
    blocks fitting the registers (tuner version 23), a layer's forward and backward ran
    1.03-1.30x faster at 16 lanes in all six cases timed in turns in one process
    (2026-12-04), the rows 4096 SimpleRNN's train step 13.9 ms against 17.5."""
    from rnnjax import native

    if "native_lanes" in pinned or not native.wide_vectors():
        return []
    return [lanes for lanes in NATIVE_LANES if lanes != base["native_lanes"]]


PROCESS_SETTINGS = ("xla_flags", "huge_pages", "cpus")  # Config fields: a child's ``flags``


def flag_set_candidates(config: Config, pinned: frozenset[str], env_flags: str
                        ) -> list[dict[str, Any]]:
    """Each backend's XLA flag sets (:data:`FLAG_SETS`, but those that set a flag
    ``env_flags`` sets; none where ``xla_flags`` is pinned) as candidates the first child
    times in its own process (:data:`FLAGS_IN_PROCESS`): the fastest form and unroll so far
    (:data:`BEST`, but the pinned fields) compiled under the set (``xla_flags``), on a child
    of that backend (``measure.ON``) only."""
    if not FLAGS_IN_PROCESS or "xla_flags" in pinned:
        return []
    from rnnjax import runtime

    base = baseline(config, pinned)
    best = {name: BEST for name in ("unroll", *PROGRAM) if name not in pinned}
    return [{**base, **best, "xla_flags": flags, ON: backend}
            for backend in FLAG_SETS for flags in backend_flag_sets(backend, env_flags)
            if runtime.per_compilation(flags)]


def backend_flag_sets(backend: str, env_flags: str) -> list[str]:
    """``backend``'s XLA flag sets (:data:`FLAG_SETS`) but those that set a flag the user's
    ``env_flags`` (``$XLA_FLAGS``) already sets."""
    given = flag_names(env_flags)
    return [flags for flags in FLAG_SETS.get(backend, ()) if not flag_names(flags) & given]


def flag_names(flags: str) -> set[str]:
    """The names of the XLA flags ``flags`` sets (``--xla_name=value``, space-separated)."""
    return {flag.split("=")[0] for flag in flags.split()}


def own_settings(config: Config, pinned: frozenset[str]) -> dict[str, Any]:
    """The run's own process settings (:data:`PROCESS_SETTINGS`): those the user set, the
    defaults for the others; every child's ``flags`` keep the ones set."""
    defaults = Config()
    return {name: getattr(config if name in pinned else defaults, name)
            for name in PROCESS_SETTINGS}


def flag_candidates(backend: str, pinned: frozenset[str], config: Config,
                    env_flags: str, env: dict[str, str] | None = None) -> list[str]:
    """Process settings to time on ``backend`` (a child's ``flags``): the run's own first,
    then the XLA flag sets that set no flag the user's ``$XLA_FLAGS`` already sets, and on
    a CPU one CPU (where the process may use more, before the flag sets for a small batch:
    :data:`ONE_CPU_FIRST`), then :data:`HUGE_PAGES` alone, which :func:`tune` times on top
    of the fastest settings so far, in :data:`HUGE_PAGES_PROCESSES` children (on a CPU,
    where huge pages are to be had: ``rnnjax.process.huge_pages_unavailable`` of ``env``,
    default this process's environment)."""
    own = own_settings(config, pinned)
    base = process_flags(**own)
    alternatives = [] if "xla_flags" in pinned else [
        process_flags(**{**own, "xla_flags": flags})
        for flags in backend_flag_sets(backend, env_flags)]
    if backend == "cpu" and one_cpu_offered(pinned):
        one = process_flags(**{**own, "cpus": 1})
        alternatives.insert(0 if config.batch_size <= ONE_CPU_FIRST else len(alternatives), one)
    if backend == "cpu" and huge_pages_offered(pinned, env):
        alternatives.append(HUGE_PAGES)
    return [base, *alternatives]


def huge_pages_offered(pinned: frozenset[str], env: dict[str, str] | None = None) -> bool:
    """Whether huge pages are timed, on a CPU: not pinned, and to be had here
    (``rnnjax.process.huge_pages_unavailable`` of ``env``, default this process's)."""
    from rnnjax import process

    return "huge_pages" not in pinned and process.huge_pages_unavailable(env) is None


def one_cpu_offered(pinned: frozenset[str]) -> bool:
    """Whether a child on one CPU is timed, on a CPU: ``cpus`` not pinned, and this process
    may use more than one (``rnnjax.process.usable_cpus``)."""
    from rnnjax import process

    return "cpus" not in pinned and len(process.usable_cpus()) > 1


def _flags_only(flags: str, config: Config, pinned: frozenset[str]) -> bool:
    """Whether a child's ``flags`` differ from the run's own process settings in their XLA
    flags alone, each an option of one compilation (a flag set, timed in the first child
    where :data:`FLAGS_IN_PROCESS`; ``runtime.per_compilation``)."""
    from rnnjax import runtime

    own, fields = own_settings(config, pinned), process_fields(flags)
    return fields["huge_pages"] == own["huge_pages"] and fields["cpus"] == own["cpus"] \
        and fields["xla_flags"] != own["xla_flags"] \
        and runtime.per_compilation(fields["xla_flags"])


def others_on(config: Config, pinned: frozenset[str], env_flags: str) -> list[str]:
    """The backends on which other process settings than the run's own would be timed
    in children of their own (:func:`flag_candidates`; XLA flag sets alone are timed in the
    first child, :data:`FLAGS_IN_PROCESS`), known before the backend starts: the first child learns
    its backend, and where it is not one of these it may take :data:`ALONE_SHARE` of the
    budget, not :data:`FIRST_SHARE` (a TPU run's first child stopped at 60% of it, and 15%
    went to flag sets it had none of)."""
    return [backend for backend in sorted({"cpu", *FLAG_SETS})
            if [flags for flags in flag_candidates(backend, pinned, config, env_flags)[1:]
                if not (FLAGS_IN_PROCESS and _flags_only(flags, config, pinned))]]


def tolerance(config: Config) -> float:
    return TOLERANCE.get(config.compute_dtype, 1e-3)


def select(measurements: Sequence[Measurement], base: dict[str, Any], base_flags: str,
           tol: float, margin: float = MARGIN, flag_margin: float = FLAG_MARGIN
           ) -> Measurement | None:
    """The fastest timed candidate whose results match, the baseline kept unless another is
    at least ``margin`` faster, the run's own process settings (XLA flags, CPUs) unless
    other settings are at least ``flag_margin`` faster than the fastest under them, and
    huge pages (the run's own
    setting of them) unless they are that much faster than the fastest without them (for
    them ``rnnjax train`` starts again); None when the baseline was not timed."""
    valid = [m for m in measurements if _matches(m, tol)]
    first = [m for m in valid if m.candidate == base and m.flags == base_flags]
    if not first:
        return None

    def fastest(ms: list[Measurement]) -> Measurement:  # the run's own flags kept, but...
        best = min(ms, key=lambda m: m.step_s)
        own = min((m for m in ms if m.flags == base_flags), key=lambda m: m.step_s)
        return own if best.step_s >= own.step_s * (1 - flag_margin) else best

    def huge(m: Measurement) -> bool:
        return process_fields(m.flags)["huge_pages"]

    best = fastest(valid)
    if huge(best) != huge(first[0]):
        without = fastest([m for m in valid if huge(m) == huge(first[0])])
        if best.step_s >= without.step_s * (1 - flag_margin):
            best = without
    return best if best.step_s < first[0].step_s * (1 - margin) else first[0]


# --- the cache ----------------------------------------------------------------------------


def key(config: Config, pinned: frozenset[str], env: dict[str, str] | None = None,
        spec: DataSpec = IDX_SPEC) -> dict:
    """What the choice depends on, known before JAX's backend starts (``spec``: the
    dataset's images, whose sequence is the model's input)."""
    from rnnjax import cells, native, optim, orders, process, runtime

    env = dict(os.environ) if env is None else env
    return {
        "tuner": TUNER_VERSION,
        "machine": {
            "cpu": runtime.cpu_name(),
            "devices": {name: env[name] for name in VISIBLE_DEVICES if name in env},
            "num_devices": config.num_devices,
            "xla_flags": env.get("XLA_FLAGS", ""),
            "huge_pages": _huge_pages_key(env),
            "cpus": len(process.usable_cpus()),
            # A choice of the native kernels is no choice where they cannot be built.
            "native": native.unavailable() is None,
        },
        "model": {
            "cell": config.cell, "hidden_size": config.hidden_size,
            # A cell registered in Python, apart from rnnjax's of the same name.
            **({"registered": where} if (where := cells.registered(config.cell)) else {}),
            "num_layers": config.num_layers, "bidirectional": config.bidirectional,
            "order": config.order, "input": list(spec.sequence(config.order)),
            **({"order_registered": where} if (where := orders.REGISTRY.registered(config.order))
               else {}),
            "compute_dtype": config.compute_dtype,
            "num_classes": config.num_classes or spec.num_classes,  # the model's, else the data's
            "optimizer": config.optimizer, "clip_norm": config.clip_norm > 0,
            **({"optimizer_registered": where}
               if (where := optim.REGISTRY.registered(config.optimizer)) else {}),
        },
        "batch_size": config.batch_size,
        "eval_batch_size": config.eval_batch_size,  # the chunk the evaluation is timed in
        "feed": {"source": config.source, "steps_per_call": config.steps_per_call},
        "pinned": {name: getattr(config, name) for name in sorted(pinned)},
        "versions": {**runtime.versions(runtime.GPU_PLUGINS + runtime.TPU_PLUGINS),
                     "rnnjax": __version__},
    }


def _huge_pages_key(env: dict[str, str]) -> bool | str:
    """The key's ``huge_pages``: whether a process of ``env`` asks for them (True: the
    :data:`~rnnjax.process.HUGE_PAGES` rnnjax sets; False: no setting), or the user's own
    other ``glibc.malloc.hugetlb`` value, e.g. "0", under which they are not offered (a
    choice made where they were, which may start the run again with them, is not reused
    there)."""
    from rnnjax import process

    setting = process.hugetlb_setting(env)
    return process.huge_pages_on(env) if setting in (None, "1") else setting


def cache_dir(compile_cache: str) -> Path | None:
    """``tune/`` beside the compilation cache's directory; None when that is 'off'."""
    from rnnjax import runtime

    directory = runtime.compile_cache_dir(compile_cache)
    return None if directory is None else Path(directory).parent / "tune"


def cache_path(directory: Path, key_: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key_, sort_keys=True).encode()).hexdigest()
    return directory / f"{digest[:20]}.json"


def load(directory: Path | None, key_: dict) -> dict[str, Any] | None:
    """The cached record for ``key_``; None when absent, unreadable or of another key."""
    if directory is None:
        return None
    try:
        record = json.loads(cache_path(directory, key_).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key_:
        return None
    choice, device = record.get("choice"), record.get("device")
    if not isinstance(choice, dict) or set(choice) != set(TUNED) or not (
            device is None or isinstance(device, dict)):  # check_device reads the device's
        return None
    try:
        Config().replace(**choice)
    except (ValueError, TypeError):
        return None
    return record


def outgrown(record: dict[str, Any], config: Config, budget_s: float,
             pay_back: bool) -> float | None:
    """The budget this run may spend, where its cached ``record`` was cut short by a much
    smaller one (a short first run's pay-back budget, and now a longer run of the shape:
    ``rnnjax train --steps 50`` then the full run); None where the cached choice stands
    (every candidate timed, or this run may spend at most :data:`OUTGROWN` times as
    much). With ``pay_back`` what this run may spend comes from the baseline's step as the
    record timed it (:func:`run_budget`)."""
    had = record.get("budget_s")
    if record.get("complete", True) or not isinstance(had, (int, float)):
        return None
    allowed = budget_s
    if pay_back:
        base, table = record.get("baseline"), record.get("table")
        if not isinstance(base, dict) or not base or not isinstance(table, list):
            return None
        steps = [row["step_ms"] for row in table
                 if isinstance(row, dict) and isinstance(row.get("step_ms"), (int, float))
                 and all(row.get(k) == v for k, v in base.items())]
        if not steps:
            return None
        allowed = run_budget(config.steps * min(steps) * 1e-3, budget_s)
    return allowed if allowed > OUTGROWN * had else None


def save(directory: Path | None, record: dict[str, Any]) -> Path | None:
    """Write ``record`` (atomically); its path, or None when there is no cache or the
    directory cannot be written (tuning then simply runs again next time)."""
    if directory is None:
        return None
    path = cache_path(directory, record["key"])
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(record, indent=2) + "\n")
    except OSError:  # unwritable, or a full disk: no half-written file left behind
        return None
    return path


@contextlib.contextmanager
def shape_lock(directory: Path | None, key_: dict,
               waiting: Callable[[Path], None]) -> Iterator[bool]:
    """Hold ``key_``'s lock in ``directory`` (the tuner's cache) while its shape is tuned
    and saved, so that two processes starting one new shape together tune it once, neither
    timing under the other's load. Where another process holds it, ``waiting(lock path)``
    is called once and this one blocks until it is free (a holder killed frees it at once).
    Yields whether it waited. With no cache, or one that cannot be written, it yields False
    at once and locks nothing (nothing is shared).

    The lock file is removed by its holder, so the cache holds only records; a waiter that
    wakes on a removed file opens the new one (flock binds the open file, not the name)."""
    import fcntl  # POSIX, as checkpoint.workdir_lock's

    path = None if directory is None else cache_path(directory, key_).with_suffix(".lock")
    fd, waited = None, False
    try:
        while path is not None:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    waiting(path)
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                break
            os.close(fd)  # its holder removed it as it finished: lock the current one
            fd = None
    except OSError:  # unwritable: save() will say so; nothing to share, nothing locked
        if fd is not None:
            os.close(fd)
        fd = None
    try:
        yield waited
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # before the lock is let go: see the docstring
            os.close(fd)


def unsaved(directory: Path | None) -> str:
    """Why :func:`save` into ``directory`` (the tuner's cache, None with no
    ``--compile-cache``) returned None, in a few words."""
    return "no --compile-cache" if directory is None else f"{directory} cannot be written"


def apply(config: Config, choice: dict[str, Any], pinned: frozenset[str]) -> Config:
    """``config`` with the chosen fields, the pinned ones left as they are."""
    return config.replace(**{k: v for k, v in choice.items() if k not in pinned})


def unrunnable(config: Config) -> str | None:
    """Why ``config``, a cached choice applied, would not run as it names, or None: a form
    its cell lacks (``cells.resolve_form`` runs another: a cell registered again under the
    name with other code, a cache file edited), native kernels the cell or this machine
    lacks, more CPUs than this process may use. The choices the tuner makes pass."""
    from rnnjax import process
    from rnnjax.cells import Form, get_cell, unhonoured
    from rnnjax.model import native_unavailable

    forms = {f.name: getattr(config, f.name) for f in dataclasses.fields(Form)}
    try:
        cell = get_cell(config.cell, config.hidden_size)
        form, differ = unhonoured(cell, config.batch_size, **forms)
        process.first_cpus(config.cpus)
    except Exception as e:  # what it lacks, without a flag's advice (a cell that fails to
        # build here makes the choice stale too: the run then fails on it as a first one does)
        return str(e).split("; ")[0] or type(e).__name__
    if differ:
        return f"--cell {config.cell} with " + ", ".join(
            f"{name.replace('_', '-')} {forms[name]} (it runs {getattr(form, name)})"
            for name in differ)
    why = native_unavailable(cell) if form.backward == "native" else None
    return None if why is None else f"backward native: {why}"


# --- measuring ----------------------------------------------------------------------------


def run_child(
    config: Config, flags: str, candidates: list[dict[str, Any]], deadline: float,
    steps: int | None, reference: str, call_s: float, log: Callable[[str], None],
    pay_back: dict[str, float] | None = None, compiled: bool = False,
    data: DataSpec = IDX_SPEC, alone: dict[str, Any] | None = None,
    reach: dict[str, Any] | None = None, exclude: Sequence[dict[str, Any]] = (),
) -> Child:
    """Time ``candidates`` in a child process under ``flags`` (:func:`child_env`: XLA
    flags added to ``$XLA_FLAGS``, huge pages), on synthetic images of ``data``'s shape.

    Each result is logged as it arrives; the child is killed a little after ``deadline``
    (what it reported by then is kept), or after the earlier deadline it reports once its
    first candidate is timed, with ``pay_back`` (``{"start", "steps", "share", "budget_s"}``:
    the tuning's start, the run's steps, this child's part and the default budget,
    :func:`pay_back_deadline`).
    ``compiled``: an earlier child compiled every candidate (this one loads them from the
    compilation cache, and predicts no compile time). ``alone`` (``{"others_on": backends,
    "deadline", "share"}``): on a backend not among ``others_on`` (no other process settings
    follow it there) the child's deadline is ``deadline`` and its pay-back part ``share``,
    reported as its deadline moved (:func:`others_on`). ``reach`` (``{"candidates",
    "deadline", "share"}``): those candidates may be timed until that deadline, or that
    share of the run's budget with ``pay_back`` (``measure.reach_until``: :func:`reaching`,
    the deadline reported before one starts). ``exclude``: candidates (as a child resolves
    them) that killed an earlier child, never started (:func:`lost`). A child that
    finished stays, for
    :attr:`Child.retime` (one more call of a candidate it timed) until :attr:`Child.close`.
    """
    from rnnjax.measure import PREFIX

    env = child_env(flags, dict(os.environ))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    spec = {"config": to_dict(config.replace(cpus=process_fields(flags)["cpus"])),
            "candidates": candidates, "deadline": deadline,
            "steps": steps, "call_s": call_s, "repeats": 3, "reference": reference,
            "pay_back": pay_back, "compiled": compiled, "data": data.to_json(),
            "alone": alone, "reach": reach, "exclude": list(exclude),
            **child_sources(config), "path": list(sys.path)}
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "rnnjax.measure"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    reader.start()

    def killer(until: float) -> threading.Timer:
        # A compile started before the deadline finishes after it: a child killed loses
        # all it measured, one let finish costs a few seconds.
        grace = max(2.0, min(10.0, 0.5 * (until - time.time())))
        timer = threading.Timer(max(0.0, until - time.time()) + grace, proc.kill)
        timer.start()
        return timer

    def events():
        for line in proc.stdout:
            if line.startswith(PREFIX):
                yield json.loads(line[len(PREFIX):])

    def close() -> None:
        if proc.poll() is None:
            try:
                proc.stdin.close()  # the child's end of requests: it exits
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        reader.join(timeout=1.0)

    child = Child(close=close)
    timer = killer(deadline)
    ready = False
    try:
        proc.stdin.write(json.dumps(spec) + "\n")
        proc.stdin.flush()
        for event in events():
            if event["event"] == "ready":
                ready = True
                break
            if event["event"] == "refused":  # the run cannot work here: say so, at once
                timer.cancel()
                proc.kill()
                proc.wait()
                raise ConfigError(event["reason"])
            if event["event"] == "budget":  # its deadline, moved (pay_back, alone, reach)
                timer.cancel()
                deadline = event["deadline"]
                if not event.get("reach"):  # the child's own, not one candidate's reach
                    child.deadline = deadline
                timer = killer(deadline)
                continue
            if event["event"] == "device":
                child.device = {k: event[k] for k in ("backend", "device_kind", "device_count")}
                child.startup_s, child.cpus = time.time() - started, event.get("cpus")
                continue
            if event["event"] == "trying":
                child.current = event["candidate"]
                continue
            if event["event"] == "retimed":
                for i, m in enumerate(child.measurements):
                    if m.candidate == event["candidate"] and m.step_s is not None:
                        child.measurements[i] = dataclasses.replace(m, step_s=event["step_s"])
                        log(format_row(child.measurements[i]) + " (timed again)")
                continue
            if event["event"] == "result":
                m = Measurement(event["candidate"], flags, event["step_s"], event["compile_s"],
                                event["difference"], event["steps"])
            elif event["event"] == "skipped":
                m = Measurement(event["candidate"], flags, note=event["reason"])
            else:
                continue
            child.measurements.append(m)
            child.current = None
            log(format_row(m))
    except OSError:  # the child is gone: its exit status says why
        pass
    except BaseException:  # an interrupt (Ctrl-C), an error: the child goes with the tuner
        proc.kill()
        proc.wait()
        raise
    finally:
        timer.cancel()
    if not ready:
        close()
        code = proc.wait()
        tail = [line.strip() for line in errors if line.strip()]
        # Killed by the parent's timer (SIGKILL) past its deadline; a crash is named as one.
        child.error = (STOPPED if code == -signal.SIGKILL and time.time() > deadline
                       else f"child exited {code}: {tail[-1] if tail else 'no message'}")[:300]
        log(f"  {describe(process_fields(flags))}: {child.error}")
        reported = [m.candidate for m in child.measurements]
        child.measurements += [
            Measurement(c, flags, note=child.error)
            for c in for_backend(candidates, (child.device or {}).get("backend"))
            if c not in reported]
        return child

    def ask(request: dict[str, Any], answer: str, until: float) -> dict[str, Any] | None:
        """The child's ``answer`` event to one ``request`` line, None when it cannot give
        it (gone, or past ``until``)."""
        if proc.poll() is not None:
            return None
        timer = killer(until)
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            return next((e for e in events() if e["event"] == answer), None)
        except OSError:
            return None
        finally:
            timer.cancel()

    def retime(candidate: dict[str, Any], until: float, steps: int | None = None
               ) -> float | None:
        """One more call of ``candidate`` (timed by this child), of ``steps`` steps (None:
        as many as it timed it in): seconds per step, None when the child cannot (gone, or
        past ``until``)."""
        event = ask({"time": candidate, "steps": steps}, "timing", until)
        return None if event is None else event["step_s"]

    def evaluate(candidate: dict[str, Any], ways: list[int | str], until: float
                 ) -> dict[str, Any] | None:
        """The run's evaluation of ``candidate`` timed each of ``ways``
        (:func:`rnnjax.measure.evaluation_timing`), or None (gone, or past ``until``)."""
        return ask({"evaluate": candidate, "ways": ways, "until": until}, "evaluation", until)

    child.retime, child.evaluate = retime, evaluate
    return child


def format_row(m: Measurement) -> str:
    what = describe(m.fields)
    if m.step_s is None:
        return f"  {what}: not timed ({m.note})"
    return (f"  {what}: {m.step_s * 1e3:.3f} ms/step (compile {m.compile_s:.1f} s, "
            f"results differ by {m.difference:.1e})")


@dataclass
class Result:
    """A tuning session: the choice (None: nothing measured in budget), the table, where."""

    key: dict[str, Any]
    choice: dict[str, Any] | None
    baseline: dict[str, Any]
    measurements: list[Measurement]
    device: dict[str, Any] | None
    seconds: float
    budget_s: float
    complete: bool  # every candidate was timed (or skipped for a reason other than budget)
    final: list[Measurement] = field(default_factory=list)  # in_turns: what was chosen from
    evaluation: dict[str, Any] | None = None  # evaluation_choice's timing, where it was timed

    @property
    def means(self) -> list[Measurement]:
        """Each candidate more than one process timed, with its mean over them: what was
        chosen from beside those one process timed (:func:`pooled`)."""
        return [m for m in pooled(self.final or self.measurements)
                if m.note.startswith("mean of")]

    def record(self) -> dict[str, Any]:
        """The JSON written to the cache and into summary.json."""
        return {
            "key": self.key, "choice": self.choice, "baseline": self.baseline,
            "device": self.device, "tune_s": round(self.seconds, 2), "budget_s": self.budget_s,
            "complete": self.complete,
            "table": [{**m.fields, "step_ms": None if m.step_s is None else m.step_s * 1e3,
                       "compile_s": m.compile_s, "difference": m.difference, "steps": m.steps,
                       "note": m.note}
                      for m in [*self.measurements, *self.final, *self.means]],
            "evaluation": self.evaluation,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def tune(
    config: Config, pinned: frozenset[str] = frozenset(), budget_s: float = DEFAULT_BUDGET_S,
    *, log: Callable[[str], None] = lambda line: None, child: RunChild | None = None,
    clock: Callable[[], float] = time.time, pay_back: bool = False,
    spec: DataSpec = IDX_SPEC,
) -> Result:
    """Time the candidates for ``config`` within ``budget_s`` seconds and choose, for
    images of ``spec``'s shape (the run's dataset's).

    First the model candidates under the run's own flags (the baseline first), then the
    closest of them again in a second process (:meth:`Tuning.again_in_second_process`),
    then the best two of them (by their means) under each alternative set of XLA flags,
    and on one CPU, while the budget lasts (then huge pages on top of the fastest:
    :meth:`Tuning.under_other_flags`), then the baseline, each child's fastest and the
    second process's candidates again, in turns (:func:`in_turns`): the choice is made from
    those timings when there are any, each candidate by its mean over the processes that
    timed it (:func:`pooled`).
    ``pay_back``: once the baseline is timed, the budget follows the run of
    ``config.steps`` at its step (:func:`run_budget`: less for a short run, more for a long
    one; the first child may run until the longest such budget's first part, and brings
    its deadline forward once it has timed the baseline). ``child`` (default
    :func:`run_child`) and ``clock`` are the measuring process and the budget's clock
    (tests pass fakes).
    """
    child_sources(config)  # a cell, order or optimizer registered here no child imports
    child = child or functools.partial(run_child, data=spec)
    start = clock()
    call_s = min(0.3, max(0.02, budget_s / 200))
    env_flags = os.environ.get("XLA_FLAGS", "")
    candidates = model_candidates(config, pinned, spec,
                                  flag_set_candidates(config, pinned, env_flags))
    base = candidates[0]
    base_flags = process_flags(**own_settings(config, pinned))
    # The run's own flags get the first FIRST_SHARE of the budget when other flags may follow
    # (of the budget as given, and of the budget that follows the run's length: run below),
    # else ALONE_SHARE: told the backends where they would, the first child takes the
    # larger share on any other.
    backends = others_on(config, pinned, env_flags)
    share = FIRST_SHARE if backends else ALONE_SHARE
    longest = max(budget_s, TUNE_COMMAND_BUDGET_S) if pay_back else budget_s
    first_deadline = start + share * longest
    alone = {"others_on": backends, "deadline": start + ALONE_SHARE * longest,
             "share": ALONE_SHARE} if backends else None
    promising = reaching(candidates)
    reach = {"candidates": promising, "deadline": start + REACH_SHARE * longest,
             "share": REACH_SHARE} if promising else None
    final: list[Measurement] = []
    chosen: Measurement | None = None
    evaluation: dict[str, Any] | None = None
    device: dict[str, Any] | None = None  # the first child's backend and device kind
    with tempfile.TemporaryDirectory(prefix="rnnjax-tune-") as tmp:
        t = Tuning(config, base_flags, child, os.path.join(tmp, "baseline.npz"), call_s, log,
                   clock, tolerance(config))
        try:
            run = {"start": start, "steps": config.steps, "share": share,
                   "budget_s": budget_s} if pay_back else None
            first = first_child(functools.partial(
                child, config, base_flags, candidates, first_deadline, None, t.reference,
                call_s, log, pay_back=run, alone=alone, reach=reach), first_deadline,
                t.reference, clock, log)
            t.first(first)
            device = first.device
            base_m = timed_baseline(first)
            if run and base_m is not None:
                budget_s = paying_back(config, budget_s, base_m.step_s, log)
            deadline = start + budget_s
            # The budget's last parts: the rounds in turns, then the evaluation's, kept only
            # where it can be timed: where no candidate the first child timed has two ways
            # to evaluate (every one XLA's at unroll 1, say), nor will a later child's, nor
            # the choice (evaluation_choice).
            timed = [m for m in first.measurements if m.step_s is not None]
            evaluates = any(len(evaluation_ways(m.candidate, timed, config, pinned,
                                                (device or {}).get("backend", ""))) > 1
                            for m in timed)
            evaluation_s = EVAL_SHARE * budget_s if evaluates else 0.0
            turns_from = deadline - evaluation_s - TURNS_SHARE * budget_s
            others = other_settings(first, config, pinned, env_flags)
            t.again_in_second_process(first, budget_s, turns_from, bool(others))
            t.under_other_flags(others, deadline, turns_from)
            final = in_turns(t.children, base, base_flags, t.tol, deadline - evaluation_s,
                             clock, log)
            chosen = select(pooled(final or t.measured), base, base_flags, t.tol)
            if chosen is not None and evaluates:
                evaluation = evaluation_choice(chosen, t.children, deadline, t.tol, config,
                                               pinned, log, clock)
        finally:
            for c in t.children:
                c.close()
    evaluated = {name: (evaluation or {}).get(name, getattr(config, name))
                 for name in EVALUATION}
    choice = None if chosen is None else settings(apply(
        config, {**chosen.fields, **evaluated}, pinned))
    result = Result(key(config, pinned, spec=spec), choice,
                    {**base, **process_fields(base_flags)}, t.measured, device, clock() - start,
                    budget_s, t.complete, final, evaluation)
    if result.means:
        log("  their means over the processes that timed them:")
    for m in result.means:
        log(f"{format_row(m)} ({m.note})")
    return result


def other_settings(first: Child, config: Config, pinned: frozenset[str], env_flags: str
                   ) -> list[str]:
    """The process settings after the run's own (:func:`flag_candidates`) to time in children
    of their own on ``first``'s backend: not an XLA flag set alone that ``first`` timed in
    its own process (:func:`flag_set_candidates`)."""
    if first.device is None:
        return []
    here = {m.candidate["xla_flags"] for m in first.measurements
            if "xla_flags" in m.candidate and m.step_s is not None}
    return [flags for flags in flag_candidates(first.device["backend"], pinned, config,
                                               env_flags)[1:]
            if not (process_fields(flags)["xla_flags"] in here
                    and _flags_only(flags, config, pinned))]


def under(candidate: dict[str, Any], flags: str) -> dict[str, Any]:
    """``candidate`` as a child under the process settings ``flags`` times it: without the
    in-process XLA flags (:func:`flag_set_candidates`) that set a flag ``flags`` sets too.
    One compilation's option wins over the process's flag, so the child would time the
    candidate's own set again under both names (a GPU's ``=`` in-process under the
    ``+WHILE`` of its own child)."""
    own = candidate.get("xla_flags")
    if not own:
        return candidate
    names = flag_names(process_fields(flags)["xla_flags"])
    kept = " ".join(flag for flag in own.split() if not flag_names(flag) & names)
    rest = {name: value for name, value in candidate.items() if name != "xla_flags"}
    return {**rest, "xla_flags": kept} if kept else rest


def paying_back(config: Config, budget_s: float, step_s: float,
                log: Callable[[str], None]) -> float:
    """The budget of a run of ``config.steps`` steps of ``step_s`` seconds at the defaults
    (:func:`run_budget` of ``budget_s``), logged where it differs."""
    run_s = config.steps * step_s
    given, budget_s = budget_s, run_budget(run_s, budget_s)
    if budget_s != given:
        from rnnjax.metrics import steps_phrase

        why = ("what it can pay back; rnnjax tune times the rest"
               if budget_s < given else "a tenth of a long run")
        log(f"  the run's {steps_phrase(config.steps)} take ~{run_s:.0f} s at "
            f"the defaults: tuning for {budget_s:.0f} s, not {given:g} s ({why})")
    return budget_s


@dataclass
class Tuning:
    """One :func:`tune` session after its first child: how it starts a child (``child``,
    :func:`run_child`'s signature, with the baseline's results at ``reference``), the
    children it started and what they measured, and whether every candidate was timed."""

    config: Config
    base_flags: str  # the run's own process settings (:func:`process_flags`)
    child: RunChild
    reference: str
    call_s: float
    log: Callable[[str], None]
    clock: Callable[[], float]
    tol: float
    children: list[Child] = field(default_factory=list)
    measured: list[Measurement] = field(default_factory=list)
    complete: bool = True
    steps: int | None = None  # per timed call, as the first child timed them
    startup: float = 0.0  # the first child's start-up

    def first(self, first: Child) -> None:
        """Take in the first child (:func:`first_child`)."""
        self.children.append(first)
        self.measured += first.measurements
        self.steps = next((m.steps for m in first.measurements if m.steps), None)
        self.startup = first.startup_s or 0.0
        self.complete = first.error == "" and all(
            m.step_s is not None or m.note.startswith("failed") for m in first.measurements)

    def start(self, flags: str, candidates: list[dict[str, Any]], until: float,
              **options: Any) -> Child:
        """A child timing ``candidates`` under ``flags`` until ``until``, kept for the turns
        and closed at the end."""
        other = self.child(self.config, flags, candidates, until, self.steps, self.reference,
                           self.call_s, self.log, **options)
        elsewhere = off_device(other, self.children[0] if self.children else None)
        if elsewhere:  # its timings and first steps are another device's: none of them count
            other.close()
            self.log(f"  {elsewhere}: its timings are dropped")
            other.measurements = [dataclasses.replace(m, step_s=None,
                                                      note=f"failed: {elsewhere}")
                                  for m in other.measurements]
            self.complete = False
            return other
        self.children.append(other)
        return other

    def again_in_second_process(self, first: Child, budget_s: float, turns_from: float,
                                flags_follow: bool) -> None:
        """The first child's close finalists (:func:`finalists`), timed again in a second
        process within :data:`SECOND_SHARE` of ``budget_s``, in time that leaves the first
        set of other flags (where ``flags_follow``) a child timing the fastest before
        ``turns_from`` (a short run's budget fits one of the two: other flags may be worth
        far more)."""
        close = finalists(first.measurements, self.tol, SECOND_NEAR, SECOND_MOST)
        if len(close) < 2:
            return
        if (first.device or {}).get("backend") == "tpu":  # the first child holds the TPU
            self.log("  not timed again in a second process (a TPU is held by one process "
                     "at a time: the first child's)")
            return
        now = self.clock()
        load = CACHED_LOAD if cache_dir(self.config.compile_cache) else 1.0
        flags_need = self.startup + _timing_s(close[0], self.steps) if flags_follow else 0.0
        until = min(now + SECOND_SHARE * budget_s, turns_from - flags_need)
        need, fit = self.startup, []
        for m in close:
            need += _timing_s(m, self.steps, load)
            if now + need > until:
                break
            fit.append(m.candidate)
        if len(fit) < 2:
            self.log(f"  not timed again in a second process (budget spent: it would "
                     f"need ~{need:.0f} s)")
            self.complete = False
            return
        self.log(f"  again in a second process, the {len(fit)} within {SECOND_NEAR:.0%} of "
                 "the fastest:")
        second = self.start(self.base_flags, fit, until, compiled=True)
        second.measurements = [  # told apart in the table
            m if m.note else dataclasses.replace(m, note="second process")
            for m in second.measurements]
        self.measured += in_terms_of(first.measurements, second.measurements)
        self.complete = self.complete and second.error == "" and len(fit) == len(close)

    def under_other_flags(self, others: Sequence[str], deadline: float,
                          turns_from: float) -> None:
        """The best two candidates so far under the run's own flags (by their means), each
        under ``others``, the process settings after the run's own
        (:func:`flag_candidates`), a child each, while the budget lasts: their compile and
        timed calls after a child's start. The XLA flag sets share what is left before
        ``turns_from`` (the last :data:`TURNS_SHARE`, for :func:`in_turns`); huge pages get
        what they leave, for the fastest so far in each of :data:`HUGE_PAGES_PROCESSES`
        children."""
        timed = sorted((m for m in pooled(self.measured) if m.flags == self.base_flags
                        and _matches(m, self.tol)), key=lambda m: m.step_s)
        if others and not timed:  # not the budget: nothing to time under them
            for flags in others:
                self.log(f"  {describe(process_fields(flags))}: not timed (no candidate was "
                         "timed under the run's own settings)")
            self.complete = False
            return
        needs: list[float] = []  # needs[j]: a child timing the best j + 1 of them
        for m in timed[:2]:
            needs.append((needs[-1] if needs else self.startup) + _timing_s(m, self.steps))
        for i, flags in enumerate(others):
            sharing = sum(f != HUGE_PAGES for f in others[i:]) or 1
            copies, picks, costs = 1, timed[:2], needs
            if len(picks) == 2 and under(picks[0].candidate, flags) == under(
                    picks[1].candidate, flags):  # the same program under these flags
                picks, costs = picks[:1], needs[:1]
            if flags == HUGE_PAGES and timed:
                fastest = min((m for m in pooled(self.measured) if _matches(m, self.tol)),
                              key=lambda m: m.step_s)
                flags = process_flags(**{**process_fields(fastest.flags), "huge_pages": True})
                copies, picks = HUGE_PAGES_PROCESSES, [fastest]
                costs = [HUGE_PAGES_PROCESSES * (self.startup + _timing_s(fastest, self.steps))]
            now = self.clock()
            # An equal share of what is left, or more where the first candidate needs it
            # (the sets come most promising first); the first set may take the turns'
            # part too where only that fits it: a set of flags may be worth far more
            # than the rounds (rows, batch 1024: the SimpleRNN's first runs, 10 s, left
            # 2.7 s before the turns where the first flags needed 3 s and ran 1.7x
            # faster; 2-core AVX-512 EPYC, 2026-12-02).
            until = deadline if i == 0 else turns_from
            share = now + max((turns_from - now) / sharing,
                              min(until - now, costs[0] if costs else 0.0))
            fit = [under(m.candidate, flags) for m, need in zip(picks, costs, strict=True)
                   if now + need <= share]
            if not fit:
                what = "a child" if copies == 1 else f"{copies} children"
                note = (f"budget spent ({what} would need "
                        f"~{costs[0] if costs else self.startup:.0f} s)")
                self.measured += [Measurement(under(m.candidate, flags), flags, note=note)
                                  for m in picks]
                self.log(f"  {describe(process_fields(flags))}: not timed ({note})")
                self.complete = False
                continue
            if len(fit) < len(costs):
                self.measured.append(Measurement(under(picks[1].candidate, flags), flags,
                                                 note="budget spent"))
                self.complete = False
            for j in range(copies):
                end = now + (j + 1) * (share - now) / copies
                if j and self.clock() + self.startup > end:  # the one before overran
                    self.log(f"  {describe(process_fields(flags))}: process {j + 1} of "
                             f"{copies} not started (budget spent)")
                    self.complete = False
                    break
                other = self.start(flags, fit, end)
                self.measured += other.measurements
                self.complete = self.complete and other.error == "" and all(
                    m.step_s is not None for m in other.measurements)


def first_child(start: Callable[..., Child], deadline: float, reference: str,
                clock: Callable[[], float], log: Callable[[str], None]) -> Child:
    """The first child, ``start()``. A candidate that kills its process (a kernel's compiler
    or its device failing below Python) takes only itself: where one killed the child after
    it timed the baseline (:func:`lost`), and another baseline fits before the child's own
    deadline (``deadline``, as the child moved it), ``start(exclude=[that one])`` times the
    others in a new child, the baseline again first (``reference`` rewritten, programs from
    the compilation cache), and that one is noted failed. Where the new child times no
    baseline, the first child's timings stand, and its reference."""
    first = start()
    crashed = lost(first)
    own = first.deadline or deadline  # as the child moved it (pay_back)
    if crashed is None or clock() + (first.startup_s or 0.0) + _timing_s(
            first.measurements[0], None) >= own:  # no new child's baseline fits
        return first
    log(f"  the child died timing {describe(crashed)} ({first.error}): the others again in a "
        "new child, without it")
    first.close()
    # The new child's baseline becomes the reference, its budget from it; the first child's
    # is kept aside for where the new child times none (every later child compares with it).
    kept = reference + ".first"
    if os.path.exists(reference):
        os.replace(reference, kept)
    again = start(exclude=[crashed])
    baseline = timed_baseline(again)
    if baseline is None:
        log(f"  the new child timed no baseline ({again.error or 'no time'}): the first "
            "child's timings stand")
        again.close()
        if os.path.exists(kept):
            os.replace(kept, reference)  # not the new child's first candidate's
        return first
    again.measurements.append(Measurement(  # "failed": not timed again
        crashed, baseline.flags, note=f"failed: it killed its child ({first.error})"[:300]))
    return again


EVALUATION = ("eval_unroll", "eval_native")  # the Config fields of the evaluations' program


def evaluation_ways(candidate: dict[str, Any], timed: Sequence[Measurement], config: Config,
                    pinned: frozenset[str], backend: str) -> list[int | str]:
    """The ways the evaluations of ``candidate`` (a train step timed on ``backend``) may
    run, the first the default: "native" where it is native on a CPU
    (``rnnjax.model.evaluation_model``) and ``eval_native`` is not pinned off, then XLA's
    form at the train step's unroll, at 1, and fully unrolled where ``timed`` holds a train
    step so (a forward pass compiles faster); only the pinned ways where ``eval_native`` or
    ``eval_unroll`` is given."""
    unroll = candidate["unroll"]
    native = candidate["backward"] == "native" and backend == "cpu"
    if native and "eval_native" in pinned and config.eval_native:
        return ["native"]
    if "eval_unroll" in pinned:
        xla = [unroll if config.eval_unroll < 0 else config.eval_unroll]
    else:
        xla = [unroll, *(u for u in (1, 0) if u != unroll and (u == 1 or any(
            m.candidate["unroll"] == u for m in timed)))]
    if not native or "eval_native" in pinned:
        return xla
    return ["native", *xla]


def evaluation_choice(chosen: Measurement, children: Sequence[Child], until: float,
                      tol: float, config: Config, pinned: frozenset[str],
                      log: Callable[[str], None], clock: Callable[[], float] = time.time
                      ) -> dict[str, Any] | None:
    """How the evaluations of the ``chosen`` candidate run: each of its
    :func:`evaluation_ways` timed by a child that timed it (the first with two ways or
    more), until ``until`` by ``clock``. Returns the
    timing with the :data:`EVALUATION` fields (``rnnjax.measure.evaluation_fields``) of the
    fastest, where it is :data:`MARGIN` faster than the first way, the default, and its sums
    the same, bit for bit, or, native against XLA's form (which round differently), within
    ``tol``; else the first's. None where no child could time it, or ``until`` had come
    before the child was asked (its compiles would overrun the budget)."""
    for child in children:
        timed = [m for m in child.measurements if m.step_s is not None]
        if child.evaluate is None or not any(
                m.candidate == chosen.candidate and m.flags == chosen.flags for m in timed):
            continue
        ways = evaluation_ways(chosen.candidate, timed, config, pinned,
                               (child.device or {}).get("backend", ""))
        if len(ways) < 2:  # another child may have timed more unrolls
            continue
        if clock() >= until:  # a request now would compile past the budget
            log("  the evaluation: not timed (budget spent)")
            return None
        report = child.evaluate(chosen.candidate, ways, until)
        if report is None or "seconds" not in report:
            log(f"  the evaluation: not timed ({(report or {}).get('failed', 'budget spent')})")
            return None
        seconds = {_way(w): s for w, s in report["seconds"].items()}
        differ = {_way(w): d for w, d in report["differ"].items()}
        default = ways[0]
        fastest = min(seconds, key=seconds.get)
        kind = (fastest == "native") != (default == "native")
        same = differ[fastest] == 0 or (kind and differ[fastest] <= tol)
        faster = seconds[fastest] * (1 + MARGIN) <= seconds[default]
        way = fastest if faster and same else default
        fields = evaluation_fields(way)
        if way == chosen.candidate["unroll"]:  # XLA's form at the train step's unroll
            fields["eval_unroll"] = -1
        if chosen.candidate["backward"] != "native":
            fields["eval_native"] = config.eval_native  # no native form to run
        times = ", ".join(f"{_way_name(w)}: {s * 1e3:.1f} ms" for w, s in seconds.items())
        sums = "; ".join(f"{_way_name(w)}'s sums differ by {d:.1e}"
                         for w, d in differ.items() if d) or "the same sums"
        log(f"  the evaluation, one chunk: {times} ({sums}); {describe(fields)}")
        return {"seconds": seconds, "differ": differ, **fields}
    return None


def _way(way: str) -> int | str:
    """An evaluation way as a report names it (JSON's keys are strings): an unroll, or
    "native"."""
    return way if way == "native" else int(way)


def _way_name(way: int | str) -> str:
    return "native" if way == "native" else f"unroll {way}"


def _timing_s(m: Measurement, steps: int | None, load: float = 1.0) -> float:
    """Seconds a child needs to time ``m`` again: its compile (``load`` of it where the
    compilation cache holds the program) and its timed calls (``run_child``'s 3 repeats,
    each after a 1-step call, of ``steps`` steps)."""
    return (m.compile_s or 0.0) * load + 2 * 3 * m.step_s * (steps or 1)


def run_budget(run_s: float, budget_s: float = DEFAULT_BUDGET_S) -> float:
    """``rnnjax train``'s default budget for a run that trains for ``run_s`` seconds at the
    defaults: ``budget_s``, or :data:`LONG_RUN_SHARE` of a long run (at most
    :data:`TUNE_COMMAND_BUDGET_S`); never more than :data:`PAY_BACK_SHARE` of the run (what
    tuning can pay back), nor less than :data:`PAY_BACK_FLOOR_S`."""
    grown = max(budget_s, min(LONG_RUN_SHARE * run_s, TUNE_COMMAND_BUDGET_S))
    return max(PAY_BACK_FLOOR_S, min(grown, PAY_BACK_SHARE * run_s))


def pay_back_deadline(start: float, budget_s: float, run_steps: int, step_s: float,
                      share: float = 1.0) -> float:
    """The end of :func:`run_budget` from ``start``, for a run of ``run_steps`` steps of
    ``step_s`` seconds at the defaults and the default ``budget_s``; with ``share``, the end
    of that budget's first part (the first child's: :data:`FIRST_SHARE` where other XLA
    flags follow, so that a budget cut short still leaves them their part, else
    :data:`ALONE_SHARE`)."""
    return start + share * run_budget(run_steps * step_s, budget_s)


def finalists(measurements: Sequence[Measurement], tol: float, near: float = SECOND_NEAR,
              most: int = SECOND_MOST) -> list[Measurement]:
    """The matching timed candidates within ``near`` of the fastest, fastest first, at most
    ``most``: those one process's timings cannot rank (the fastest alone where no other is
    that close)."""
    timed = sorted((m for m in measurements if _matches(m, tol)), key=lambda m: m.step_s)
    return [m for m in timed if m.step_s <= timed[0].step_s * (1 + near)][:most]


def _fields_key(m: Measurement) -> str:
    """The tuned fields ``m`` stands for (:attr:`Measurement.fields`) as a key: one per
    candidate and XLA flags, whichever process timed it."""
    return json.dumps(m.fields, sort_keys=True)


def pooled(measurements: Sequence[Measurement]) -> list[Measurement]:
    """One measurement per candidate and XLA flags, in order of first appearance: where more
    than one process timed it, its mean seconds per step over them (the largest difference
    from the baseline's results; note ``mean of N processes``), else as it stands (those
    not timed only where nothing timed them)."""
    groups: dict[str, list[Measurement]] = {}
    for m in measurements:
        groups.setdefault(_fields_key(m), []).append(m)
    out = []
    for group in groups.values():
        timed = [m for m in group if m.step_s is not None]
        if len(timed) < 2:
            out.append(timed[0] if timed else group[0])
            continue
        differences = [m.difference for m in timed if m.difference is not None]
        out.append(dataclasses.replace(
            timed[0], step_s=sum(m.step_s for m in timed) / len(timed),
            difference=max(differences) if differences else None,
            note=f"mean of {len(timed)} processes"))
    return out


def in_terms_of(reference: Sequence[Measurement], others: Sequence[Measurement]
                ) -> list[Measurement]:
    """``others`` (one process's timings) in ``reference``'s terms (another process's, under
    the same process settings): each timing multiplied by the geometric mean of
    ``reference``'s over ``others``' for the candidates both timed (the same
    :attr:`Measurement.fields`), and its note saying so; as they stand where they timed none
    in common.

    A process can run every program slower than another (the machine's load, minutes
    apart): so only how the candidates compare within each process is carried over, and a
    candidate timed in both processes is never compared, by its mean, with one timed only
    in the faster (:func:`pooled`).
    """
    def timed(ms: Sequence[Measurement]) -> dict[str, float]:
        return {_fields_key(m): m.step_s for m in ms
                if m.step_s is not None and m.step_s > 0}

    ours, theirs = timed(reference), timed(others)
    logs = [math.log(ours[key] / step_s) for key, step_s in theirs.items() if key in ours]
    if not logs:
        return list(others)
    scale = math.exp(sum(logs) / len(logs))
    note = f"x{scale:.3g} to the first process's terms"
    return [m if m.step_s is None else dataclasses.replace(
        m, step_s=m.step_s * scale, note=f"{m.note}, {note}" if m.note else note)
        for m in others]


def _matches(m: Measurement, tol: float) -> bool:
    """Timed, with results that match the baseline's."""
    return m.step_s is not None and m.difference is not None and m.difference <= tol


def in_turns(children: Sequence[Child], base: dict[str, Any], base_flags: str, tol: float,
             deadline: float, clock: Callable[[], float], log: Callable[[str], None],
             rounds: int = TURN_ROUNDS) -> list[Measurement]:
    """The baseline, each child's fastest matching candidate, and each candidate timed in
    more than one child (the second process's finalists), timed again in turns: rounds of
    one call each (as long as the rounds' time allows), across the children, while the
    budget lasts; their measurements (one per
    child that timed it) with the best of those calls, for :func:`pooled`. Children are
    separate processes started minutes apart, so their own timings can differ by the
    machine's drift alone; these are comparable. Empty when there are fewer than two, when
    a child among them cannot time again (one stopped at its deadline, or gone: timings
    in turns without its candidates would leave them out of the choice, which is then
    made from the children's own timings), or when not one round fits in the budget."""
    def matching(c: Child) -> list[Measurement]:
        return sorted((m for m in c.measurements if _matches(m, tol)), key=lambda m: m.step_s)

    def again(m: Measurement, c: Child) -> bool:  # timed by another child too
        return any(o.fields == m.fields for other in children if other is not c
                   for o in matching(other))

    entries: list[tuple[Child, Measurement]] = []
    for c in children:
        timed = matching(c)
        picks = timed[:1] + [m for m in timed[1:] if again(m, c)
                             or (m.candidate == base and m.flags == base_flags)]
        entries += [(c, m) for m in picks]
    if len(entries) < 2 or any(c.retime is None for c, _ in entries):
        return []
    # Each call as long as the rounds' time allows, and at least as long as it was timed
    # (the child caps it at the run's steps per call): a call of a few milliseconds is
    # mostly its own cost and the machine's noise. The seed's, at its 10 s budget, had
    # been timed in calls of 12-30 steps (6-20 ms), using a fifth of the rounds' time
    # (2-core AVX-512 EPYC, 2026-12-02; docs/performance.md has what it measured).
    call_s = max(0.0, deadline - clock()) / (2 * rounds * len(entries))
    counts = [max(m.steps or 1, int(call_s / max(m.step_s, 1e-9))) for _, m in entries]
    best: list[float | None] = [None] * len(entries)
    for _ in range(rounds):
        # A round: one call of each.
        round_s = 2 * sum(m.step_s * n for (_, m), n in zip(entries, counts, strict=True))
        if clock() + round_s > deadline:
            break
        for i, (c, m) in enumerate(entries):
            step_s = c.retime(m.candidate, deadline, counts[i])
            if step_s is None:
                return []  # a child is gone: no comparison in turns
            best[i] = step_s if best[i] is None else min(best[i], step_s)
    if best[0] is None:
        return []
    final = [dataclasses.replace(m, step_s=b, note="timed in turns")
             for (_, m), b in zip(entries, best, strict=True)]
    # Each later child's turns in the first child's terms, where they timed the same
    # candidates (the second process): only the order within each process carries over.
    ours, later = [], {}  # the first child's turns; each later child's entries' indices
    for i, (c, _) in enumerate(entries):
        if c is children[0]:
            ours.append(final[i])
        else:
            later.setdefault(id(c), []).append(i)
    for at in later.values():
        for i, m in zip(at, in_terms_of(ours, [final[i] for i in at]), strict=True):
            final[i] = m
    log("  timed again in turns, across the children:")
    for m in final:
        log(format_row(m))
    return final


def format_table(result: Result) -> str:
    """The timing table and the choice, as ``rnnjax tune`` prints them (the backward
    'native' with its vectors' floats, ``native 8`` or ``native 16``)."""
    rows = [*result.measurements, *result.final, *result.means]
    lines = [f"{'unroll':>6}  {'backward':<12}  {'projection':<10}  {'weight-grad':<11}  "
             f"{'chunks':>6}  {'feed':<6}  {'ms/step':>9}  {'compile s':>9}  {'differs':>7}  "
             "xla-flags, huge pages, cpus / note"]
    for m in rows:
        f = m.fields
        ms = "-" if m.step_s is None else f"{m.step_s * 1e3:.3f}"
        comp = "-" if m.compile_s is None else f"{m.compile_s:.1f}"
        diff = "-" if m.difference is None else f"{m.difference:.0e}"
        note = " ".join(x for x in (repr(f["xla_flags"]) if f["xla_flags"] else "(none)",
                                    "huge pages" if f["huge_pages"] else "",
                                    f"cpus {f['cpus']}" if f["cpus"] else "",
                                    "" if m.step_s is not None and not m.note else m.note)
                        if x)
        backward = f["backward"]
        if backward == "native":  # and its vectors' floats (native_lanes)
            backward = f"native {f['native_lanes']}"
        lines.append(f"{f['unroll']:>6}  {backward:<12}  {f['projection']:<10}  "
                     f"{f['weight_grad']:<11}  {f['chunks']:>6}  {f['feed']:<6}  {ms:>9}  "
                     f"{comp:>9}  {diff:>7}  {note}")
    return "\n".join(lines) + "\n"


def choice_line(result: Result) -> str:
    if result.choice is None:
        failed = next((m.note for m in result.measurements
                       if m.note.startswith("child exited")), None)
        if failed is not None:  # not the budget's doing: a larger one would not help
            return (f"the defaults were not timed: their child failed ({failed}); the "
                    "defaults stay")
        # The seconds spent: a run's first child may take longer than the budget before it
        # has timed the defaults (the first part of the longest run's budget: tune).
        return (f"the defaults were not timed in {result.seconds:.1f} s of tuning "
                f"(--tune-budget {result.budget_s:g} s), so nothing "
                "compares with them; the defaults stay (give a larger --tune-budget)")
    timed = {_fields_key(m): m.step_s  # what select chose from
             for m in pooled(result.final or result.measurements) if m.step_s is not None}
    base = timed.get(json.dumps(result.baseline, sort_keys=True))
    step = {k: v for k, v in result.choice.items() if k not in EVALUATION}  # the train step's
    best = timed.get(json.dumps(step, sort_keys=True))
    speedup = f" ({base / best:.2f}x the defaults)" if base and best else ""
    return f"chose {describe(result.choice)}{speedup} in {result.seconds:.1f} s"


def resolve(
    config: Config, pinned: frozenset[str], budget_s: float | None = None, *,
    err: TextIO | None = None, before_tuning: Callable[[], None] = lambda: None,
    child: RunChild | None = None, spec: DataSpec = IDX_SPEC,
) -> tuple[Config, dict[str, Any]]:
    """For ``rnnjax train``: ``config`` with the cached choice, or one measured now within
    ``budget_s`` (progress on ``err``; None: :data:`DEFAULT_BUDGET_S`, capped by what the
    run can pay back, :func:`tune`'s ``pay_back``; a number given is spent as given), and
    the record for summary.json; for images of ``spec``'s shape (the run's dataset's).

    ``before_tuning`` runs before any time is spent measuring (the CLI checks the run's
    workdir and data there, so a bad run fails at once).
    """
    if set(TUNED) <= pinned:
        return config, {"mode": "pinned"}
    pay_back = budget_s is None
    budget_s = DEFAULT_BUDGET_S if budget_s is None else budget_s
    directory = cache_dir(config.compile_cache)
    key_ = key(config, pinned, spec=spec)

    def log(line: str) -> None:
        out = err or sys.stderr
        out.write(line + "\n")
        out.flush()

    def judged(record: dict[str, Any] | None) -> tuple[dict[str, Any] | None, float | None]:
        """The cached ``record`` (None: none, or stale), and the budget this run may spend
        on it where it was cut short (:func:`outgrown`)."""
        why = None if record is None else unrunnable(apply(config, record["choice"], pinned))
        if why is not None:  # stale: timed again, and saved over it
            log(f"rnnjax: the choice cached in {cache_path(directory, key_)} cannot run as "
                f"it names ({why}): tuning again")
            record = None
        return record, None if record is None else outgrown(record, config, budget_s,
                                                             pay_back)

    def use(record: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
        return apply(config, record["choice"], pinned), {
            "mode": "cached", "choice": record["choice"],
            "cache": str(cache_path(directory, key_)), "device": record.get("device"),
            "tune_s": record.get("tune_s")}

    found = load(directory, key_)
    record, more = judged(found)
    if record is not None and more is None:
        return use(record)
    child_sources(config)  # before anything is written: one no child can import
    before_tuning()
    shape = (f"{config.cell} {config.hidden_size} x{config.num_layers} {config.order} "
             f"batch {config.batch_size}")
    with shape_lock(directory, key_, lambda path: log(
            f"rnnjax: another process is tuning {shape} here (it holds {path}): waiting "
            "to read its choice (--no-tune skips tuning)")):
        # Read again: another process may have saved a choice since (the one waited for,
        # or one that finished while this one checked its data and took the free lock).
        now = load(directory, key_)
        if now != found:
            record, more = judged(now)
            if record is not None and more is None:
                log(f"rnnjax: {shape}: using the choice another process saved meanwhile")
                return use(record)
        pay_back_phrase = f", less for a short run, up to {TUNE_COMMAND_BUDGET_S:g} for a long one"
        why = ("the first run of this shape here" if record is None else
               f"again: its cached choice had {record['budget_s']:g} s, not every candidate "
               f"timed, and this run may spend ~{more:.0f} s")
        log(f"rnnjax: tuning {shape}, {why} "
            f"(--tune-budget {budget_s:g} s{pay_back_phrase if pay_back else ''}; "
            "--no-tune skips)")
        result = tune(config, pinned, budget_s, log=log, child=child, pay_back=pay_back,
                      spec=spec)
        # Saved even when the budget cut it short, so the cost is paid once per shape; the
        # line says so, and rnnjax tune (a larger budget) times the rest.
        path = None if result.choice is None else save(directory, result.record())
        saved = (f"; saved in {path}" if path else
                 f"; not saved ({unsaved(directory)}: tunes again next run)")
        if not result.complete:
            saved += ("; not every candidate was timed in the budget: rnnjax tune (with its "
                      "larger --tune-budget) times them all")
        log(f"rnnjax: {choice_line(result)}{saved if result.choice else ''}")
        if result.choice is None:
            return config, {"mode": "defaults", "reason": choice_line(result),
                            "tune_s": round(result.seconds, 2)}
        return apply(config, result.choice, pinned), {
            "mode": "measured", "choice": result.choice, "cache": str(path) if path else None,
            "device": result.device, "tune_s": round(result.seconds, 2)}


def check_device(record: dict[str, Any], err: TextIO | None = None) -> None:
    """After the backend started: drop a cached choice made on other devices."""
    from rnnjax import runtime

    recorded = record.get("device")
    if record.get("mode") != "cached" or not recorded:
        return
    now = runtime.device_info()
    differ = [k for k in ("backend", "device_kind", "device_count")
              if now.get(k) != recorded.get(k)]
    if not differ:
        return
    if record.get("cache"):
        Path(record["cache"]).unlink(missing_ok=True)
    was = ", ".join(f"{k} {recorded.get(k)}" for k in differ)
    has = ", ".join(f"{k} {now.get(k)}" for k in differ)
    (err or sys.stderr).write(f"rnnjax: the tuned choice was measured with {was}, this run "
                              f"has {has}: kept for this run, tuning again next run\n")


def settings(config: Config) -> dict[str, Any]:
    """The tuned fields of ``config``."""
    return {name: getattr(config, name) for name in TUNED}

