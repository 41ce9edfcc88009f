"""rnnjax against Flax's own ``nn.RNN`` / ``nnx.RNN``: same data, same recipe, same process.

    python -m benchmarks.flax_peers [--cases rows:50,rows:1024,rows:4096,pixels:50]
    python -m benchmarks.peers          # runs this too, after Keras and PyTorch
    python -m benchmarks.flax_peers --ops --cases rows:50,pixels:50   # ops per step, untimed
    python -m benchmarks.flax_peers --cases rows:4096 --steps-per-call 20   # K of your own

For each case (sequence order and batch size) and each cell, the ms of one
``RNN(50) -> Dense(10)`` optax-Adam(1e-3) train step, K steps per compiled call on
device-resident MNIST walked in order (the fastest way to run either library), as a run of
long calls pays it: ``rnnjax train`` runs 500 steps per call (``--steps-per-call``). A call
costs more than its steps: XLA:CPU allocates the call's buffers afresh and its first step
writes them, page by page (at rows, batch 4096, on the 2-core development machine: about
one more step's time per call, rnnjax and Flax alike). Timed at the few steps per call a
benchmark can afford (4 at rows 4096), that cost would weigh a quarter of every step,
which a run of 500-step calls spreads over 500. So each runner is timed in calls of 1 and
of K steps, in turns: the call's own cost (``rnnjax.measure.call_overhead``, as the tuner
measures it) comes off the K-step call and is spread over 500 steps
(``rnnjax.measure.run_step``). The medians of both calls and the call's own cost are in
``flax_peers.json``; the notes list the call's cost per runner. Each case's K: at least
:data:`MIN_STEPS_PER_CALL`.

* rnnjax as ``rnnjax train`` runs it (what the tuner chose for this machine and shape,
  cached or measured now as the first ``rnnjax train`` would; printed in each row). When
  the choice includes XLA flags, which XLA reads once per process, that runner lives in a
  child process started with them (``--child``), called in turns like the others (one
  pipe message each way per call, well under 1 ms against calls of 0.1 s and more), and the
  same choice without the flags runs here too; and rnnjax at unroll 1 and full;
* ``flax.linen.RNN`` and ``flax.nnx.RNN`` (functional split/merge inside the compiled loop)
  with ``SimpleCell``, ``OptimizedLSTMCell`` and ``GRUCell``, at unroll 1 and full.

``--ops`` times nothing: it prints the ops one train step of each runner launches in each
case (``rnnjax.hlo.launched_ops`` of a 2-step call, halved; each cell in rnnjax's default
form) and writes
``results/flax_peers_ops.{json,md}``.

All runners of one case are timed in turns (``benchmarks.harness.interleaved``), so drift of
a shared machine hits each alike; compile time is reported apart. Writes
``results/flax_peers.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from benchmarks import harness
from benchmarks.harness import environment, interleaved, write_results
from rnnjax import cli, hlo, measure, runtime, train, tune
from rnnjax.config import Config
from rnnjax.data.idx import Arrays
from rnnjax.data.pipeline import batch_indices, to_device
from rnnjax.data.sources import load_arrays
from rnnjax.loop import init_state
from rnnjax.model import make_model
from rnnjax.optim import make_optimizer

HIDDEN = 50
# Fewest train steps a case's K-step call runs: the marginal step, (K-step call - 1-step
# call) / (K - 1), is read from their difference, whose noise shrinks with K.
MIN_STEPS_PER_CALL = 8
# rnnjax cell -> the Flax cell with the same equations.
CELLS = {"simple_rnn": "SimpleCell", "lstm": "OptimizedLSTMCell", "gru": "GRUCell"}
Runner = Callable[..., Any]  # run(count=None): one call of count steps (None: all K)


def sequence_length(order: str) -> int:
    return 28 if order == "rows" else 784


def unrolls(order: str, max_full_unroll: int) -> tuple[tuple[str, int], ...]:
    """``(name, unroll)`` pairs a case runs: 1, and full where the sequence is at most
    ``max_full_unroll`` steps long (the compile time grows with the steps unrolled)."""
    full = sequence_length(order)
    return (("1", 1), ("full", full)) if full <= max_full_unroll else (("1", 1),)


def as_sequence(images: jax.Array, order: str) -> jax.Array:
    """Batch-major images [B, 28, 28] -> the batch-major sequence Flax's RNN takes."""
    return images if order == "rows" else images.reshape(images.shape[0], 784, 1)


