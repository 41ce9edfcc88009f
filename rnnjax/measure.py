"""Time train-step candidates in this process: the tuner's child, ``python -m rnnjax.measure``.

XLA reads its flags once per process, and sizes its thread pools by the CPUs the process may
use, so :mod:`rnnjax.tune` starts one child per set of process settings, with ``$XLA_FLAGS``
set (the child applies its config's ``cpus`` before the backend starts), and hands it a JSON
spec as the first line of its stdin::

    {"config": {...Config fields...}, "candidates": [{"unroll": 1, "backward": "autodiff",
     "projection": "in_loop", "weight_grad": "product", "chunks": 1, "feed": "device"}, ...],
     "deadline": unix time, "call_s": 0.1, "steps": null, "repeats": 3,
     "reference": "path/to/baseline.npz", "pay_back": null, "compiled": false,
     "data": {"image_shape": [28, 28, 1], "num_classes": 10}, "alone": null,
     "reach": null, "cells": {}, "orders": {}, "optimizers": {}, "path": [...]}

``cells`` names the cells the parent registered in ``rnnjax.cells.CELLS`` (``{name:
"MODULE:QUALNAME"}``, ``rnnjax.cells.source``), ``orders`` the sequence orders in
``rnnjax.orders.ORDERS`` and ``optimizers`` those in ``rnnjax.optim.OPTIMIZERS``
likewise; each is registered here the same way, with the
parent's ``sys.path`` (``path``) after this process's own, so that a module beside the
parent's script is found.

A candidate may carry ``xla_flags`` of its own (an XLA flag set timed in this process:
its train step is compiled under them, over the process's, ``runtime.compile_options``)
and ``on``, a backend (:data:`ON`: a child on another backend leaves it untimed).
A candidate's fields may be ``"best"``: those fields of the fastest candidate this child
has timed so far (:func:`resolve`: the unroll, for a form timed at the unroll that suits
the machine; the form's fields, for the fastest form timed at another unroll), without
timing every pair; a ``"best"`` unroll is timed at each unroll within ``UNROLL_NEAR`` of
the fastest (:func:`resolutions`).

Each candidate is the config with those fields replaced, run by the loop's own feeds
(``loop.device_feed`` or ``loop.stream_feed``) on synthetic data of the run's shapes
(``data``: the dataset's ``DataSpec``, the IDX layout when absent), from
a synthetic state (:func:`synthetic_state`: no initialisation compiled). The
child prints one line per event on stdout, ``rnnjax-tune <JSON>``: ``device`` (what it runs
on, and on how many CPUs), then per candidate ``trying`` (its fields, resolved, as it
starts: where the process dies, that one killed it; a spec's ``exclude`` lists those that
killed an earlier child, never started) and ``result`` (compile seconds, seconds per
step, best of ``repeats`` calls of ``steps`` steps, and how far its first step's loss and
gradients lie from the reference's: the first candidate's, saved to ``reference``) or
``skipped`` (why), or, before any, ``refused`` (the run's own error where the run
cannot work here, a batch that does not divide over the devices, a model that cannot fit:
:func:`too_large`; the child then exits, and the parent stops tuning with that error); then
``retimed``: rounds of one call each of the reference and the fastest few, in turns (so a
drift of the machine's load falls on all of them alike), while the budget lasts, each
keeping its best (and before ``"best"`` is resolved, a round of those near the fastest);
then ``ready``. The child then stays, to time one call of a candidate
per request line on stdin (``{"time": fields, "steps": n}``, n steps or null for as many as
it timed it in -> event ``timing``), until stdin closes:
the parent compares the children's fastest so, in turns across the processes. A request
``{"evaluate": fields, "ways": [...], "until": unix time}`` times the run's evaluation
of a candidate each of those ways instead (an unroll of XLA's form, or "native":
:func:`evaluation_timing` -> event ``evaluation``: its seconds each way and how far their
sums are from the first's, or ``failed``).
Candidates are not started past ``deadline``, nor when their predicted compile time would
pass it (unless ``compiled``: an earlier child compiled them all, and the persistent
compilation cache holds them). With ``pay_back`` (``{"start": unix time, "steps": the
run's steps, "share": this child's part, "budget_s": the default budget}``), once the
reference is timed the deadline comes forward to this child's part of the budget that
follows the run's length (``rnnjax.tune.pay_back_deadline``), reported as ``budget``. With
``alone`` (``{"others_on": backends, "deadline", "share"}``), on a backend not among
``others_on`` the deadline and that part are ``alone``'s (no other process settings follow
this child there: ``rnnjax.tune.others_on``), also reported as ``budget``. With ``reach``
(``{"candidates": [fields, ...], "deadline", "share"}``: the most promising after the
baseline, ``rnnjax.tune.reaching``, and ``rnnjax.tune.REACH_SHARE`` of the budget), those
candidates may be started, and timed, until ``reach``'s deadline (with ``pay_back``, that
share of the run's budget) where the child's own comes first: it is then reported as
``budget`` before the candidate's compile, and the candidates after them keep the child's
own deadline.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

PREFIX = "rnnjax-tune "
BEST = "best"  # rnnjax.tune.BEST
ON = "on"  # a candidate's backend, where it is for one only (rnnjax.tune.flag_set_candidates)
FINALISTS = 4  # the reference and the fastest others, timed again in turns
NEAR = 0.1  # timed again before 'best' is resolved: within this much of the fastest
# A 'best' unroll is timed at each unroll within this much of the fastest: wider than NEAR,
# as single calls here drift by up to 20% (the seed's two unrolls read 0.81 and 1.00 ms,
# then 0.81 and 0.79 in turns).
UNROLL_NEAR = 0.25


DEVICE_LOST = 3  # the child's exit status where its device failed after a candidate


class DeviceLost(Exception):
    """The accelerator failed after a candidate (:func:`lost_device`): :func:`main` exits
    :data:`DEVICE_LOST` at once, without the cleanup at exit a broken context may hang in."""


def lost_device(backend: str) -> bool:
    """Whether an accelerator ``backend`` no longer runs a trivial program (a kernel's fault
    can leave a GPU's context unusable: every later program fails); a CPU is not asked."""
    if backend == "cpu":
        return False
    import jax
    import jax.numpy as jnp

    try:
        jax.block_until_ready(jnp.arange(4.0) + 1.0)
    except Exception:
        return True
    return False


def emit(event: str, **fields: Any) -> None:
    """One event line for the parent on stdout."""
    sys.stdout.write(PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


# A step unrolled more adds compile time at this share of the rate its compiled
# instructions hold in the program (:func:`predict_compile_s`). Compiled at unroll 1, then
# fully unrolled (2-core AVX-512 EPYC, jax 0.10.2 CPU, 2026-12-02; compile seconds, and the
# instructions a step adds as a share of the program's, ``rnnjax.hlo.compiled_size``):
# 28 rows at batch 1024, the SimpleRNN 0.79 -> 1.63 s (share 0.12), the LSTM 1.03 -> 3.13
# (0.26), the GRU 0.98 -> 3.22 (0.27); at batch 50, the SimpleRNN 0.89 -> 1.24 (0.09),
# the GRU's autodiff 1.16 -> 4.11 (0.30); 784 pixels, the SimpleRNN 0.75 -> 20.0 (0.09).
# That is 0.16-0.37 of the share; unrolled by 4 (rows) or 16 (pixels), where the loop
# stays, 0.40-0.92. Predicted at 0.4, every one of these lies within 0.83-1.41x of what it
# took; at a tenth more per step, whatever the cell (the rule before), 0.81-2.97x (the
# SimpleRNN's full unroll at rows, batch 1024, predicted at 2.9 s, skipped with 3 s left).
# On a GPU a step adds far less: XLA:GPU builds a kernel once for fusions that repeat, as an
# unrolled step's do. On an NVIDIA H200 (jax 0.11.2, 2026-12-04; benchmarks/results/gpu/
# flax_rows.log), the SimpleRNN's 28 rows compiled fully unrolled in 1.42x (batch 1024) and
# 1.47x (4096) the seconds of unroll 1, at step shares of about 0.14 and 0.11: 0.11-0.16 of
# the share; at batch 50 in 0.88x. Predicted at 0.4, the first run's tuner put the full
# unroll at 4-5 s, left it untimed with 3 s left, and kept unroll 1, which ran 1.1-2.1x
# slower there. A backend not measured (a TPU) is predicted as a CPU, the more cautious.
COMPILE_GROWTH = {"cpu": 0.4, "gpu": 0.16}
UNKNOWN_SHARE = 0.25  # where the backend gives no program text: a tenth more per step


def compile_growth(backend: str) -> float:
    """:data:`COMPILE_GROWTH` on ``backend`` (a CPU's where it was not measured)."""
    return COMPILE_GROWTH.get(backend, COMPILE_GROWTH["cpu"])


def predict_compile_s(unroll: int, measured: dict[int, tuple[float, float | None]],
                      growth: float = COMPILE_GROWTH["cpu"]) -> float | None:
    """Compile seconds predicted for ``unroll`` from those measured at other unrolls
    (``{unroll: (compile seconds, step share)}``; the step share: the compiled instructions
    a step adds, as a share of the program's, :func:`step_share`, None where not known).

    Linear in the unroll factor through the two measured points farthest apart (XLA
    compiles one loop body per unrolled step); one point alone: :data:`COMPILE_GROWTH` of
    its step share more for each step unrolled beyond it (so the LSTM's or GRU's 784 pixels
    fully unrolled, a step holding about a quarter of the program, are predicted at 75-78x
    their unroll 1, minutes of compiling; the SimpleRNN's 28 rows at 2.3x). None when
    nothing is measured yet. ``growth``: the backend's (:func:`compile_growth`).
    """
    if not measured:
        return None
    points = sorted(measured.items())
    (u0, (c0, share)), (u1, (c1, _)) = points[0], points[-1]
    if u1 == u0:
        share = UNKNOWN_SHARE if share is None else share
        return c0 * (1 + growth * share * max(0, unroll - u0))
    slope = max(0.0, (c1 - c0) / (u1 - u0))
    return c0 + slope * (unroll - u0)


def loop_unroll(unroll: int, chunks: int, time_steps: int) -> tuple[int, int]:
    """``(steps a loop body over time runs, steps a part holds)`` for a config's ``unroll``
    (0: all) and ``chunks`` over ``time_steps``: the unroll, at most a part's steps (a part
    of a ``chunks`` scan is unrolled within itself, ``rnnjax.cells.scan_cell``)."""
    part = math.ceil(time_steps / chunks)
    return min(unroll or time_steps, part), part


def step_share(program: Any, unroll: int, part: int) -> float | None:
    """The compiled instructions one more step unrolled adds to ``program`` (a compiled
    ``runtime.CompileOnFirstCall``, its loops over time unrolled by ``unroll`` of a part's
    ``part`` steps: :func:`loop_unroll`; all of them, no loop over time left: 0), as a share
    of all its instructions (``rnnjax.hlo.compiled_size``); None where the backend gives no
    program text."""
    from rnnjax import hlo

    try:
        text = program.compiled.as_text()
    except Exception:  # a backend without the text of its executables
        return None
    size = hlo.compiled_size(text, 0 if unroll >= part else unroll) if text else None
    return size.per_step / size.instructions if size and size.instructions else None


def why_not(unroll: int, compiled: dict[int, tuple[float, float | None]], left: float,
            cached: bool, growth: float = COMPILE_GROWTH["cpu"]) -> str:
    """Why a candidate at ``unroll`` is not started with ``left`` seconds of the budget
    ('' where it is): none left, or its compile time predicted from those ``compiled``
    (:func:`predict_compile_s`, at the backend's ``growth``) more than that, unless
    ``cached`` (an earlier child compiled it, and it is loaded from the compilation
    cache)."""
    if left <= 0:
        return "budget spent"
    predicted = None if cached else predict_compile_s(unroll, compiled, growth)
    if predicted is not None and predicted > left:
        return f"compile predicted {predicted:.0f} s, {left:.0f} s left"
    return ""


def reach_until(fields: dict[str, Any], deadline: float, reach: dict[str, Any] | None
                ) -> float:
    """By when a candidate with ``fields`` must be timed: the child's ``deadline``, or for
    one of ``reach``'s candidates (``{"candidates", "deadline", "share"}``:
    ``rnnjax.tune.reaching``) the later of that and ``reach``'s deadline."""
    if reach is not None and fields in reach["candidates"]:
        return max(deadline, reach["deadline"])
    return deadline


def resolve(fields: dict[str, Any], timed: list[tuple[dict[str, Any], float]],
            default: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with each :data:`BEST` value replaced by that field's value in the fastest
    of the candidates ``timed`` so far (``(fields, seconds per step)`` each), or in
    ``default`` when none is timed yet."""
    fastest = min(timed, key=lambda t: t[1])[0] if timed else default
    return {name: fastest[name] if value == BEST else value for name, value in fields.items()}


def resolutions(fields: dict[str, Any], timed: list[tuple[dict[str, Any], float]],
                default: dict[str, Any], near: float = UNROLL_NEAR) -> list[dict[str, Any]]:
    """What to time for ``fields``: :func:`resolve`'s, and where the unroll is the only
    :data:`BEST` field, the same fields at each other unroll timed within ``near`` of the
    fastest too, fastest first (a near tie between unrolls does not say which suits
    another form: at the seed's shape, per-step weight gradients lost at unroll 1 and won
    fully unrolled, where both unrolls of the baseline timed alike)."""
    out = [resolve(fields, timed, default)]
    if [name for name, value in fields.items() if value == BEST] == ["unroll"] and timed:
        fastest = min(seconds for _, seconds in timed)
        for done, _ in sorted((t for t in timed if t[1] <= fastest * (1 + near)),
                              key=lambda t: t[1]):
            option = {**fields, "unroll": done["unroll"]}
            if option not in out:
                out.append(option)
    return out


def same_program(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether candidates ``a`` and ``b`` run the same program: the same fields, or, in the
    'native' form (one custom call a pass, no loop to unroll), all but the unroll, and in
    the others (which read no native kernels) all but ``native_lanes``."""
    native = [c.get("backward") == "native" for c in (a, b)]
    if any(native) and not all(native):
        return False
    ignored = "unroll" if all(native) else "native_lanes"
    return ({k: v for k, v in a.items() if k != ignored}
            == {k: v for k, v in b.items() if k != ignored})


def for_backend(candidates: Iterable[dict[str, Any]], backend: str | None
                ) -> list[dict[str, Any]]:
    """The ``candidates`` a child on ``backend`` times (None: a child that never found its
    backend), without :data:`ON`: those for another backend (an in-process flag set) left
    out."""
    return [{name: value for name, value in c.items() if name != ON}
            for c in candidates if c.get(ON, backend) == backend]


def to_fields(config: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """``config``'s values of the fields named in ``fields``."""
    return {name: getattr(config, name) for name in fields}


def relative_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest difference between two sets of arrays, each relative to the largest
    magnitude of that array in ``b`` (the reference)."""
    import numpy as np

    worst = 0.0
    for name, ref in b.items():
        ref = np.asarray(ref, np.float64)
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        diff = float(np.abs(np.asarray(a[name], np.float64) - ref).max()) if ref.size else 0.0
        if not math.isfinite(diff):  # a NaN or infinity where either has one: no match
            return math.inf
        worst = max(worst, diff / scale if scale else diff)
    return worst


def synthetic_state(model: Any, optimizer: Any) -> Any:
    """A train state of the run's shapes and dtypes, made without compiling the model's
    initialisation: its random initialisers are one program that took 1.6-2.3 s to compile
    on XLA:CPU (the seed's shape), more than half of the first candidate's time in a child.
    Floating parameters are drawn by NumPy (seed 0: the same in every child, so the first
    steps compare across processes), normal with a standard deviation of 1/sqrt(fan-in)
    for a matrix and 0.1 for a vector, others zero; the optimizer's state is its own
    ``init`` of them (one small compiled program). Timing reads no values, and every
    candidate starts from this state."""
    import jax
    import numpy as np

    from rnnjax.train import TrainState

    params = synthetic_params(model)
    return TrainState(np.zeros([], np.int32), params, jax.jit(optimizer.init)(params))


def synthetic_params(model: Any) -> Any:
    """:func:`synthetic_state`'s parameters: NumPy draws of the model's shapes, seed 0."""
    import jax
    import numpy as np

    shapes = model.param_shapes()
    rng = np.random.default_rng(0)

    def draw(leaf: Any) -> np.ndarray:
        if not np.issubdtype(leaf.dtype, np.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        std = 1 / math.sqrt(max(1, leaf.shape[0])) if len(leaf.shape) >= 2 else 0.1
        return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree.map(draw, shapes)


def synthetic_data(config: Any, examples: int, spec: Any = None) -> Any:
    """Random uint8 images and labels of the run's shapes (timing does not read them):
    ``spec``'s images (``rnnjax.data.spec.DataSpec``; None: the IDX layout's 28x28) and
    classes (``config.num_classes``, or the dataset's where that is 0)."""
    import numpy as np

    from rnnjax.data.idx import Arrays
    from rnnjax.data.spec import IDX_SPEC

    spec = IDX_SPEC if spec is None else spec
    rng = np.random.default_rng(0)
    h, w, c = spec.image_shape
    images = rng.integers(0, 256, (examples, h, w) + ((c,) if c > 1 else ()), dtype=np.uint8)
    classes = config.num_classes or spec.num_classes
    labels = rng.integers(0, classes, examples).astype(np.int32)
    return Arrays(images, labels, images[: config.batch_size], labels[: config.batch_size])


def first_step(state: Any, sums: Any, initial_params: Any) -> dict[str, Any]:
    """What a candidate's first train step computed, to compare with the reference's: the
    loss, and the optimizer state (Adam's moments are the gradient and its square, scaled),
    or, where the optimizer keeps no floating-point state (SGD), the step's update of the
    parameters from ``initial_params`` (the learning rate times the gradient, in float64:
    the parameters themselves would hide a gradient's error behind the learning rate, a
    half-wrong gradient at SGD's 1e-3 within the tolerance). An optimizer's random key
    (``noisy_sgd``'s) is no float, and not converted: NumPy takes no typed key."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def floats(tree: Any) -> list[np.ndarray]:
        return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)
                if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]

    leaves = floats(state.opt_state) or [
        after.astype(np.float64) - before.astype(np.float64)
        for after, before in zip(floats(state.params), floats(initial_params), strict=True)]
    return {"loss": np.asarray(sums["loss_sum"]), **{f"s{i}": a for i, a in enumerate(leaves)}}


# The share of a call's seconds within which two timings of it are not told apart.
NOISE = 0.1


def call_overhead(one: float, seconds: float, steps: int) -> float:
    """A compiled call's own seconds, beside its steps, from a 1-step call's seconds
    (``one``) and a ``steps``-step call's (``seconds``), each read the same way (the tuner
    passes the best of its rounds, ``benchmarks.flax_peers`` the medians): ``one`` less the
    marginal step ``(seconds - one) / (steps - 1)``, where the ``steps``-step call is at
    least :data:`NOISE` of it longer than the 1-step call; closer than that, less the
    largest marginal step the machine's noise could hide there (``NOISE * seconds /
    (steps - 1)``), so that the cost read moves with the timings, with no step where it
    drops to 0 — and no more than the ``steps``-step call leaves beside that many such
    steps (a 1-step call slower than the ``steps``-step one, noise, had been read as a cost
    above the whole longer call, and its steps as nearly free). At least 0, at most
    ``one``; 0 for fewer than 2 steps. The call's own cost may exceed its steps' (a call of
    few steps on a small batch): it is read the same."""
    if steps < 2 or not math.isfinite(one):
        return 0.0
    marginal = max(seconds - one, NOISE * seconds) / (steps - 1)
    return min(one, max(0.0, min(one - marginal, seconds - steps * marginal)))


def run_step(seconds: float, steps: int, overhead: float, steps_per_call: int) -> float:
    """Seconds per step of a run of ``steps_per_call``-step calls, from one call of
    ``steps`` steps that took ``seconds`` and a call's own ``overhead`` seconds
    (:func:`call_overhead`): the overhead comes off the timed call and is spread over the
    run's calls."""
    return max(0.0, seconds - overhead) / steps + overhead / steps_per_call


CACHE_HITS = [0]  # programs this process loaded from JAX's persistent compilation cache
# Seconds the programs loaded from it took to compile when they were cached: the seconds
# JAX reports saved plus those it spent reading them (JAX stores whole seconds).
CACHED_COMPILE_S = [0.0]
_CACHED_COMPILE_EVENTS = ("/jax/compilation_cache/compile_time_saved_sec",
                          "/jax/compilation_cache/cache_retrieval_time_sec")


def _count_cache_hits(event: str, **kwargs: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        CACHE_HITS[0] += 1


def _add_cached_compile_s(event: str, seconds: float, **kwargs: Any) -> None:
    if event in _CACHED_COMPILE_EVENTS:
        CACHED_COMPILE_S[0] += seconds


@functools.cache
def _listen_to_the_cache() -> None:
    """Count the persistent cache's hits and their compile seconds (:data:`CACHE_HITS`,
    :data:`CACHED_COMPILE_S`), from the first :func:`run` of a process on. Once: JAX keeps
    every listener registered, and one registered at each run counted every event once per
    run (six runs in one process counted 122 hits and 20 s of compiles saved, where once
    each counted 32 and none; in the suite's workers, which run it dozens of times, a full
    unroll's predicted compile came to pass a 60 s deadline)."""
    import jax

    jax.monitoring.register_event_listener(_count_cache_hits)
    jax.monitoring.register_event_duration_secs_listener(_add_cached_compile_s)


class Timed:
    """One candidate compiled (under ``xla_flags`` besides the process's: an in-process flag
    candidate's) and run once: its compile seconds, its first step (:func:`first_step`, the
    first batch from :func:`synthetic_state`), and :meth:`time`."""

    def __init__(self, config: Any, data: Any, timer: Callable[[], float],
                 spec: Any = None, xla_flags: str = "") -> None:
        import jax
        import numpy as np

        from rnnjax import loop, parallel
        from rnnjax.model import make_model
        from rnnjax.optim import make_optimizer

        dp = parallel.DataParallel.from_config(config)
        model = dp.model(make_model(config, spec))
        optimizer = make_optimizer(config, model.param_shapes())
        initial = synthetic_state(model, optimizer)
        params = jax.tree.map(np.array, initial.params)  # copies: the state is donated
        self.state = dp.replicate(initial)
        if config.feed == "device":
            self.run = loop.device_feed(config, model, optimizer, dp, dp.dataset(data),
                                        xla_flags)
            self.chunk = min(config.steps_per_call, config.steps)
        else:
            self.run = loop.stream_feed(config, model, optimizer, dp, data, 0, xla_flags)
            self.chunk = config.steps
        self.first, self.timer, self.block = 0, timer, jax.block_until_ready
        self.one = float("inf")  # the best 1-step call's seconds
        self.overhead = 0.0  # a call's own seconds, beside its steps (per_step)
        hits, cached_s = CACHE_HITS[0], CACHED_COMPILE_S[0]
        _, self.compile_s, sums = self.call(1)  # compiles, and warms up
        self.cache_hit = CACHE_HITS[0] > hits  # from the persistent compilation cache
        # From the cache: what its compile took when it was cached, as JAX stored it, in
        # whole seconds (0, or a JAX that does not report it: counted as 1).
        self.cached_compile_s = max(1.0, CACHED_COMPILE_S[0] - cached_s) \
            if self.cache_hit else None
        self.first_step = first_step(self.state, sums, params)
        if not any(np.any(value) for name, value in self.first_step.items() if name != "loss"):
            # Nothing moved: SGD at a learning rate of 0 (a warmup's first step), whose
            # update hides any gradient; the second step's shows it (every candidate alike).
            params = jax.tree.map(np.array, self.state.params)
            _, _, sums = self.call(1)
            self.first_step = first_step(self.state, sums, params)

    def call(self, count: int) -> tuple[float, float, Any]:
        """Run ``count`` steps in one call: ``(seconds, of them compiling, metric sums)``."""
        start = self.timer()
        self.state, sums, compile_s = self.run(self.state, self.first, count)
        self.block((self.state, sums))
        self.first += count
        return self.timer() - start - compile_s, compile_s, sums

    def steps_for(self, call_s: float) -> int:
        """Steps per call that fill about ``call_s`` seconds, at least 2 (see
        :func:`call_overhead`)."""
        self.one = min(self.one, self.call(1)[0])
        return max(2, min(self.chunk, int(call_s / max(self.one, 1e-6))))

    def per_step(self, seconds: float, steps: int) -> float:
        """Seconds per step of the run, from a call of ``steps`` steps that took ``seconds``.

        A call costs more than its steps: XLA sets up the program's buffers once per call
        (zeroing ~100 MB for the LSTM at batch 1024: 40 ms a call against 41 ms a step),
        and the run spreads that over its steps per call (``--steps-per-call``, 500 by
        default), where a timed call of 1 or 2 steps would count it whole. So the call's
        own cost (:attr:`overhead`, measured by :meth:`time`) comes off the call and is
        spread over the run's steps per call.
        """
        return run_step(seconds, steps, self.overhead, self.chunk)

    def once(self, steps: int) -> float:
        """Seconds per step of the run (:meth:`per_step`) from one call of ``steps`` steps."""
        steps = min(steps, self.chunk)
        return self.per_step(self.call(steps)[0], steps)

    def time(self, steps: int, repeats: int, deadline: float) -> float:
        """Seconds per step of the run (:meth:`per_step`): the best of ``repeats`` calls of
        ``steps`` steps, each after a 1-step call (:func:`call_overhead`), fewer once
        ``deadline`` passes; every call blocked on."""
        steps = min(steps, self.chunk)
        best = float("inf")
        for i in range(repeats):
            if i and time.time() > deadline:
                break
            if steps > 1:
                self.one = min(self.one, self.call(1)[0])
            best = min(best, self.call(steps)[0])
        self.overhead = call_overhead(self.one, best, steps)
        return self.per_step(best, steps)


def candidate_config(config: Any, fields: dict[str, Any]) -> tuple[Any, str]:
    """A candidate's config (``config`` with its fields) and its own XLA flags (an in-process
    flag set's, compiled under over the process's; its config keeps the run's own)."""
    flags = fields.get("xla_flags", "")
    return config.replace(**{k: v for k, v in fields.items() if k not in ("xla_flags", ON)}), \
        flags


def evaluation_fields(way: int | str) -> dict[str, Any]:
    """The Config fields of an evaluation ``way``: "native" (``eval_native``), or an unroll
    of XLA's form (``eval_unroll``; -1 the train step's)."""
    if way == "native":
        return {"eval_native": True, "eval_unroll": -1}
    return {"eval_native": False, "eval_unroll": int(way)}


def evaluation_timing(config: Any, xla_flags: str, spec: Any, ways: Sequence[int | str],
                      deadline: float, rounds: int = 3,
                      timer: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """An evaluation of ``config.eval_batch_size`` synthetic examples of ``spec``'s images
    (one chunk of the run's test set: its evaluations run chunk by chunk), compiled each of
    ``ways`` (:func:`evaluation_fields`; under ``xla_flags`` as well as the process's) and
    called in turns, up to ``rounds`` rounds while ``deadline`` (``time.time()``) allows,
    one at least: ``{"seconds": {way: its best call}, "differ": {way: the largest relative
    difference of its sums (the loss, the share correct) from the first way's; 0: the same
    bits}}``. The first two ways are compiled whatever the time (a choice needs two); each
    later one only where its compile, predicted from the XLA ways compiled before it
    (:func:`predict_compile_s`: a full unroll's from unroll 1's), ends before
    ``deadline``; it and the rest are left out of the report where it would not. The run's
    evaluation reads the test set as the model's sequences, made once
    (``loop.device_sequences``): so does this."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rnnjax import runtime, train
    from rnnjax.data.pipeline import normalize_host
    from rnnjax.model import evaluation_model, make_model
    from rnnjax.tune import sequence_length

    model = make_model(config, spec)
    params = synthetic_params(model)
    data = synthetic_data(config, config.eval_batch_size, spec)
    xs = jax.jit(model.sequences)(normalize_host(data.train_images))
    labels = jnp.asarray(data.train_labels)
    time_steps = sequence_length(config, spec)
    growth = compile_growth(jax.default_backend())
    programs, sums = [], []
    compiled_at: dict[int, tuple[float, float | None]] = {}  # XLA's, by steps a loop body runs
    for way in ways:
        steps = None if way == "native" else loop_unroll(int(way), 1, time_steps)[0]
        if len(programs) >= 2:
            predicted = None if steps is None else predict_compile_s(steps, compiled_at,
                                                                     growth)
            if time.time() + (predicted or 0.0) > deadline:
                ways = ways[:len(programs)]
                break
        evaluate = jax.jit(functools.partial(  # the model as the run's evaluations take it
            train.evaluate_sequences,
            model=evaluation_model(config.replace(**evaluation_fields(way)), model),
            chunk=config.eval_batch_size))
        compiled, seconds = runtime.compile_timed(evaluate, params, xs, labels,
                                                  xla_flags=xla_flags)
        if steps is not None:
            compiled_at[steps] = (seconds, None)
        sums.append(jax.device_get(compiled(params, xs, labels)))  # and warmed up
        programs.append(compiled)

    def differ(other: dict[str, Any]) -> float:
        first = sums[0]
        if all(np.array_equal(np.asarray(first[k]), np.asarray(other[k])) for k in first):
            return 0.0
        count = max(int(first["count"]), 1)
        loss = abs(float(other["loss_sum"]) - float(first["loss_sum"])) / max(
            abs(float(first["loss_sum"])), 1e-30)
        return max(loss, abs(int(other["correct"]) - int(first["correct"])) / count)

    best = [math.inf] * len(programs)
    for i in range(rounds):
        if i and time.time() > deadline:
            break
        for j, compiled in enumerate(programs):
            start = timer()
            jax.block_until_ready(compiled(params, xs, labels))
            best[j] = min(best[j], timer() - start)
    return {"seconds": {str(w): s for w, s in zip(ways, best, strict=True)},
            "differ": {str(w): differ(other) for w, other in zip(ways, sums, strict=True)}}


def too_large(config: Any, images: Any, data: Any) -> str | None:
    """Why the run's checks refuse ``config`` here (its mesh: ``DataParallel.from_config``;
    ``rnnjax.loop.check_memory``, on this child's ``data``, for its ``images``: a model,
    batch or dataset that cannot fit): the run's own message, or None. Checked once, before
    any candidate draws its parameters: a model that cannot fit could take minutes and the
    host's RAM to draw them, where the run then refuses it."""
    from rnnjax import loop, memory, parallel
    from rnnjax.config import ConfigError
    from rnnjax.model import make_model
    from rnnjax.optim import make_optimizer

    try:
        model = make_model(config, images)
        loop.check_memory(config, memory.traceable(model),
                          make_optimizer(config, model.param_shapes()), images, data,
                          parallel.DataParallel.from_config(config))
    except ConfigError as e:  # every candidate would fail alike
        return str(e)
    return None


def register_sources(spec: dict[str, Any]) -> str | None:
    """Register the cells, orders and optimizers the parent registered (``spec``'s
    ``cells``, ``orders`` and ``optimizers``, found on its ``path`` too: the module
    docstring); why one cannot be, or None."""
    from rnnjax import cells, optim, orders

    sys.path.extend(p for p in spec.get("path") or [] if p not in sys.path)
    try:
        for kind, table in (("cells", cells), ("orders", orders), ("optimizers", optim)):
            for name, where in (spec.get(kind) or {}).items():
                table.REGISTRY.register_source(name, where)
    except ValueError as e:
        return str(e)
    return None


def run(spec: dict[str, Any], timer: Callable[[], float] = time.perf_counter,
        requests: Iterable[str] = ()) -> None:
    """Time each candidate of ``spec`` in turn, emitting events (see the module docstring);
    then ``ready``, and for each line of ``requests`` (``{"time": fields, "steps": n}``, a
    candidate timed here) one call of it, of n steps (null: as many as it was timed in, at
    most the run's steps per call): ``timing`` with its seconds per step (None when it was
    not timed here)."""
    import numpy as np

    from rnnjax import process, runtime
    from rnnjax.config import from_dict
    from rnnjax.data.spec import IDX_SPEC, DataSpec
    from rnnjax.tune import pay_back_deadline, sequence_length

    config = from_dict(spec["config"])
    given = DataSpec.from_json(spec["data"]) if "data" in spec else IDX_SPEC
    # The classes as the run's model has them: --num-classes, else the dataset's.
    images = DataSpec(given.image_shape, config.num_classes or given.num_classes)
    refused = register_sources(spec)  # before anything reads the run's cell or order
    if refused:  # the run itself would refuse it: no candidate can work
        emit("refused", reason=refused)
        return
    runtime.apply_cpus(config.cpus)  # the child's process settings: its CPUs (tune.run_child)
    # The run reuses the winner's programs; with "compiled" (an earlier child compiled every
    # candidate) this child loads them from the cache, so no compile time is predicted.
    cached = runtime.enable_compile_cache(config.compile_cache) is not None \
        and spec.get("compiled", False)
    device = runtime.device_info()
    emit("device", **device, xla_flags=os.environ.get("XLA_FLAGS", ""),
         cpus=process.cpu_count())
    deadline, steps, pay_back = spec["deadline"], spec.get("steps"), spec.get("pay_back")
    alone, reach = spec.get("alone"), spec.get("reach")
    excluded = spec.get("exclude") or []  # each killed an earlier child: never started here
    growth = compile_growth(device["backend"])
    if alone and device["backend"] not in alone["others_on"]:  # nothing follows it here
        deadline = alone["deadline"]
        pay_back = pay_back and {**pay_back, "share": alone["share"]}
        emit("budget", deadline=deadline)
    time_steps = sequence_length(config, images)
    data = synthetic_data(config, 2 * config.batch_size, images)
    reference = spec["reference"]
    # (form, chunks, feed) -> unroll: (compile seconds, step share)
    compiles: dict[tuple[Any, ...], dict[int, tuple[float, float | None]]] = {}
    _listen_to_the_cache()
    done: list[tuple[dict[str, Any], Timed, float]] = []  # fields, program, best s/step
    reported: list[float] = []  # each one's seconds per step as last emitted

    def in_turns(entries: list[int], rounds: int) -> None:
        """Rounds of one call each of these ``done`` candidates, in turns, while the budget
        lasts (a drift of the machine's load then falls on all alike); each keeps its
        best."""
        for _ in range(rounds if entries else 0):
            if time.time() + 2 * sum(done[i][2] for i in entries) * steps > deadline:
                return
            for i in entries:
                fields, timed, per_step = done[i]
                done[i] = (fields, timed, min(per_step, timed.once(steps)))

    queue = for_backend(spec["candidates"], device["backend"])
    refused = too_large(config, images, data)
    if refused:  # the run itself would refuse it: no candidate can work
        emit("refused", reason=refused)
        return
    while queue:
        fields = queue.pop(0)
        if BEST in fields.values():
            # Before taking the fastest's values: those within NEAR of it once more, in turns.
            fastest = min((d[2] for d in done), default=0.0)
            in_turns([i for i, d in enumerate(done) if d[2] <= fastest * (1 + NEAR)], 1)
            options = [o for o in resolutions(fields, [(d[0], d[2]) for d in done],
                                              to_fields(config, fields))
                       if not any(same_program(o, d[0]) for d in done)]  # not timed yet
            if not options:
                continue
            fields, queue[:0] = options[0], options[1:]
        if fields in excluded:
            continue
        candidate, extra_flags = candidate_config(config, fields)
        kind = (candidate.backward, candidate.projection, candidate.weight_grad,
                candidate.chunks, candidate.feed)
        if candidate.feed == "stream":  # a stream as long as the calls timed will read
            candidate = candidate.replace(steps=max(candidate.steps, 1_000_000))
        unroll, part = loop_unroll(candidate.unroll, candidate.chunks, time_steps)
        # From the compile times of its own kind, else of any kind measured (slowest).
        history = compiles.get(kind) or {
            u: max((c[u] for c in compiles.values() if u in c), key=lambda p: p[0])
            for u in {u for c in compiles.values() for u in c}}
        until = reach_until(fields, deadline, reach)
        why = why_not(unroll, history, until - time.time(), cached, growth)
        if why:
            emit("skipped", candidate=fields, reason=why)
            continue
        if until > deadline:  # the parent's timer waits for it (this candidate's only)
            emit("budget", deadline=until, reach=True)
        emit("trying", candidate=fields)  # where the process dies, this one killed it
        try:
            timed = Timed(candidate, data, timer, images, extra_flags)
            steps = steps or timed.steps_for(spec["call_s"])
            per_step = timed.time(steps, spec["repeats"], until)
        except Exception as e:  # a candidate this backend cannot run: report, go on
            failure = f"{type(e).__name__}: {e}"
            if lost_device(device["backend"]):  # every later candidate would fail too
                print(f"rnnjax.measure: the {device['backend']} failed after {fields}: "
                      f"{failure}"[:600], file=sys.stderr, flush=True)
                raise DeviceLost(failure) from e  # unreported: rnnjax.tune.lost names it
            emit("skipped", candidate=fields, reason=f"failed: {failure}"[:300])
            continue
        if not os.path.exists(reference):
            np.savez(reference, **timed.first_step)  # the first candidate timed: the reference
            cut = pay_back and pay_back_deadline(pay_back["start"], pay_back["budget_s"],
                                                 pay_back["steps"], per_step, pay_back["share"])
            if cut and cut < deadline:
                deadline = cut
                emit("budget", deadline=deadline)
            if pay_back and reach:  # the reach follows the run's budget too
                reach = {**reach, "deadline": min(reach["deadline"], pay_back_deadline(
                    pay_back["start"], pay_back["budget_s"], pay_back["steps"], per_step,
                    reach["share"]))}
        difference = relative_difference(timed.first_step, dict(np.load(reference)))
        # A program loaded from the cache predicts by the compile it took when cached; a
        # baseline that predicted nothing let the pixels' full unroll (minutes) start.
        compile_s = timed.compile_s if timed.cached_compile_s is None else timed.cached_compile_s
        compiles.setdefault(kind, {})[unroll] = (
            compile_s, step_share(timed.run.program, unroll, part))
        emit("result", candidate=fields, compile_s=timed.compile_s, step_s=per_step,
             steps=steps, difference=difference)
        done.append((fields, timed, per_step))
        reported.append(per_step)
    # The reference (every other is compared with it) and the fastest others, in turns.
    ranked = sorted(range(1, len(done)), key=lambda i: done[i][2])
    in_turns(([0] if done else []) + ranked[: FINALISTS - 1], 2 * spec["repeats"])
    for (fields, _, per_step), was in zip(done, reported, strict=True):
        if per_step < was:
            emit("retimed", candidate=fields, step_s=per_step)
    emit("ready")
    # The parent's final comparison: one call at a time, across children, in turns; and
    # the evaluation of the candidate chosen, each way asked.
    for line in requests:
        request = json.loads(line)
        if "evaluate" in request:
            try:
                timing = evaluation_timing(
                    *candidate_config(config, request["evaluate"]), images,
                    request["ways"], request["until"], timer=timer)
            except Exception as e:  # a program this backend cannot run: no choice made
                timing = {"failed": f"{type(e).__name__}: {e}"[:300]}
            emit("evaluation", **timing)
            continue
        wanted, count = request["time"], request.get("steps") or steps
        timed = next((t for fields, t, _ in done if fields == wanted), None)
        emit("timing", candidate=wanted, step_s=None if timed is None else timed.once(count))


def exit_with_parent(parent: int, every_s: float = 1.0) -> threading.Thread:
    """Exit this process (``os._exit``, status 1) within ``every_s`` of its ``parent``
    (process id) going: a tuner killed (SIGKILL, or SIGTERM, which runs no cleanup) cannot
    end its child, which would compile and time on for minutes, reparented, loading the
    CPUs a next run's tuner times on. A daemon thread polling ``os.getppid()``; returned."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def main() -> int:
    """The child process (``python -m rnnjax.measure``): the spec on stdin's first line,
    requests on the rest; the garbage collector set for a whole process
    (``rnnjax.process``)."""
    from rnnjax import process

    exit_with_parent(os.getppid())
    process.importing()
    import jax  # noqa: F401  (what run() imports, before the freeze)

    from rnnjax import loop  # noqa: F401  (the model, the train step, the optimizers)

    process.imported()
    try:
        run(json.loads(sys.stdin.readline()), requests=sys.stdin)
    except DeviceLost:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(DEVICE_LOST)
    process.exiting()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
