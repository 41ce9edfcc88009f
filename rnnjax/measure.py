"""Time train-step candidates in this process: the tuner's child, ``python -m rnnjax.measure``.

XLA reads its flags once per process, so :mod:`rnnjax.tune` starts one child per set of
XLA flags, with ``$XLA_FLAGS`` set, and hands it a JSON spec on stdin::

    {"config": {...Config fields...}, "candidates": [{"unroll": 1, "weight_grad": "product",
     "feed": "device"}, ...], "deadline": unix time, "call_s": 0.1, "steps": null,
     "repeats": 3, "reference": "path/to/baseline.npz"}

Each candidate is the config with those fields replaced, run by the loop's own feeds
(``loop.device_feed`` or ``loop.stream_feed``) on synthetic data of the run's shapes. The
child prints one line per event on stdout, ``rnnjax-tune <JSON>``: ``device`` (what it runs
on), then per candidate ``result`` (compile seconds, seconds per step, best of ``repeats``
calls of ``steps`` steps, and how far its first step's loss and gradients lie from the
reference's: the first candidate's, saved to ``reference``) or ``skipped`` (why).
Candidates are not started past ``deadline``, nor when their predicted compile time would
pass it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

PREFIX = "rnnjax-tune "


def emit(event: str, **fields: Any) -> None:
    """One event line for the parent on stdout."""
    sys.stdout.write(PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def predict_compile_s(unroll: int, measured: dict[int, float]) -> float | None:
    """Compile seconds predicted for ``unroll`` from those measured at other unrolls.

    Linear in the unroll factor through the two measured points farthest apart (XLA
    compiles one loop body per unrolled step); one point alone: half fixed cost, half
    proportional. None when nothing is measured yet.
    """
    if not measured:
        return None
    points = sorted(measured.items())
    (u0, c0), (u1, c1) = points[0], points[-1]
    if u1 == u0:
        return c0 * (0.5 + 0.5 * unroll / u0)
    slope = max(0.0, (c1 - c0) / (u1 - u0))
    return c0 + slope * (unroll - u0)


def relative_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest difference between two sets of arrays, each relative to the largest
    magnitude of that array in ``b`` (the reference)."""
    import numpy as np

    worst = 0.0
    for name, ref in b.items():
        ref = np.asarray(ref, np.float64)
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        diff = float(np.abs(np.asarray(a[name], np.float64) - ref).max()) if ref.size else 0.0
        worst = max(worst, diff / scale if scale else diff)
    return worst


def synthetic_data(config: Any, examples: int) -> Any:
    """Random uint8 images and labels of the run's shapes (timing does not read them)."""
    import numpy as np

    from rnnjax.data.idx import Arrays

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (examples, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, config.num_classes, examples).astype(np.int32)
    return Arrays(images, labels, images[: config.batch_size], labels[: config.batch_size])


def first_step(state: Any, sums: Any) -> dict[str, Any]:
    """What a candidate's first train step computed, to compare with the reference's: the
    loss, and the optimizer state (Adam's moments are the gradient and its square, scaled),
    or the parameters when the optimizer keeps no floating-point state."""
    import jax
    import numpy as np

    def floats(tree: Any) -> list[np.ndarray]:
        return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)
                if np.issubdtype(np.asarray(leaf).dtype, np.floating)]

    leaves = floats(state.opt_state) or floats(state.params)
    return {"loss": np.asarray(sums["loss_sum"]), **{f"s{i}": a for i, a in enumerate(leaves)}}


