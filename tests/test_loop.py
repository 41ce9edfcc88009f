"""The loop on real MNIST: it learns, both feeds agree, the seed's schedule holds."""

from __future__ import annotations

import collections
import functools
import io
import json
import types

import jax
import numpy as np
import pytest

from rnnjax.config import Config, ConfigError
from rnnjax.loop import eval_steps, init_state, segments, train_and_evaluate
from rnnjax.metrics import steps_phrase
from rnnjax.model import make_model
from rnnjax.optim import make_optimizer
from rnnjax.train import create_state


def test_eval_schedule_is_the_seeds():
    assert eval_steps(Config()) == [0, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000]
    assert eval_steps(Config(steps=1200, eval_every=500)) == [0, 500, 1000, 1199]
    parts = list(segments(Config(steps=1001, eval_every=500, steps_per_call=300)))
    assert parts == [(0, 1, True), (1, 300, False), (301, 200, True),
                     (501, 300, False), (801, 200, True)]
    assert sum(count for _, count, _ in parts) == 1001


def test_short_run_learns(tmp_path):
    out = io.StringIO()
    result = train_and_evaluate(Config(steps=601, eval_every=300), tmp_path, out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step     0  test cost:  ")
    assert "test accuracy:  " in lines[2]
    assert result.history[-1]["step"] == 600
    # A bar from the spread over seeds, not from one run: a change of summation order
    # (a new unroll, a fused cell) moves a run like a new seed. After 601 steps seeds 0-8
    # reach 0.764-0.836 (mean 0.800, sd 0.026; seed 0 0.806; CPU, jax 0.10.2, measured
    # for issue 13); 0.70 is 0.06 under the worst of them, and far above chance (0.10).
    assert result.summary["final_test_accuracy"] > 0.70
    records = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "test"] == [0, 300, 600]
    assert (tmp_path / "metrics.csv").read_text().startswith("step,split,loss,accuracy")
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 601
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 601


def test_messages_count_steps_in_words():
    assert [steps_phrase(n) for n in (0, 1, 2, 4001)] == [
        "0 steps", "1 step", "2 steps", "4001 steps"]
    out = io.StringIO()
    train_and_evaluate(Config(steps=1, hidden_size=8, eval_batch_size=5000), out=out)
    assert ") after 1 step\n" in out.getvalue(), out.getvalue()


def test_stream_feed_equals_device_feed():
    config = Config(steps=40, eval_every=20, hidden_size=16, steps_per_call=7)
    device = train_and_evaluate(config, out=io.StringIO())
    stream = train_and_evaluate(config.replace(feed="stream"), out=io.StringIO())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 device.state.params, stream.state.params)
    for a, b in zip(device.history, stream.history, strict=True):
        assert a["test_accuracy"] == b["test_accuracy"]
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)


def _with_test_images(mnist, n):
    """A loader of ``mnist`` with its first ``n`` test images only: a run's evaluations
    cheap (its training, and so its train metrics, are the full dataset's)."""
    from rnnjax.data.sources import IDX_SPEC, Dataset

    arrays = mnist._replace(test_images=mnist.test_images[:n],
                            test_labels=mnist.test_labels[:n])
    return lambda config: Dataset(arrays, IDX_SPEC, f"MNIST, {n} test images")


def test_train_metrics_logged_are_the_steps_since_the_last_evaluation(mnist,
                                                                     worker_compile_cache):
    """The train loss and accuracy logged at an evaluation are the means over the steps
    since the one before (step 40's: steps 21-40), not since step 0: a loop that never
    reset its sums after a log point logged 2.2961 for 2.2451 at step 40 here, and the
    resume tests, wrong alike on both sides, let it through. A run logging every step gives
    each step's own."""
    config = Config(steps=41, eval_every=20, batch_size=8, hidden_size=16, steps_per_call=7,
                    compile_cache=worker_compile_cache)  # the next test's programs
    load = _with_test_images(mnist, 100)
    every_step = train_and_evaluate(config.replace(eval_every=1), out=io.StringIO(),
                                    load=load).history
    logged = train_and_evaluate(config, out=io.StringIO(), load=load).history
    assert [r["step"] for r in every_step] == list(range(41))
    assert [r["step"] for r in logged] == [0, 20, 40]
    for record, steps in zip(logged, (range(0, 1), range(1, 21), range(21, 41)), strict=True):
        for name in ("train_loss", "train_accuracy"):
            mean = np.mean([every_step[s][name] for s in steps])
            assert record[name] == pytest.approx(mean, rel=1e-6), (record["step"], name)


