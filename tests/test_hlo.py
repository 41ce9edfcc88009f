"""Ops per time step, read from the compiled program: the counter, and each cell's budget.

Every op left in a compiled loop body runs once per time step (a thunk on XLA:CPU, a kernel
on a GPU); at small batches their count bounds the step. The budgets are the counts the
cells reach on XLA:CPU (jax 0.10), each in its default form and in the others the tuner
times: a change that adds ops to a loop body fails here. Before the op-count work (issue
11): SimpleRNN 5/5, LSTM 13/13, GRU 18/16 (all hoisted projection).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks.throughput import step_ops, step_text
from rnnjax import cells, hlo
from rnnjax.config import Config

# (cell, backward, projection, weight_grad): (forward, backward) ops per time step, train
# step at batch 50, rows, unroll 1. 'auto' is the cell's default form.
BUDGETS = {
    ("simple_rnn", "auto", "auto", "auto"): (5, 5),  # hand-written, hoisted, product
    ("simple_rnn", "auto", "in_loop", "per_step"): (7, 11),
    ("irnn", "auto", "auto", "auto"): (5, 5),
    # The Jacobian-storing forward (15; 17 while a concatenate built the Jacobian's row)
    # against 13 storing the gates; backward 8 from 13.
    ("lstm", "auto", "auto", "auto"): (15, 8),
    ("lstm", "auto", "in_loop", "per_step"): (19, 14),
    ("lstm", "autodiff", "auto", "auto"): (23, 20),  # in the loop, as Flax's nn.RNN
    ("gru", "auto", "auto", "auto"): (20, 20),  # autodiff, in the loop
    ("gru", "auto", "hoisted", "auto"): (17, 16),
    ("gru", "hand_written", "auto", "auto"): (12, 10),  # stores its local Jacobian
}


def scan_grad_text(unroll: int) -> str:
    """The compiled text, on the CPU, of the gradient of a known scan: 12 steps of
    ``h = tanh(h @ w + x)``, h [4, 8], unrolled by ``unroll``."""

    def loss(w, xs):
        def step(h, x):
            h = jnp.tanh(h @ w + x)
            return h, h

        return jax.lax.scan(step, jnp.zeros((4, 8)), xs, unroll=unroll)[1].sum()

    with jax.default_device(jax.devices("cpu")[0]):
        return jax.jit(jax.grad(loss)).lower(jnp.ones((8, 8)), jnp.ones((12, 4, 8))
                                             ).compile().as_text()


def grad_text_cut(how: str) -> str:
    """:func:`scan_grad_text`'s scan at unroll 1, cut another way: its gradient step in a
    loop of 4 steps per call (``steps_per_call``, as ``train.train_steps``), its 12 steps in
    scans of 5 and 7 (``chunks``), or a scan over 3 chunks of 4 (``nested``)."""
    def scan(w, h, xs):
        return jax.lax.scan(lambda h, x: (jnp.tanh(h @ w + x),) * 2, h, xs)

    def loss(w, xs):
        h = jnp.zeros((4, 8))
        if how == "chunks":
            h, first = scan(w, h, xs[:5])
            return first.sum() + scan(w, h, xs[5:])[1].sum()
        if how == "nested":
            return jax.lax.scan(lambda h, xc: scan(w, h, xc), h, xs.reshape(3, 4, 4, 8))[1].sum()
        return scan(w, h, xs)[1].sum()

    program = jax.grad(loss)
    if how == "steps_per_call":
        def program(w, xs):
            return jax.lax.fori_loop(0, 4, lambda i, w: w - jax.grad(loss)(w, xs), w)
    with jax.default_device(jax.devices("cpu")[0]):
        return jax.jit(program).lower(jnp.ones((8, 8)), jnp.ones((12, 4, 8))).compile().as_text()


def test_counter_reads_forward_and_backward_loops():
    """A scan with a known body: the counter finds both loops, tells them apart, and
    divides an unrolled body by its steps per iteration."""
    one, three = scan_grad_text(1), scan_grad_text(3)
    loops = hlo.loop_ops(one)
    assert sorted(loop.backward for loop in loops) == [False, True]
    assert all(loop.trip_count == 12 and loop.innermost for loop in loops)
    assert all("fusion" in loop.ops or "dot" in loop.ops for loop in loops)
    counts = hlo.ops_per_step(one, 12)
    assert counts["forward"] == len(next(x for x in loops if not x.backward).ops) >= 3
    assert counts["backward"] >= 3
    # Unrolled by 3: 4 iterations of 3 steps; per step no more than at unroll 1.
    assert {loop.trip_count for loop in hlo.loop_ops(three)} == {4}
    unrolled = hlo.ops_per_step(three, 12)
    assert 0 < unrolled["forward"] <= counts["forward"]
    # Its ops per step however the steps are cut: in a loop of K steps per call (outside
    # the gradient: not a loop over time), in unequal chunks, or in a scan over chunks.
    # Read by trip counts dividing the sequence, the first counted the K loop's ops, the
    # second dropped a chunk, and a remainder's unroll (5 of 12) read 0.
    for other in (grad_text_cut("steps_per_call"), grad_text_cut("chunks"),
                  grad_text_cut("nested")):
        assert hlo.ops_per_step(other, 12) == counts
    five = hlo.ops_per_step(scan_grad_text(5), 12)  # 2 bodies of 5 steps, 2 steps apart
    assert 0 < five["forward"] <= counts["forward"] and five["backward"] > 0
    # Launched per call: the loops' bodies once per iteration, the rest once.
    outside = hlo.launched_ops(one) - sum(12 * len(loop.ops) for loop in loops)
    assert 0 < outside < 12
    full = scan_grad_text(12)
    assert not hlo.loop_ops(full)
    assert hlo.launched_ops(full) <= hlo.launched_ops(three) <= hlo.launched_ops(one)



# A loop of a fused step inside no other loop; free instructions (parameter, tuple,
# get-tuple-element, constant) not counted.
_MODULE = """HloModule m