# A train program: ``(fn, state, args)``, ``fn(state, *args, count=None) -> (state, loss
# sum)`` running the first ``count`` of the K steps of ``args[-1]`` ([K, B] batch indices,
# count None: all K, a static loop) per call (:func:`k_steps`); a runner compiles it
# (:func:`compiled_runner`).
Program = tuple[Callable, Any, tuple]


def steps_per_call(order: str, batch: int) -> int:
    """K of a case: about the same work per timed call, 20,000 image rows (fewer steps for
    long sequences and big batches), 8-200 steps (:data:`MIN_STEPS_PER_CALL`)."""
    rows = batch * sequence_length(order) // 28
    return max(MIN_STEPS_PER_CALL, min(200, 20000 // rows))


def compiled_runner(fn: Callable, state: Any, args: tuple) -> tuple[Runner, float]:
    """``fn(state, *args, count) -> (state, ...)`` compiled once with the state donated and
    a traced ``count`` (as ``rnnjax train`` runs its calls); a runner ``run(count=None)``
    that runs ``count`` steps (None: all K) and carries the state from call to call; and
    the compile seconds."""
    steps = args[-1].shape[0]
    on_device = functools.cache(lambda n: jax.device_put(jnp.int32(n)))  # out of the timing
    compiled, compile_s = runtime.compile_timed(jax.jit(fn, donate_argnums=0), state, *args,
                                                on_device(steps))
    box = [state]

    def run(count: int | None = None):
        box[0] = compiled(box[0], *args, on_device(count or steps))[0]
        return box[0]

    return run, compile_s


def k_steps(loss: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """``(state=(params, opt_state), images, labels, idx [K, B], count=None) -> (state, loss
    sum)``: the first ``count`` steps of ``idx`` (None: all K)."""
    def fn(state, images, labels, idx, count=None):
        def body(i, carry):
            (params, opt_state), total = carry
            value, grads = jax.value_and_grad(loss)(params, images[idx[i]], labels[idx[i]])
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), total + value
        count = idx.shape[0] if count is None else count
        return jax.lax.fori_loop(0, count, body, (state, jnp.zeros([])))
    return fn


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def linen_program(device_data: Arrays, idx: jax.Array, *, cell: str, order: str,
                  unroll: int) -> Program:
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, images):
            h = nn.RNN(getattr(nn, cell)(HIDDEN), unroll=unroll)(as_sequence(images, order))
            return nn.Dense(10)(h[:, -1])

    net, optimizer = Net(), optax.adam(1e-3)
    images, labels = device_data.train_images, device_data.train_labels
    params = jax.jit(net.init)(jax.random.key(1337), images[:1])
    loss = lambda p, x, y: cross_entropy(net.apply(p, x), y)  # noqa: E731
    return k_steps(loss, optimizer), (params, optimizer.init(params)), (images, labels, idx)


def nnx_program(device_data: Arrays, idx: jax.Array, *, cell: str, order: str,
                unroll: int) -> Program:
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            features = 28 if order == "rows" else 1
            self.rnn = nnx.RNN(getattr(nnx, cell)(features, HIDDEN, rngs=rngs), unroll=unroll)
            self.head = nnx.Linear(HIDDEN, 10, rngs=rngs)

        def __call__(self, images):
            zeros = jnp.zeros((images.shape[0], HIDDEN))
            carry = (zeros, zeros) if "LSTM" in cell else zeros
            return self.head(self.rnn(as_sequence(images, order), initial_carry=carry)[:, -1])

    graphdef, params, rest = nnx.split(Net(nnx.Rngs(1337)), nnx.Param, ...)
    optimizer = optax.adam(1e-3)

    def loss(p, x, y):
        return cross_entropy(nnx.merge(graphdef, p, rest)(x), y)

    images, labels = device_data.train_images, device_data.train_labels
    return k_steps(loss, optimizer), (params, optimizer.init(params)), (images, labels, idx)


def rnnjax_program(device_data: Arrays, idx: jax.Array, config: Config) -> Program:
    model, optimizer = make_model(config), make_optimizer(config)
    fn = functools.partial(train.train_steps, model=model, optimizer=optimizer)
    return (fn, init_state(config, model, optimizer),
            (model.sequences(device_data.train_images), device_data.train_labels, idx))


def rnnjax_runner(device_data: Arrays, idx: jax.Array, config: Config) -> tuple[Runner, float]:
    return compiled_runner(*rnnjax_program(device_data, idx, config))


def launched_per_step(program: Program) -> float:
    """Ops one train step of ``program`` launches (``rnnjax.hlo.launched_ops`` of its
    compiled call, divided by its K steps): the per-op cost every runner pays."""
    fn, state, args = program
    text = jax.jit(fn).lower(state, *args).compile().as_text()
    return hlo.launched_ops(text) / args[-1].shape[0]


FLAX_PROGRAMS = {"linen": linen_program, "nnx": nnx_program}


def ops_rows(device_data: Arrays, order: str, batch: int, cells: list[str],
             apis: tuple[str, ...], max_full_unroll: int) -> list[dict[str, Any]]:
    """``--ops``: the ops one train step launches, per runner and unroll (each cell in its
    default form for rnnjax, as untuned), compiled, not timed."""
    idx = jax.device_put(batch_indices(len(device_data.train_labels), batch, 0, 2))
    full = sequence_length(order)
    rows = []
    for cell in cells:
        row: dict[str, Any] = {"order": order, "batch": batch, "cell": cell}
        for name, unroll in unrolls(order, max_full_unroll):
            config = Config(cell=cell, order=order, batch_size=batch, unroll=unroll % full)
            row[f"rnnjax unroll={name}"] = launched_per_step(
                rnnjax_program(device_data, idx, config))
            for api in apis:
                row[f"flax.{api} unroll={name}"] = launched_per_step(FLAX_PROGRAMS[api](
                    device_data, idx, cell=CELLS[cell], order=order, unroll=unroll))
        print(row, flush=True)
        rows.append(row)
    return rows


def child_main() -> None:
    """``--child``: one rnnjax runner under this process's ``$XLA_FLAGS``, on the config's
    ``cpus``. Reads a JSON ``{"config", "batch", "steps"}`` line, compiles, answers
    ``{"compile_s"}``; then each ``run COUNT`` line is one call of COUNT steps, blocked on,
    answered ``done``."""
    from rnnjax import runtime
    from rnnjax.config import from_dict

    spec = json.loads(sys.stdin.readline())
    config = from_dict(spec["config"])
    runtime.apply_cpus(config.cpus)  # before the backend starts, as rnnjax train does
    device_data = to_device(load_arrays(Config()))
    idx = jax.device_put(batch_indices(len(device_data.train_labels), spec["batch"], 0,
                                       spec["steps"]))
    run, compile_s = rnnjax_runner(device_data, idx, config)
    print(json.dumps({"compile_s": compile_s}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if len(words) != 2 or words[0] != "run":
            break
        jax.block_until_ready(run(int(words[1])))
        print("done", flush=True)


class ChildRunner:
    """:func:`rnnjax_runner` in a child process whose ``$XLA_FLAGS`` add
    ``config.xla_flags``, that asks for huge pages where ``config.huge_pages`` (as
    ``rnnjax train`` applies them at start-up, ``tune.child_env``) and runs on
    ``config.cpus``. Calling it (``count`` steps, None: all) runs one compiled call there
    and returns when the child has blocked on it."""

    def __init__(self, config: Config, batch: int, steps: int) -> None:
        from rnnjax.config import to_dict

        env = tune.child_env(tune.process_flags(config.xla_flags, config.huge_pages),
                             dict(os.environ))
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.flax_peers", "--child"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self._send(json.dumps({"config": to_dict(config), "batch": batch, "steps": steps}))
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the rnnjax child with XLA_FLAGS={env['XLA_FLAGS']!r}, --cpus "
                               f"{config.cpus} exited {self.proc.wait()} before compiling")
        self.compile_s = float(json.loads(reply)["compile_s"])
        self.steps = steps

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def __call__(self, count: int | None = None) -> None:
        self._send(f"run {count or self.steps}")
        if self.proc.stdout.readline().strip() != "done":
            raise RuntimeError(f"the rnnjax child exited {self.proc.wait()} during a call")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def close_children(runners: Iterable[Any]) -> None:
    """Close the :class:`ChildRunner` processes among ``runners``."""
    for run in runners:
        if isinstance(run, ChildRunner):
            run.close()


def in_process(config: Config) -> Config:
    """``config`` without the process settings (XLA flags, huge pages, CPUs) that only a
    process started with them has."""
    return config.replace(**tune.own_settings(config, frozenset()))


def train_runner(device_data: Arrays, idx: jax.Array, config: Config) -> tuple[Runner, float]:
    """rnnjax as ``rnnjax train`` runs ``config`` (K = ``len(idx)`` steps per call): in a
    :class:`ChildRunner` started with its process settings where it has any, else here;
    and its compile seconds. A child is closed with ``close()``."""
    if in_process(config) != config:
        steps, batch = idx.shape
        child = ChildRunner(config, batch, steps)
        return child, child.compile_s
    return rnnjax_runner(device_data, idx, config)


def user_config(cell: str, order: str, batch: int,
                tune_budget_s: float | None) -> tuple[Config, str]:
    """The Config ``rnnjax train --cell CELL --order ORDER --batch-size B`` would run with:
    the tuner's choice for this machine (cached, or measured now within the budget, as the
    first ``rnnjax train`` of the shape does: None, its default budget, capped by what the
    run can pay back; 0 = the untuned defaults; with ``$RNNJAX_TUNE`` off, as ``rnnjax
    train`` then, the untuned defaults: ``rnnjax.cli.tuning_by_default``), and what it
    chose, with the seconds spent choosing it: now ("measured in 10.0 s: unroll 0, ...")
    or by the run that cached it.

    The choice's XLA flags, huge pages and CPUs stay in the Config: :func:`case_runners` then runs
    it in a child process that has them. The Config's feed is always ``device`` (the runners
    time compiled calls on device-resident data); where the tuner chose another feed the
    text says so: "...: ..., feed stream, ... (timed with feed device)".
    """
    config = Config(cell=cell, order=order, batch_size=batch)
    if tune_budget_s is not None and tune_budget_s <= 0:
        return config, "untuned defaults"
    if not cli.tuning_by_default():
        return config, f"untuned defaults ({tune.ENV_VAR} off)"
    tuned, record = tune.resolve(config, frozenset(), tune_budget_s, err=sys.stderr)
    chosen = tune.describe(tune.settings(tuned))
    spent = record.get("tune_s")
    if spent is None:
        cost = ""
    elif record["mode"] == "cached":  # the seconds of the run that cached it, not this one's
        cost = f" (tuned in {spent:.1f} s by the run that cached it)"
    else:
        cost = f" in {spent:.1f} s"
    timed = "" if tuned.feed == "device" else " (timed with feed device)"
    return tuned.replace(feed="device"), f"{record['mode']}{cost}: {chosen}{timed}"


def case_runners(device_data: Arrays, order: str, batch: int, cell: str, steps: int,
                 flax_apis: tuple[str, ...], user: Config,
                 max_full_unroll: int) -> dict[str, tuple[Runner, float]]:
    """Every runner of one case; full unrolling only up to ``max_full_unroll`` steps (the
    compile time grows with the steps unrolled: minutes for the LSTM at 28 on 2 cores).

    The ``rnnjax unroll=...`` runners are XLA's form of ``user``'s choice at each unroll not
    already timed: where the tuner chose the native kernels (no loop to unroll), the cell's
    default form (``--backward``, ``--projection`` and ``--weight-grad`` auto) at that
    unroll."""
    idx = jax.device_put(batch_indices(len(device_data.train_labels), batch, 0, steps))
    full = sequence_length(order)
    runners = {"rnnjax (as rnnjax train)": train_runner(device_data, idx, user)}
    if in_process(user) != user:
        user = in_process(user)
        runners["rnnjax (its choice without its process settings)"] = rnnjax_runner(
            device_data, idx, user)
    xla = user if user.backward != "native" else user.replace(
        backward="auto", projection="auto", weight_grad="auto")  # the cell's default form
    for name, unroll in unrolls(order, max_full_unroll):
        if xla != user or (unroll % full) != user.unroll:  # 0 is full for rnnjax
            runners[f"rnnjax unroll={name}"] = rnnjax_runner(
                device_data, idx, xla.replace(unroll=unroll % full))
    for api in flax_apis:
        for name, unroll in unrolls(order, max_full_unroll):
            runners[f"flax.{api} unroll={name}"] = compiled_runner(*FLAX_PROGRAMS[api](
                device_data, idx, cell=CELLS[cell], order=order, unroll=unroll))
    return runners


def calls_of(runners: dict[str, tuple[Runner, float]], steps: int) -> dict[str, Runner]:
    """Each runner as two timed calls, ``"NAME (1)"`` of 1 step and ``"NAME (K)"`` of all
    ``steps``, for :func:`benchmarks.harness.interleaved` to time in turns."""
    return {f"{name} ({count})": functools.partial(run, count)
            for name, (run, _) in runners.items() for count in (1, steps)}


# The row entries of :func:`step_columns` besides the step's ms: JSON and notes, not tables.
CALL_COLUMNS = (" call ms", " (median ms)")


def step_columns(name: str, one: float, seconds: float, steps: int,
                 run_steps: int) -> dict[str, float]:
    """A runner's row entries from the median seconds of its 1-step call (``one``) and of its
    ``steps``-step call: ms per step in a run of ``run_steps``-step calls
    (``rnnjax.measure.run_step``), the call's own ms (``rnnjax.measure.call_overhead``), and
    both medians."""
    overhead = measure.call_overhead(one, seconds, steps)
    return {f"{name} ms": measure.run_step(seconds, steps, overhead, run_steps) * 1e3,
            f"{name} call ms": overhead * 1e3, f"{name} 1-step call (median ms)": one * 1e3,
            f"{name} {steps}-step call (median ms)": seconds * 1e3}


def per_runner_notes(rows: list[dict[str, Any]], title: str, suffix: str, form: str,
                     case: Callable[[dict[str, Any]], str] = lambda r:
                     f"{r['order']} {r['batch']} {r['cell']}") -> str:
    """A markdown list of one per-runner value (the row entries ending in ``suffix``) per
    row, each named by ``case``."""
    return f"{title}:\n\n" + "\n".join(
        f"- {case(r)}: "
        + ", ".join(f"{c.removesuffix(suffix)} {form.format(r[c])}" for c in r
                    if c.endswith(suffix))
        for r in rows)


def main(argv: list[str] | None = None) -> None:
    parser = harness.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=harness.cases(),
                        default="rows:50,rows:1024,rows:4096,pixels:50",
                        help="ORDER:BATCH,... (order rows or pixels)")
    parser.add_argument("--cells", type=harness.names(tuple(CELLS)), default=",".join(CELLS),
                        help=f"cells with a Flax peer, of {', '.join(CELLS)}")
    parser.add_argument("--apis", type=harness.names(tuple(FLAX_PROGRAMS), empty=True),
                        default="linen,nnx", help="Flax APIs to time ('': rnnjax alone)")
    parser.add_argument("--rounds", type=harness.at_least(1), default=5)
    parser.add_argument("--steps-per-call", type=int, default=0,
                        help="train steps K of the longer timed call (0: about the same work "
                        "per call in every case, 8-200 steps; at least 2); each runner is "
                        "also timed in 1-step calls, and the call's own cost spread over the "
                        "500 steps per call rnnjax train runs")
    parser.add_argument("--max-full-unroll", type=harness.at_least(0), default=100,
                        help="time unroll=full only for sequences up to this long (784 "
                        "unrolled pixel steps compile for tens of minutes)")
    parser.add_argument("--tune-budget", type=harness.tune_budget, default=None,
                        help="seconds the tuner may spend on a shape it has not cached "
                        "(default: as the first rnnjax train would; 0: the untuned defaults, "
                        "as with $RNNJAX_TUNE off)")
    parser.add_argument("--out", default="")
    parser.add_argument("--ops", action="store_true",
                        help="report the ops one train step launches per runner, for each "
                        "case, no timings")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps_per_call < 0 or args.steps_per_call == 1:
        parser.error(f"--steps-per-call {args.steps_per_call}: give 0 (the default) or 2 or "
                     "more (the step's time is read from calls of 1 and of K steps)")
    if args.child:
        return child_main()
    out = harness.results_dir(parser, args.out)
    data = load_arrays(Config())
    harness.check_batches(parser, "--cases", ((f"{order}:{batch}", batch)
                                              for order, batch in args.cases),
                          len(data.train_labels))
    device_data = to_device(data)
    apis = tuple(args.apis)
    if args.ops:
        rows = [row for order, batch in args.cases for row in ops_rows(
            device_data, order, batch, args.cells, apis, args.max_full_unroll)]
        columns = list(dict.fromkeys(c for r in rows for c in r))
        write_results("flax_peers_ops", rows, columns, env=environment(), out_dir=out)
        return
    rows = []
    run_steps = Config().steps_per_call  # what rnnjax train runs per call
    for order, batch in args.cases:
        steps = args.steps_per_call or steps_per_call(order, batch)
        for cell in args.cells:
            user, chosen = user_config(cell, order, batch, args.tune_budget)
            runners = case_runners(device_data, order, batch, cell, steps, apis, user,
                                   args.max_full_unroll)
            try:
                seconds = interleaved(calls_of(runners, steps), args.rounds)
            finally:
                close_children(run for run, _ in runners.values())
            row: dict[str, Any] = {"order": order, "batch": batch, "cell": cell,
                                   "steps/call": steps, "rnnjax train runs": chosen}
            for name, (_, compile_s) in runners.items():
                row.update(step_columns(name, seconds[f"{name} (1)"],
                                        seconds[f"{name} ({steps})"], steps, run_steps))
                row[f"{name} compile s"] = compile_s
            flax_best = min((row[f"{name} ms"] for name in runners if name.startswith("flax")),
                            default=float("nan"))
            row["best Flax / rnnjax"] = flax_best / row["rnnjax (as rnnjax train) ms"]
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()},
                  flush=True)
    columns = list(dict.fromkeys(c for r in rows for c in r))  # every row's, in order
    timing = [c for c in columns  # ms per step; the calls' own and medians: notes, JSON
              if not c.endswith((" compile s", *CALL_COLUMNS))]
    notes = "\n\n".join(per_runner_notes(rows, title, suffix, form) for title, suffix, form in (
        ("Compile seconds per runner", " compile s", "{:.1f}"),
        (f"A call's own ms per runner, spread over {run_steps} steps per call in the ms "
         "above (the medians of the 1- and K-step calls are in the JSON)", " call ms",
         "{:.1f}")))
    write_results("flax_peers", rows, timing, env=environment(), notes=notes, out_dir=out)


if __name__ == "__main__":
    main()