def test_train_metrics_stay_on_the_device_until_their_log_point(mnist, worker_compile_cache,
                                                               monkeypatch):
    """Seven compiled train calls and three evaluations bring metrics to the host six
    times, a test and a train summary at each evaluation: the sums of the calls between
    stay on the device (a summary after every call would wait on each, and the host would
    no longer queue the next call while the device runs one)."""
    from rnnjax import metrics

    summaries = []
    summarize = metrics.summarize

    def counted(sums):
        summaries.append(int(jax.device_get(sums["count"])))
        return summarize(sums)

    monkeypatch.setattr(metrics, "summarize", counted)
    config = Config(steps=40, eval_every=20, batch_size=8, hidden_size=16, steps_per_call=7,
                    compile_cache=worker_compile_cache)
    assert len(list(segments(config))) == 7
    train_and_evaluate(config, out=io.StringIO(), load=_with_test_images(mnist, 100))
    # At each of steps 0, 20 and 39: the test set's 100 images, then the train examples
    # of the steps since the last evaluation (1, 20 and 19 steps of 8).
    assert summaries == [100, 8, 100, 160, 100, 152]


@pytest.mark.parametrize("seed", [0, 1337, 2**31 - 1, 2**31, 2**32 - 1])
def test_init_state_is_the_seeds_key_made_eagerly(seed, xla_compiles, bitwise_equal):
    """One compiled call makes the key and the state: the bits of the eager
    ``jax.random.key(seed)``, split, for every seed the flags accept (below 2**32: JAX
    keeps a seed's low 32 bits without x64, so seeds 2**32 apart were one run)."""
    config = Config(hidden_size=8, seed=seed)
    model, optimizer = make_model(config), make_optimizer(config)
    state = init_state(config, model, optimizer)
    assert xla_compiles == ["jit(initial_state)"]
    eager = create_state(jax.random.split(jax.random.key(seed))[0], model, optimizer)
    bitwise_equal(state, eager)


@pytest.mark.parametrize("config", [
    Config(),
    Config(cell="lstm", num_layers=2, bidirectional=True, hidden_size=33),
    Config(cell="gru", order="pixels", hidden_size=128, optimizer="keras_adam"),
    Config(cell="irnn", compute_dtype="bfloat16", optimizer="sgd"),
    Config(cell="flax.linen:OptimizedLSTMCell"),
], ids=["seed", "lstm-2-bidirectional", "gru-pixels", "irnn-bfloat16", "flax-lstm"])
def test_the_initial_state_compiled_to_run_once_has_the_defaults_bits(config, bitwise_equal):
    """runtime.run_once compiles the initial state with its own options (on a CPU, LLVM's
    level 1): a faster compile, and the bits of the program compiled at XLA's defaults (a
    draw's rounding is the run's: every later step starts from it)."""
    from rnnjax import runtime
    from rnnjax.loop import initial_state

    model, optimizer = make_model(config), make_optimizer(config)
    seed = np.int64(config.seed)
    jitted = jax.jit(functools.partial(initial_state, model, optimizer))
    assert runtime.RUN_ONCE_OPTIONS.get(jax.default_backend())  # the options under test
    bitwise_equal(init_state(config, model, optimizer), jitted.lower(seed).compile()(seed))


@pytest.mark.parametrize("feed", ["device", "stream"])
def test_a_run_compiles_its_train_step_and_evaluation_once(feed, xla_compiles):
    """Seven train calls of 1 to 7 steps (device feed) or 40 single steps (stream feed) and
    three evaluations: one XLA compilation each of the train step and of the evaluation,
    and of the sequences made once (the test set's, and the training set's for the device
    feed)."""
    config = Config(steps=40, eval_every=20, hidden_size=16, steps_per_call=7, feed=feed,
                    compile_cache="off")
    train_and_evaluate(config, out=io.StringIO())
    compiled = collections.Counter(xla_compiles)
    step = "jit(train_steps)" if feed == "device" else "jit(train_step)"
    assert compiled[step] == 1 and compiled["jit(evaluate_sequences)"] == 1, compiled
    assert compiled["jit(sequences)"] == (2 if feed == "device" else 1), compiled


