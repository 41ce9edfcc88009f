"""``benchmarks.peers``: rnnjax as ``rnnjax train`` runs it, against Keras 3 (PyTorch where
installed), timed in turns; a choice with XLA flags runs in a child process started with
them (``benchmarks.flax_peers.ChildRunner``). And what the benchmarks' numbers are made of:
the harness's timers, each runner's data and batches, and the rows' arithmetic from given
timings (``benchmarks.flax_peers``, ``benchmarks.peers``, ``benchmarks.throughput``)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import flax_peers, peers
from rnnjax.config import Config
from rnnjax.data.idx import Arrays
from rnnjax.data.pipeline import batch_indices

ROOT = Path(__file__).resolve().parents[1]

needs_keras = pytest.mark.skipif(importlib.util.find_spec("keras") is None,
                                 reason="needs Keras (the test extra)")

# 2000 rows a batch: the benchmark's fewest steps per call (10), so each call is short.
ARGS = ["--batch-sizes", "2000", "--repeats", "1", "--flax-cases", ""]


def read_rows(out) -> list[dict]:
    return json.loads((out / "peers.json").read_text())["rows"]


@needs_keras
def test_peers_time_rnnjax_untuned_against_keras(tmp_path):
    peers.main([*ARGS, "--tune-budget", "0", "--out", str(tmp_path)])
    (row,) = read_rows(tmp_path)
    assert row["batch"] == 2000 and row["steps_timed"] == 10
    assert row["rnnjax train runs"] == "untuned defaults"
    names = [peers.RNNJAX, "rnnjax (1 step/call)", "keras3-jax unroll=True",
             "keras3-jax unroll=False"]
    assert all(row[f"{name} ms"] > 0 for name in names)
    for name in names[1:]:
        assert row[f"{name} / rnnjax"] == pytest.approx(
            row[f"{name} ms"] / row[f"{peers.RNNJAX} ms"])
    # rnnjax's step as a run of 500-step calls pays it, as the Flax benchmark reads every
    # runner's: from its 1- and K-step calls (both medians kept, with the call's own cost,
    # in the JSON; the table holds the step).
    one = row[f"{peers.RNNJAX} 1-step call (median ms)"]
    assert one > 0 and row[f"{peers.RNNJAX} 10-step call (median ms)"] > 0
    assert 0 <= row[f"{peers.RNNJAX} call ms"] < one  # (a half, until 3x load read 0.56)
    assert row[f"{peers.RNNJAX} ms"] == pytest.approx(flax_peers.step_columns(
        peers.RNNJAX, one * 1e-3, row[f"{peers.RNNJAX} 10-step call (median ms)"] * 1e-3, 10,
        Config().steps_per_call)[f"{peers.RNNJAX} ms"])
    text = (tmp_path / "peers.md").read_text()
    (header,) = [line for line in text.splitlines() if line.startswith("| batch |")]
    assert f"| {peers.RNNJAX} ms |" in header
    assert "median" not in header and "call ms" not in header
    assert "rnnjax's call's own ms" in text
    # Compile seconds apart (they were dropped, then Keras' were), in the JSON and notes.
    for name in names:
        assert row[f"{name} compile s"] > 0
    assert "compile" not in header
    assert "Compile seconds of each runner" in text
    assert f", keras3-jax unroll=False {row['keras3-jax unroll=False compile s']:.1f}" in text
    assert f"- batch 2000: {peers.RNNJAX} {row[f'{peers.RNNJAX} compile s']:.1f}, " in text
    # The figure needs matplotlib (the peers extra), which the test extra leaves out.
    assert (tmp_path / "peers.png").exists() == (
        importlib.util.find_spec("matplotlib") is not None)


def test_peers_run_a_choice_with_xla_flags_in_a_child_with_them(tmp_path, monkeypatch):
    flags = "--xla_cpu_prefer_vector_width=256"
    chosen = Config(batch_size=2000, xla_flags=flags, feed="device")
    monkeypatch.setattr(flax_peers, "user_config",
                        lambda *args: (chosen, "measured: a choice with XLA flags"))
    children = []
    real = flax_peers.ChildRunner

    class Recorded(real):
        def __init__(self, config, batch, steps):
            super().__init__(config, batch, steps)
            children.append((self, config))

    monkeypatch.setattr(flax_peers, "ChildRunner", Recorded)
    monkeypatch.setattr(peers, "available", lambda module: False)  # rnnjax alone
    peers.main([*ARGS, "--out", str(tmp_path)])
    (row,) = read_rows(tmp_path)
    assert row["rnnjax train runs"] == "measured: a choice with XLA flags"
    assert row[f"{peers.RNNJAX} ms"] > 0 and row["rnnjax (1 step/call) ms"] > 0
    ((child, config),) = children
    # the child's compile seconds, as it reported them, and the in-process runner's
    assert row[f"{peers.RNNJAX} compile s"] == child.compile_s > 0
    assert row[f"{peers.PER_STEP} compile s"] > 0
    assert config.xla_flags == flags  # started with them (tune.child_env)
    assert child.proc.returncode == 0  # closed once timed
    assert flags not in os.environ.get("XLA_FLAGS", "")  # this process is left as it was


def test_the_choice_a_benchmark_reports_says_what_choosing_it_cost(monkeypatch):
    """The first-run tuning's seconds go into the results' "rnnjax train runs" column, so the
    cost stays with the table; a cached choice carries the seconds of the run that cached
    it (tune.resolve's record), which this run did not spend, and says so."""
    from rnnjax import tune

    monkeypatch.delenv("RNNJAX_TUNE")  # as rnnjax train, the benchmark tunes
    records = iter([{"mode": "measured", "tune_s": 10.04},
                    {"mode": "cached", "tune_s": 10.04}, {"mode": "cached"}])
    monkeypatch.setattr(tune, "resolve",
                        lambda config, *args, **kwargs: (config.replace(unroll=0),
                                                         next(records)))
    measured, cached, unknown = (flax_peers.user_config("simple_rnn", "rows", 1024, None)[1]
                                 for _ in range(3))
    assert measured.startswith("measured in 10.0 s: unroll 0,")
    assert cached.startswith("cached (tuned in 10.0 s by the run that cached it): unroll 0,")
    assert unknown.startswith("cached: unroll 0,")


@pytest.mark.parametrize("feed", ["stream", "device"])
def test_the_choice_a_benchmark_reports_says_which_feed_it_timed(monkeypatch, feed):
    """The runners time compiled calls on device-resident data (feed device) whatever feed
    the tuner chose: a row whose choice was another feed says it was timed with device."""
    from rnnjax import tune

    monkeypatch.delenv("RNNJAX_TUNE")  # as rnnjax train, the benchmark tunes
    monkeypatch.setattr(tune, "resolve", lambda config, *args, **kwargs: (
        config.replace(feed=feed), {"mode": "measured", "tune_s": 9.0}))
    config, chosen = flax_peers.user_config("simple_rnn", "rows", 50, None)
    assert config.feed == "device"
    described = tune.describe(tune.settings(config.replace(feed=feed)))
    assert f"feed {feed}" in described
    assert chosen == f"measured in 9.0 s: {described}" + (
        "" if feed == "device" else " (timed with feed device)")


@pytest.mark.parametrize("value", ["off", "0", "False", " no "])
def test_the_benchmarks_run_untuned_where_rnnjax_train_does(monkeypatch, value):
    """With $RNNJAX_TUNE off, rnnjax train runs the untuned defaults; the benchmark's rnnjax
    row said "cached (tuned ...)", the tuner's choice, which that run does not run. It reads
    the switch as rnnjax train does (``rnnjax.cli.tuning_by_default``) and says so."""
    from rnnjax import tune

    def resolve(*args, **kwargs):
        raise AssertionError("tuned with $RNNJAX_TUNE off")

    monkeypatch.setenv("RNNJAX_TUNE", value)
    monkeypatch.setattr(tune, "resolve", resolve)
    for budget in (None, 30.0):
        config, chosen = flax_peers.user_config("gru", "pixels", 64, budget)
        assert config == Config(cell="gru", order="pixels", batch_size=64)
        assert chosen == "untuned defaults (RNNJAX_TUNE off)"
    assert flax_peers.user_config("gru", "rows", 64, 0.0)[1] == "untuned defaults"


# Keras' seed run and the peers' Keras runner, each as short as it goes, each in its own
# process (Keras remembers TensorFlow's absence), then the TensorFlow modules loaded.
KERAS_RUNS = {
    "keras_seed": """
from benchmarks import keras_seed
keras_seed.main(["--steps", "1"])
""",
    "peers.keras_step": """
from benchmarks import peers
from rnnjax.config import Config
from rnnjax.data.sources import load_arrays
run, first_call_s = peers.keras_step(load_arrays(Config()), 50, 1, unroll=False)
assert first_call_s > 0
run()
"""}


@needs_keras
@pytest.mark.parametrize("run", list(KERAS_RUNS))
def test_the_keras_peers_import_no_tensorflow(tmp_path, run):
    """Keras runs on JAX, but ``keras.utils.set_random_seed`` imports TensorFlow where it is
    installed (1,621 modules, seconds of start-up the rnnjax side never pays); the seed run
    says whether it was loaded."""
    code = KERAS_RUNS[run] + (
        "import sys\nprint('tensorflow modules:', "
        "sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.endswith("tensorflow modules: []\n"), proc.stdout
    if run == "keras_seed":
        assert "step     0  test cost: " in proc.stdout
        assert "; tensorflow loaded: False\n" in proc.stdout


class Clock:
    """``time`` for ``benchmarks.harness`` (its ``perf_counter``): a clock that moves only by
    what a test's runners say they take (``advance``), so that a timing reads exactly that
    under any load (sixteenths of a second add up exactly, where a test reads them so)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Pending:
    """A result as JAX returns one: the call has returned, its value is ready only later.
    ``jax.block_until_ready`` calls its ``block_until_ready``, which takes ``seconds`` on the
    clock and counts in ``waits``."""

    def __init__(self, clock: Clock, seconds: float, waits: list) -> None:
        self.clock, self.seconds, self.waits = clock, seconds, waits

    def block_until_ready(self):
        self.clock.advance(self.seconds)
        self.waits.append(self.seconds)
        return self


def test_the_harness_times_each_call_until_its_result_is_ready(monkeypatch):
    """JAX returns from a call before its result is computed: a timing that does not block
    on the result reads the dispatch alone, and every benchmark's table would read fast.
    Each timed call of the harness's timers (``time_calls``; ``time_compiled``'s first call
    and its median; ``in_turns``, which ``interleaved`` and every peers, Flax, native-kernels
    and evaluation timing use) blocks on its result inside its timing: results ready only
    after 1/16 s read 1/16 s each, and each call was waited for once. (The only timing test
    had timed ``time.sleep``, which returns when done: no block was needed there.)"""
    from benchmarks import harness

    clock, waits = Clock(), []
    monkeypatch.setattr(harness, "time", clock)

    def later(seconds):
        return lambda: Pending(clock, seconds, waits)

    median, samples = harness.time_calls(later(0.0625), 3, burn_in=2)
    assert (median, samples) == (0.0625, [0.0625] * 3)
    assert len(waits) == 5  # the burn-in's calls blocked on too, untimed

    waits.clear()
    compiled_for = []

    def compile_timed(jitted, *args):
        compiled_for.append(args)
        return (lambda *args: Pending(clock, 0.125, waits)), 2.5

    monkeypatch.setattr(harness.runtime, "compile_timed", compile_timed)
    timing = harness.time_compiled("fn", ("state", "x"), repeats=3)
    assert compiled_for == [("state", "x")]
    assert timing == {"compile_s": 2.5, "first_call_s": 0.125, "median_s": 0.125}
    assert len(waits) == 1 + 1 + 3  # the first call, the burn-in, the timed calls

    waits.clear()
    runners = {"slow": later(0.25), "fast": later(0.0625)}
    assert harness.in_turns(runners, 2) == {"slow": [0.25] * 2, "fast": [0.0625] * 2}
    assert harness.interleaved(runners, 3) == {"slow": 0.25, "fast": 0.0625}
    assert len(waits) == 2 * (1 + 2) + 2 * (1 + 3)


def test_a_benchmark_step_is_a_long_runs_step_without_the_calls_own_cost(monkeypatch):
    """Each runner is timed in calls of 1 and of K steps, in turns; the call's own cost comes
    off and is spread over the 500 steps per call rnnjax train runs. A runner whose call
    costs 30 ms besides 60 ms a step reads 60 ms a step and 30/500 ms, where the K-step
    call's average would read 67.5 at K = 4. Timed on a clock that moves by what each call
    takes (:class:`Clock`): the runner had slept and been read within 15 and 30%, which a
    busy machine broke."""
    from benchmarks import harness
    from benchmarks.harness import interleaved

    clock, counts = Clock(), []
    monkeypatch.setattr(harness, "time", clock)

    def run(count=None):
        counts.append(count)
        clock.advance(0.03 + 0.06 * (count or 4))

    seconds = interleaved(flax_peers.calls_of({"slow": (run, 0.0)}, 4), 3)
    assert counts == [1, 4] * 4  # burn-in and 3 rounds, in turns
    assert seconds == {"slow (1)": pytest.approx(0.09), "slow (4)": pytest.approx(0.27)}
    row = flax_peers.step_columns("slow", seconds["slow (1)"], seconds["slow (4)"], 4, 500)
    assert row["slow call ms"] == pytest.approx(30)
    assert row["slow ms"] == pytest.approx(60 + 30 / 500)
    assert row["slow 1-step call (median ms)"] == pytest.approx(90)
    assert row["slow 4-step call (median ms)"] == pytest.approx(270)


def test_the_flax_benchmark_times_a_child_in_calls_of_1_and_k_steps(tmp_path, monkeypatch):
    """A choice with XLA flags runs in a child process, which runs each call's count of
    steps (``run COUNT``); the row holds both calls' medians, the step and the call's cost,
    and the markdown table the step's ms only. The lines the child reads are recorded (the
    count given the runner had been, which a runner sending K whatever it was given
    passed), and the child runs the count its line asks
    (test_the_child_runs_the_count_of_steps_each_line_asks)."""
    chosen = Config(batch_size=8, xla_flags="--xla_cpu_prefer_vector_width=256",
                    feed="device")
    monkeypatch.setattr(flax_peers, "user_config", lambda *args: (chosen, "measured: flags"))
    sent = []

    class Recorded(flax_peers.ChildRunner):
        def _send(self, line):
            sent.append(line)
            return super()._send(line)

    monkeypatch.setattr(flax_peers, "ChildRunner", Recorded)
    flax_peers.main(["--cases", "rows:8", "--cells", "simple_rnn", "--apis", "linen",
                     "--rounds", "1", "--steps-per-call", "3", "--max-full-unroll", "0",
                     "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "flax_peers.json").read_text())["rows"]
    for name in ("rnnjax (as rnnjax train)", "rnnjax (its choice without its process settings)",
                 "flax.linen unroll=1"):
        one = row[f"{name} 1-step call (median ms)"]
        assert one > 0 and row[f"{name} 3-step call (median ms)"] > 0
        assert 0 <= row[f"{name} call ms"] <= one  # at most the 1-step call
        assert row[f"{name} ms"] > 0
    spec, *runs = sent
    assert (json.loads(spec)["batch"], json.loads(spec)["steps"]) == (8, 3)
    assert runs == ["run 1", "run 3"] * 2  # burn-in and one round, each call its own count
    (header,) = [line for line in (tmp_path / "flax_peers.md").read_text().splitlines()
                 if line.startswith("| order |")]
    assert "| rnnjax (as rnnjax train) ms |" in header and "call ms" not in header
    assert "median" not in header


def test_the_unrolled_rnnjax_runners_are_xlas_form_where_the_choice_is_native(monkeypatch):
    """The native kernels have no loop to unroll: beside a native choice, "rnnjax
    unroll=1/full" time the cell's default XLA form at those unrolls, not the native program
    again (which they did until 2026-12-06); beside an XLA choice, the unrolls it is not."""
    timed = []
    monkeypatch.setattr(flax_peers, "rnnjax_runner",
                        lambda data, idx, config: timed.append(config) or (None, 0.0))
    images, labels = jnp.zeros((8, 28, 28), jnp.float32), jnp.zeros((8,), jnp.int32)
    data = Arrays(images, labels, images, labels)
    # as the tuner records a native choice (tune.py: hoisted, product), at batch 1024,
    # where the default form's weight gradient is per step
    native = Config(batch_size=1024, backward="native", projection="hoisted",
                    weight_grad="product", unroll=1)
    runners = flax_peers.case_runners(data, "rows", 4, "simple_rnn", 2, (), native, 28)
    assert list(runners) == ["rnnjax (as rnnjax train)", "rnnjax unroll=1", "rnnjax unroll=full"]
    assert [(c.backward, c.unroll) for c in timed] == [("native", 1), ("auto", 1), ("auto", 0)]
    default = Config(batch_size=1024)
    assert all((c.projection, c.weight_grad) == (default.projection, default.weight_grad)
               for c in timed[1:])
    timed.clear()
    runners = flax_peers.case_runners(data, "rows", 4, "simple_rnn", 2, (),
                                      native.replace(backward="hand_written"), 28)
    assert list(runners) == ["rnnjax (as rnnjax train)", "rnnjax unroll=full"]
    assert [(c.backward, c.unroll) for c in timed] == [("hand_written", 1), ("hand_written", 0)]


def tiny_data(examples: int = 8) -> Arrays:
    """A dataset of ``examples`` zero images, for runners that never train on it."""
    images, labels = jnp.zeros((examples, 28, 28), jnp.float32), jnp.zeros((examples,),
                                                                             jnp.int32)
    return Arrays(images, labels, images, labels)


def test_best_flax_over_rnnjax_is_the_fastest_flax_runners_step(tmp_path, monkeypatch):
    """"best Flax / rnnjax" is the fastest Flax runner's ms per step (of linen and nnx, at
    every unroll) over rnnjax's as rnnjax train runs it; nothing had read the column, and
    the slowest Flax runner would have passed. rnnjax's other runners are no Flax runner,
    however fast. Timings given (``interleaved`` monkeypatched), no training."""
    per_step = {"rnnjax (as rnnjax train)": 0.010, "rnnjax unroll=full": 0.004,
                "flax.linen unroll=1": 0.030, "flax.linen unroll=full": 0.020,
                "flax.nnx unroll=1": 0.050, "flax.nnx unroll=full": 0.040}
    monkeypatch.setattr(flax_peers, "load_arrays", lambda config: tiny_data())
    monkeypatch.setattr(flax_peers, "to_device", lambda data: data)
    monkeypatch.setattr(flax_peers, "user_config",
                        lambda *args: (Config(batch_size=8), "untuned defaults"))
    monkeypatch.setattr(flax_peers, "case_runners", lambda *args: {
        name: (lambda count=None: None, 1.0) for name in per_step})
    monkeypatch.setattr(flax_peers, "interleaved", lambda runners, rounds: {
        f"{name} ({count})": per_step[name] * count for name in per_step for count in (1, 4)})
    flax_peers.main(["--cases", "rows:8", "--cells", "simple_rnn", "--rounds", "1",
                     "--steps-per-call", "4", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "flax_peers.json").read_text())["rows"]
    for name, seconds in per_step.items():  # no call cost: each call K times the 1-step one
        assert row[f"{name} ms"] == pytest.approx(seconds * 1e3)
    flax = [row[f"{name} ms"] for name in per_step if name.startswith("flax")]
    assert row["best Flax / rnnjax"] == pytest.approx(
        min(flax) / row["rnnjax (as rnnjax train) ms"])
    assert row["best Flax / rnnjax"] == pytest.approx(20 / 10)  # linen unroll=full's


def test_every_runner_of_a_case_is_given_the_same_data_and_batches(monkeypatch):
    """rnnjax's runners and Flax's train on the same device-resident data and the same [K, B]
    batch indices, the case's: a Flax runner given fewer rows per step (or other batches)
    would be timed on other work than rnnjax's. What each runner's program is given is
    recorded (``rnnjax_runner``, ``FLAX_PROGRAMS``), nothing compiled."""
    data = tiny_data()
    given = []
    monkeypatch.setattr(flax_peers, "rnnjax_runner",
                        lambda device_data, idx, config: given.append(
                            ("rnnjax", device_data, idx)) or (None, 0.0))
    for api in flax_peers.FLAX_PROGRAMS:
        monkeypatch.setitem(flax_peers.FLAX_PROGRAMS, api,
                            lambda device_data, idx, api=api, **kwargs: given.append(
                                (api, device_data, idx)) or (None, None, ()))
    monkeypatch.setattr(flax_peers, "compiled_runner", lambda fn, state, args: (None, 0.0))
    runners = flax_peers.case_runners(data, "rows", 4, "simple_rnn", 3, ("linen", "nnx"),
                                      Config(batch_size=4), 28)
    assert list(runners) == ["rnnjax (as rnnjax train)", "rnnjax unroll=full",
                             "flax.linen unroll=1", "flax.linen unroll=full",
                             "flax.nnx unroll=1", "flax.nnx unroll=full"]
    assert [who for who, _, _ in given] == ["rnnjax"] * 2 + ["linen"] * 2 + ["nnx"] * 2
    expected = batch_indices(len(data.train_labels), 4, 0, 3)
    assert expected.shape == (3, 4)
    for who, device_data, idx in given:
        assert device_data is data, who
        assert idx.shape == expected.shape and (np.asarray(idx) == expected).all(), who


def test_the_child_runs_the_count_of_steps_each_line_asks(monkeypatch, capsys):
    """The child (``--child``) runs as many steps as each ``run COUNT`` line asks, one call
    each, and answers ``done`` after blocking on it: with the parent's lines
    (test_the_flax_benchmark_times_a_child_in_calls_of_1_and_k_steps), a child's 1-step
    call runs one step, not K. Its runner recorded, nothing compiled."""
    from rnnjax.config import to_dict

    spec = {"config": to_dict(Config(batch_size=4)), "batch": 4, "steps": 3}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(spec) + "\nrun 1\nrun 3\nrun 1\n"))
    monkeypatch.setattr(flax_peers, "load_arrays", lambda config: tiny_data())
    monkeypatch.setattr(flax_peers, "to_device", lambda data: data)
    ran, shapes = [], []

    def runner(device_data, idx, config):
        shapes.append((idx.shape, config.batch_size))
        return (lambda count=None: ran.append(count)), 1.5

    monkeypatch.setattr(flax_peers, "rnnjax_runner", runner)
    flax_peers.child_main()
    assert shapes == [((3, 4), 4)]
    assert ran == [1, 3, 1]
    assert capsys.readouterr().out == '{"compile_s": 1.5}\ndone\ndone\ndone\n'


def test_the_peers_ms_per_step_is_each_calls_seconds_over_its_steps(tmp_path, monkeypatch):
    """Keras', PyTorch's and rnnjax's 1-step-per-call runners run the case's K steps per
    timed call: each one's ms per step is its median call's seconds over K, and its ratio to
    rnnjax's that over rnnjax's step (the ratios alone had been checked, which a wrong
    divisor shared by every peer leaves as they were). Timings given (``interleaved``
    monkeypatched), nothing trained."""
    steps = 200  # the benchmark's K at batch 8: max(10, min(200, 20000 // 8))
    seconds = {f"{peers.RNNJAX} (1)": 0.0125, f"{peers.RNNJAX} ({steps})": 2.5,
               peers.PER_STEP: 0.4, "keras3-jax unroll=True": 1.0,
               "keras3-jax unroll=False": 0.8, "pytorch eager": 1.2}
    monkeypatch.setattr(peers, "load_arrays", lambda config: tiny_data())
    monkeypatch.setattr(peers, "to_device", lambda data: data)
    monkeypatch.setattr(peers, "available", lambda module: module in ("keras", "torch"))
    run = lambda *args: None  # noqa: E731
    monkeypatch.setattr(peers, "rnnjax_runners", lambda *args: (
        {peers.RNNJAX: run, peers.PER_STEP: run}, {peers.RNNJAX: 1.0, peers.PER_STEP: 0.5},
        "untuned defaults"))
    monkeypatch.setattr(peers, "keras_step", lambda data, batch, k, unroll: (run, 2.0))
    monkeypatch.setattr(peers, "torch_step", lambda data, batch, k: (run, 0.0))
    timed = []
    monkeypatch.setattr(peers, "interleaved",
                        lambda runners, rounds: timed.append(sorted(runners)) or seconds)
    peers.main(["--batch-sizes", "8", "--repeats", "1", "--flax-cases", "",
                "--out", str(tmp_path)])
    assert timed == [sorted(seconds)]
    (row,) = read_rows(tmp_path)
    assert row["steps_timed"] == steps
    rnnjax_ms = row[f"{peers.RNNJAX} ms"]
    assert rnnjax_ms == pytest.approx(12.5)  # the 200-step call, no call cost
    for name, ms in ((peers.PER_STEP, 2.0), ("keras3-jax unroll=True", 5.0),
                     ("keras3-jax unroll=False", 4.0), ("pytorch eager", 6.0)):
        assert row[f"{name} ms"] == pytest.approx(seconds[name] / steps * 1e3)
        assert row[f"{name} ms"] == pytest.approx(ms)
        assert row[f"{name} / rnnjax"] == pytest.approx(ms / rnnjax_ms)


def test_throughputs_step_is_the_median_call_over_its_steps(monkeypatch):
    """``benchmarks.throughput``'s ms per step (and steps and samples per second) is the
    median timed call's over its K steps; compile and first call reported apart, as
    timed. Tests had asserted only ``ms_per_step > 0``: read from the first call, which
    pays its pages' first writes, it would pass. Timings given (``time_compiled``
    monkeypatched): what it is handed is recorded."""
    import jax

    from benchmarks import throughput

    handed = []

    def time_compiled(fn, args, *, repeats, carry_first):
        handed.append((args[-1].shape, repeats, carry_first))
        return {"compile_s": 3.0, "first_call_s": 0.9, "median_s": 0.2}

    monkeypatch.setattr(throughput, "time_compiled", time_compiled)
    images, labels = np.zeros((8, 28, 28), np.uint8), np.zeros((8,), np.int32)
    row = throughput.measure(jax.devices("cpu")[0], Arrays(images, labels, images, labels),
                             8, 1, 4, 7)
    assert handed == [((4, 8), 7, True)]  # K steps of batch 8, the state carried
    assert row == {"batch": 8, "unroll": 1, "ms_per_step": pytest.approx(0.2 / 4 * 1e3),
                   "steps_per_s": pytest.approx(4 / 0.2),
                   "samples_per_s": pytest.approx(8 * 4 / 0.2),
                   "compile_s": 3.0, "first_call_s": 0.9}