%fused_computation (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %t = f32[4]{0} tanh(%p0)
  ROOT %n = f32[4]{0} negate(%t)
}

%body (arg: (s32[], f32[4])) -> (s32[], f32[4]) {
  %arg = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %h = f32[4]{0} get-tuple-element(%arg), index=1
  %f = f32[4]{0} fusion(%h), kind=kLoop, calls=%fused_computation
  %g = f32[4]{0} fusion(%f), kind=kLoop, calls=%fused_computation
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %r = (s32[], f32[4]{0}) tuple(%j, %g)
}

%cond (arg.1: (s32[], f32[4])) -> pred[] {
  %arg.1 = (s32[], f32[4]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%arg.1), index=0
  %c = s32[] constant(6)
  ROOT %lt = pred[] compare(%i.1, %c), direction=LT
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %z = s32[] constant(0)
  %t0 = (s32[], f32[4]{0}) tuple(%z, %x)
  %w = (s32[], f32[4]{0}) while(%t0), condition=%cond, body=%body
  ROOT %out = f32[4]{0} get-tuple-element(%w), index=1
}
"""


def test_compiled_size_counts_every_instruction_and_a_steps_share():
    """What XLA compiled: every computation's instructions (fused ones too, the loop
    condition too), and per step those of the loop body and all it calls (a computation
    two fusions call, once), divided by the steps a body runs. A real scan: unrolling
    adds about that many per step, and a full unroll has no loop over time left."""
    size = hlo.compiled_size(_MODULE, 2)
    assert size.instructions == 2 + 3 + 1 + 1  # fused, body, condition, entry
    assert size.per_step == (3 + 2) / 2
    assert hlo.compiled_size(_MODULE, 0) == hlo.Size(7, 0.0)  # fully unrolled: no loop
    one, three, full = (hlo.compiled_size(scan_grad_text(u), u % 12) for u in (1, 3, 12))
    assert one.per_step > 0 and full.per_step == 0
    # Two steps more in each loop body: more instructions, at most two steps' worth (the
    # loop's own bookkeeping, once per body, is not repeated).
    assert one.instructions < three.instructions <= one.instructions + 2 * one.per_step
    assert full.instructions > three.instructions

# cell (its default form): the ops one whole train step launches (hlo.launched_ops) at
# batch 50, rows, fully unrolled, as the tuner runs it where full unrolling wins (the
# reference machine: every batch). The SimpleRNN launched 216 until its bias gradient
# joined the weight-gradient product: XLA had split a sum of its own over the unrolled
# steps into 56 reductions (then 160; 161 while that product's narrower operand, dz, went
# left; 160 since it merges time and batch into one 2-D product: cells._time_batch_product).
UNROLLED_BUDGETS = {"simple_rnn": 160, "irnn": 187, "lstm": 467, "gru": 548}


@pytest.mark.parametrize("case", sorted(BUDGETS), ids="-".join)
def test_ops_per_time_step_within_budget(case):
    cell, backward_form, projection, weight_grad = case
    config = Config(cell=cell, backward=backward_form, projection=projection,
                    weight_grad=weight_grad)
    counts = step_ops(config, jax.devices("cpu")[0])
    forward, backward = BUDGETS[case]
    assert 0 < counts["forward"] <= forward, counts
    assert 0 < counts["backward"] <= backward, counts


CONDITIONAL = """HloModule m