def time_candidate(
    config: Any, data: Any, *, steps: int | None, call_s: float, repeats: int,
    deadline: float, timer: Callable[[], float] = time.perf_counter,
) -> tuple[float, float, int, dict[str, Any]]:
    """``(compile seconds, seconds per step, steps per timed call, first step)`` of
    ``config``'s train step as the loop runs it (its feed, its steps per call), on the
    device; the first step (:func:`first_step`) is the first batch from the initial state.

    ``steps`` per timed call, or (None) as many as fill about ``call_s`` seconds; the best
    of ``repeats`` calls (fewer when ``deadline`` passes), every call blocked on.
    """
    import jax

    from rnnjax import loop, parallel
    from rnnjax.model import make_model
    from rnnjax.optim import make_optimizer

    model, optimizer = make_model(config), make_optimizer(config)
    dp = parallel.DataParallel.from_config(config)
    state = dp.replicate(loop.init_state(config, model, optimizer))
    if config.feed == "device":
        run = loop.device_feed(config, model, optimizer, dp, dp.dataset(data))
        chunk = min(config.steps_per_call, config.steps)
    else:
        run = loop.stream_feed(config, model, optimizer, dp, data, 0)
        chunk = config.steps
    first = 0

    def call(count: int) -> tuple[float, float, Any]:
        nonlocal state, first
        start = timer()
        state, sums, compile_s = run(state, first, count)
        jax.block_until_ready((state, sums))
        first += count
        return timer() - start - compile_s, compile_s, sums

    _, compile_s, sums = call(1)  # compiles, and warms up
    stepped = first_step(state, sums)
    one, _, _ = call(1)
    if steps is None:
        steps = max(1, min(chunk, int(call_s / max(one, 1e-6))))
    best = float("inf")
    for i in range(repeats):
        if i and time.time() > deadline:
            break
        best = min(best, call(min(steps, chunk))[0])
    return compile_s, best / min(steps, chunk), steps, stepped


def run(spec: dict[str, Any], timer: Callable[[], float] = time.perf_counter) -> None:
    """Time each candidate of ``spec`` in turn, emitting events (see the module docstring)."""
    import numpy as np

    from rnnjax import runtime
    from rnnjax.config import from_dict

    config = from_dict(spec["config"])
    runtime.enable_compile_cache(config.compile_cache)  # the run reuses the winner's programs
    emit("device", **runtime.device_info(), xla_flags=os.environ.get("XLA_FLAGS", ""))
    deadline, steps = spec["deadline"], spec.get("steps")
    time_steps = 28 if config.order == "rows" else 784
    data = synthetic_data(config, 2 * config.batch_size)
    reference = spec["reference"]
    compiles: dict[tuple[str, str], dict[int, float]] = {}  # (weight_grad, feed) -> unroll: s
    for fields in spec["candidates"]:
        candidate = config.replace(**fields)
        if candidate.feed == "stream":  # a stream as long as the calls timed will read
            candidate = candidate.replace(steps=max(candidate.steps, 1_000_000))
        unroll = candidate.unroll or time_steps
        left = deadline - time.time()
        predicted = predict_compile_s(unroll, compiles.get((candidate.weight_grad,
                                                            candidate.feed), {}))
        if left <= 0:
            emit("skipped", candidate=fields, reason="budget spent")
            continue
        if predicted is not None and predicted > left:
            emit("skipped", candidate=fields,
                 reason=f"compile predicted {predicted:.0f} s, {left:.0f} s left")
            continue
        try:
            compile_s, per_step, steps, stepped = time_candidate(
                candidate, data, steps=steps, call_s=spec["call_s"],
                repeats=spec["repeats"], deadline=deadline, timer=timer)
        except Exception as e:  # a candidate this backend cannot run: report, go on
            emit("skipped", candidate=fields, reason=f"failed: {type(e).__name__}: {e}"[:300])
            continue
        if not os.path.exists(reference):
            np.savez(reference, **stepped)  # the first candidate timed is the reference
        difference = relative_difference(stepped, dict(np.load(reference)))
        compiles.setdefault((candidate.weight_grad, candidate.feed), {})[unroll] = compile_s
        emit("result", candidate=fields, compile_s=compile_s, step_s=per_step, steps=steps,
             difference=difference)


def main() -> int:
    run(json.load(sys.stdin))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