@pytest.mark.parametrize("feed", ["device", "stream"])
def test_compile_time_is_kept_out_of_the_training_time(feed, mnist, worker_compile_cache,
                                                       monkeypatch):
    """A compile that takes 100 s (on a clock of the loop's own that the compile moves, the
    real one besides) counts in compile_s and not in train_s nor in the steps per second:
    the summary line promises compile time apart from train steps/s. A loop that kept the
    training clock running through the train step's compile could report a cold run at 9
    steps/s for 657 (21 steps: compile 2.92 s, train 2.34 s for 0.03 s), and a test of the
    real clock would depend on the load."""
    from rnnjax import loop, runtime

    skew = [0.0]  # the seconds the fake compiles have taken
    real_clock, real_compile = loop.time.perf_counter, runtime.compile_timed

    def slow_compile(*args, **kwargs):
        compiled, seconds = real_compile(*args, **kwargs)
        skew[0] += 100.0
        return compiled, seconds + 100.0

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(
        perf_counter=lambda: real_clock() + skew[0]))
    monkeypatch.setattr(runtime, "compile_timed", slow_compile)
    config = Config(steps=21, eval_every=10, batch_size=8, hidden_size=8, feed=feed,
                    steps_per_call=7, compile_cache=worker_compile_cache)
    out = io.StringIO()
    summary = train_and_evaluate(config, out=out, load=_with_test_images(mnist, 100)).summary
    assert skew[0] == 200.0  # the evaluation's compile and the train step's, once each
    assert summary["compile_s"] >= 200.0
    assert summary["train_s"] < 100.0, summary  # seconds of real training, not the compile
    assert summary["steps_per_s"] == pytest.approx(21 / summary["train_s"])
    assert summary["wall_s"] >= 200.0  # the wall clock counts the compiles
    line = out.getvalue()
    assert f"compile {summary['compile_s']:.2f} s" in line
    assert f"train {summary['train_s']:.2f} s ({summary['steps_per_s']:.0f} steps/s)" in line


def test_the_evaluations_run_at_eval_unroll_with_the_same_sums(monkeypatch):
    """--eval-unroll changes the evaluation's program only: the train step keeps --unroll,
    and every evaluation's sums are the same, bit for bit (what rnnjax.tune checks before
    it sets it)."""
    from rnnjax import train

    traced = []
    evaluate = train.evaluate_sequences

    def spy(*args, model, **kwargs):
        traced.append(model.unroll)
        return evaluate(*args, model=model, **kwargs)

    monkeypatch.setattr(train, "evaluate_sequences", spy)
    config = Config(steps=21, eval_every=10, hidden_size=8, unroll=0, compile_cache="off")
    runs = [train_and_evaluate(config.replace(eval_unroll=u), out=io.StringIO())
            for u in (-1, 1)]
    assert traced == [0, 1]  # each run's evaluation traced once, at its unroll
    plain, other = ([{k: v for k, v in r.items() if k != "wall_s"} for r in run.history]
                    for run in runs)
    assert plain == other and len(plain) == 3
    assert [r.state.params for r in runs] and jax.tree.all(jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
        runs[0].state.params, runs[1].state.params))


def test_batch_larger_than_dataset_is_refused():
    with pytest.raises(ConfigError, match="larger than the 60000 training examples"):
        train_and_evaluate(Config(batch_size=60001), out=io.StringIO())


@pytest.mark.slow
def test_seed_experiment_reaches_090():
    """The whole seed recipe: 4001 steps, batch 50, in order."""
    out = io.StringIO()
    result = train_and_evaluate(Config(), out=out)
    assert len(result.history) == 9
    # A bar from the spread over seeds, not from one run (seed 0 ends at 0.9265): a change
    # of summation order moves a run like a new seed. Over seeds 1-6 the recipe ends at
    # 0.914-0.941 (mean 0.931), Keras 3 at 0.917-0.933 (CPU, jax 0.10.2; issue 13). 0.90
    # is 0.014 under the worst seed; a recipe that learns less than Keras' fails it.
    assert result.summary["final_test_accuracy"] >= 0.90


def test_output_goes_to_the_streams_of_the_call_not_of_the_import(monkeypatch):
    """The progress line and the evaluation lines use sys.stderr / sys.stdout as they are
    when called (a default bound when the module was imported would keep a stream since
    replaced or closed, as pytest's captures are)."""
    from rnnjax import metrics

    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr("sys.stdout", out)
    assert metrics.Progress(10).stream is err
    train_and_evaluate(Config(steps=2, eval_every=1, hidden_size=4, eval_batch_size=5000,
                              compile_cache="off"))
    assert out.getvalue().startswith("step     0  test cost:")