%two (p: f32[]) -> f32[] {
  %p = f32[] parameter(0)
  %a = f32[] sine(%p)
  ROOT %b = f32[] cosine(%a)
}

%one (q: f32[]) -> f32[] {
  %q = f32[] parameter(0)
  ROOT %c = f32[] sine(%q)
}

ENTRY %main (x: f32[], y: pred[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = pred[] parameter(1)
  %n = f32[] negate(%x)
  ROOT %r = f32[] conditional(%y, %n, %n), BRANCHES
}
"""


@pytest.mark.parametrize("branches", ["true_computation=%two, false_computation=%one",
                                      "branch_computations={%one, %two}"])
def test_launched_ops_takes_a_conditionals_largest_branch(branches):
    text = CONDITIONAL.replace("BRANCHES", branches)
    assert hlo.launched_ops(text) == 1 + 2  # the negate, and the two-op branch
    with pytest.raises(ValueError, match="conditional calling no computation"):
        hlo.launched_ops(CONDITIONAL.replace("BRANCHES", "nothing=1"))


@pytest.mark.parametrize("cell", sorted(UNROLLED_BUDGETS))
def test_unrolled_train_step_launches_within_budget(cell):
    text = step_text(Config(cell=cell, unroll=0), jax.devices("cpu")[0])
    assert not hlo.loop_ops(text)  # nothing left to loop over
    assert 0 < hlo.launched_ops(text) <= UNROLLED_BUDGETS[cell]


# What one train step of the native form launches (batch 50), at every order: its passes are
# custom calls over the whole sequence, with no loop left in XLA's program. The XLA forms
# launch 332-1182 at rows (unroll 1) and 7,906-29,870 by pixels; Flax's 710-1678 and
# 16,530-41,681 (results/flax_peers_ops.md).
NATIVE_BUDGETS = {"simple_rnn": 46, "lstm": 46, "gru": 49}


@pytest.mark.parametrize("order", ["rows", "pixels"])
@pytest.mark.parametrize("cell", sorted(NATIVE_BUDGETS))
def test_native_train_step_launches_a_few_ops_at_every_length(cell, order):
    text = step_text(Config(cell=cell, backward="native", order=order),
                     jax.devices("cpu")[0])
    assert not hlo.loop_ops(text)  # no time step left to XLA
    assert 0 < hlo.launched_ops(text) <= NATIVE_BUDGETS[cell]


@pytest.mark.parametrize("cell", ["simple_rnn", "irnn", "lstm", "gru"])
@pytest.mark.parametrize("form", [("hoisted", "product", 1), ("hoisted", "per_step", 1),
                                  ("in_loop", "product", 1), ("in_loop", "per_step", 1),
                                  ("hoisted", "product", 4)],
                         ids=lambda form: "-".join(map(str, form)))
def test_no_loop_copies_a_whole_sequence_array(cell, form):
    """The hand-written layers write rows over the rows they read (cells._scan_rows): on
    XLA:CPU at unroll 1 no loop of any form the tuner times copies a [T, ...] array (in
    4 chunks: a [T / 4, ...] array, a part's)."""
    projection, weight_grad, chunks = form
    config = Config(cell=cell, backward="hand_written", projection=projection,
                    weight_grad=weight_grad, unroll=1, chunks=chunks)
    text = step_text(config, jax.devices("cpu")[0])
    assert "dynamic-update-slice" in text
    assert hlo.sequence_copies(text, 28 // chunks) == []


def test_sequence_copies_finds_a_write_xla_cannot_keep_in_place():
    """The counter-case: a relu step written over its input row (the IRNN's forward, were
    it in place: XLA:CPU recomputes the relu in the write's fusion, and the carry's read of
    the row then comes after the write) makes the loop copy the whole array each step;
    tanh does not."""
    cpu = jax.devices("cpu")[0]

    def program(activation):
        def forward(w, xs):
            def step(h, u_t, _):
                h = activation(u_t + h @ w)
                return h, h, None

            h, hs, _ = cells._scan_rows(step, jnp.zeros((50, 50)), xs @ w)
            return hs, h

        w, xs = jnp.ones((50, 50)), jnp.ones((28, 50, 50))
        with jax.default_device(cpu):
            return jax.jit(forward).lower(w, xs).compile().as_text()

    assert hlo.sequence_copies(program(jax.nn.relu), 28)
    assert hlo.sequence_copies(program(jnp.tanh), 28) == []


@pytest.mark.parametrize("steps", ["-1", "1"])
def test_flax_benchmark_refuses_steps_per_call_it_cannot_time(capsys, steps):
    """A step's time is read from calls of 1 and of K steps: K must be 2 or more."""
    from benchmarks import flax_peers

    with pytest.raises(SystemExit) as exit_:
        flax_peers.main(["--steps-per-call", steps])
    assert exit_.value.code == 2
    assert (f"--steps-per-call {steps}: give 0 (the default) or 2 or more"
            in capsys.readouterr().err)


def test_flax_benchmark_counts_the_ops_every_runner_launches(tmp_path):
    """``benchmarks.flax_peers --ops``: each runner's train step, compiled and counted, not
    timed; the SimpleRNN launches fewer ops than Flax's at each unroll (jax 0.10, XLA:CPU:
    347 / 175 against linen's and nnx's 710 / 334 at batch 50), and every runner fewer
    fully unrolled than at unroll 1 (Flax's "unroll=full" runners too: at unroll 1 they
    would not time the better of the two). Per step: the count of a 2-step call halved, the
    README's 14-15 more than the single train step ``throughput --ops-only`` counts (the
    batch gather and the call's loop), not the call's twice that."""
    import json

    from benchmarks import flax_peers

    flax_peers.main(["--ops", "--cases", "rows:50", "--cells", "simple_rnn", "--apis",
                     "linen,nnx", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "flax_peers_ops.json").read_text())["rows"]
    for unroll in ("1", "full"):
        for api in ("linen", "nnx"):
            assert 0 < row[f"rnnjax unroll={unroll}"] < row[f"flax.{api} unroll={unroll}"]
    for runner in ("rnnjax", "flax.linen", "flax.nnx"):
        assert row[f"{runner} unroll=full"] < row[f"{runner} unroll=1"], runner
    assert 0 < row["rnnjax unroll=1"] - step_ops(Config())["launched"] <= 20


def test_throughput_ops_only_writes_the_ops_table(tmp_path):
    """``benchmarks.throughput --ops-only``: each cell's ops, compiled and counted, not timed,
    into ``throughput_ops.json`` (the README's table of ops per time step): the SimpleRNN's
    within its budget, and fewer launched fully unrolled than at unroll 1; its native form's
    too, with no loop: no op per time step, the same count at every unroll."""
    import json

    from benchmarks import throughput

    throughput.main(["--ops-only", "--cells", "simple_rnn", "--backends", "cpu",
                     "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "throughput_ops.json").read_text())
    row, native = payload["rows"]
    assert (row["backend"], row["cell"]) == ("cpu", "simple_rnn")
    assert 0 < row["forward"] <= BUDGETS["simple_rnn", "auto", "auto", "auto"][0]
    assert 0 < row["backward"] <= BUDGETS["simple_rnn", "auto", "auto", "auto"][1]
    assert 0 < row["launched_full"] < row["launched"]
    assert native["cell"] == "simple_rnn, backward='native'"
    assert native["forward"] == native["backward"] == 0
    assert 0 < native["launched"] == native["launched_full"] <= NATIVE_BUDGETS["simple_rnn"]
    assert "forward" in (tmp_path / "throughput_ops.md").read_text()


def test_a_native_form_that_fails_to_compile_costs_only_its_row(monkeypatch, capsys):
    """The native row's kernels (a GPU's Pallas kernels, which Triton has not compiled on a
    GPU yet) may fail to compile: the ops table says so in its line and goes on without the
    row, where the failure had stopped ``benchmarks.throughput`` before its first timing.
    Any other form's failure is a bug and still raises."""
    import jax

    from benchmarks import throughput

    cpu = jax.devices("cpu")[0]
    counted = throughput.step_ops

    def step_ops(config, device, cell=None):
        if config.backward == "native" or config.cell == "gru":
            raise RuntimeError("Triton compilation failed\nmore detail")
        return counted(config, device, cell)

    monkeypatch.setattr(throughput, "step_ops", step_ops)
    table = throughput.ops_table(["simple_rnn"], cpu)
    assert list(table) == ["simple_rnn"]
    assert ("  simple_rnn, backward='native': not counted (failed: RuntimeError: Triton "
            "compilation failed)") in capsys.readouterr().out.splitlines()
    with pytest.raises(RuntimeError, match="Triton"):
        throughput.ops_table(["gru"], cpu)


def test_a_gpu_machines_cpu_ops_table_has_no_native_row(monkeypatch):
    """On a GPU machine (the default backend a GPU's) a native layer runs the Pallas
    kernels, lowered for the GPU alone: the CPU's table, built in the same process, had the
    native row too and stopped the benchmark before its first timing ("Only interpret mode
    is supported on CPU backend"), every backend's rows lost."""
    import jax

    from benchmarks import throughput

    cpu = jax.devices("cpu")[0]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # as a GPU machine's
    table = throughput.ops_table(["simple_rnn"], cpu)
    assert list(table) == ["simple_rnn"]
