"""Any image shape HxWxC reaches the model as the order says; a run that cannot fit in
memory is refused in one line before anything is allocated or written (train, eval,
predict), and an allocation that fails anyway is one line too. No TensorFlow needed."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import memory, runtime, train
from rnnjax.cli import main
from rnnjax.config import Config
from rnnjax.data.spec import DataSpec
from rnnjax.loop import train_and_evaluate
from rnnjax.model import evaluation_model, make_model, pixel_permutation, to_sequence
from rnnjax.optim import make_optimizer

HUGE = "100000000"  # --hidden-size: 4e16 bytes of recurrent kernel alone


@pytest.mark.parametrize("channels", [1, 3])
def test_to_sequence_reads_any_image_shape(channels):
    rng = np.random.default_rng(0)
    images = rng.random((2, 4, 5, channels), np.float32)
    rows = np.asarray(to_sequence(images, "rows"))
    assert rows.shape == (4, 2, 5 * channels)  # T=H steps of W*C
    for b in range(2):
        for t in range(4):
            np.testing.assert_array_equal(rows[t, b], images[b, t].reshape(-1))
    pixels = np.asarray(to_sequence(images, "pixels"))
    assert pixels.shape == (20, 2, channels)  # T=H*W steps of C
    perm = rng.permutation(20)
    permuted = np.asarray(to_sequence(images, "permuted", perm))
    for b in range(2):
        np.testing.assert_array_equal(pixels[:, b], images[b].reshape(20, channels))
        np.testing.assert_array_equal(permuted[:, b], images[b].reshape(20, channels)[perm])
    if channels == 1:  # [B, H, W] reads as [B, H, W, 1]
        for order in ("rows", "pixels"):
            np.testing.assert_array_equal(to_sequence(images[..., 0], order),
                                          to_sequence(images, order))


def test_model_takes_its_image_shape_from_the_data():
    spec = DataSpec((32, 32, 3), 7)
    model = make_model(Config(), spec)
    assert model.input_size == 96 and model.image_shape == (32, 32, 3)
    params = model.init(jax.random.key(0))
    assert params["rnn"][0]["kernel"].shape == (96, 50)
    assert params["head"]["kernel"].shape == (50, 7)
    assert model.apply(params, np.zeros((4, 32, 32, 3), np.float32)).shape == (4, 7)
    with pytest.raises(ValueError, match=r"reads \[B, 32, 32, 3\]"):
        model.apply(params, np.zeros((4, 28, 28), np.float32))
    pixels = make_model(Config(order="permuted"), spec)
    assert pixels.input_size == 3 and sorted(pixels.permutation) == list(range(1024))
    # The seed's defaults are untouched: 28x28x1, ten classes, MNIST's fixed permutation.
    seed = make_model(Config(order="permuted"))
    assert seed.image_shape == (28, 28, 1) and seed.num_classes == 10
    np.testing.assert_array_equal(
        seed.permutation, np.random.default_rng((1337, 784)).permutation(784))
    np.testing.assert_array_equal(pixel_permutation(1337), seed.permutation)


def test_too_long_a_sequence_for_the_order_is_refused():
    spec = DataSpec((160, 160, 1), 10)
    spec.check_order("rows")
    with pytest.raises(Exception, match=r"--order pixels: 160x160x1 images are 25600 time "
                                        r"steps of 1, more than the 16384 .*use --order rows"):
        spec.check_order("pixels")


def test_estimate_counts_the_real_state_and_grows_with_the_batch():
    config = Config(cell="lstm", hidden_size=24)
    model, optimizer = make_model(config), make_optimizer(config)
    state = jax.jit(functools.partial(train.create_state, model=model,
                                      optimizer=optimizer))(jax.random.key(0))
    spec = DataSpec()
    need = memory.estimate(config, model, optimizer, spec, examples=1000)
    assert need.parameters == memory.tree_bytes(state.params)
    assert need.optimizer == memory.tree_bytes(state.opt_state)
    assert need.dataset == 1000 * (28 * 28 * 4 + 4)
    small = memory.training_activations(model, state.params, spec, 10)
    large = memory.training_activations(model, state.params, spec, 40)
    # at least the per-step hidden states the backward pass keeps, 4x for 4x the batch
    assert small >= 28 * 10 * 24 * 4 and large == 4 * small


@pytest.mark.parametrize("kwargs", [
    {},  # the seed
    {"cell": "lstm", "hidden_size": 96, "eval_batch_size": 2000},
    {"cell": "gru", "hidden_size": 32, "num_layers": 2, "bidirectional": True},
    {"cell": "lstm", "hidden_size": 16, "num_layers": 3, "order": "pixels",
     "eval_batch_size": 500},
    {"eval_batch_size": 3000},  # the set padded to 12,000
    {"unroll": 0},  # each step's input products scheduled ahead of the chain
    {"cell": "gru", "eval_unroll": 0, "bidirectional": True},
    {"cell": "lstm", "unroll": 4},
    {"cell": "lstm", "compute_dtype": "bfloat16"},
    {"order": "pixels", "hidden_size": 32, "unroll": 16, "eval_batch_size": 1000},
    {"hidden_size": 8, "unroll": 0},  # inputs wider than the gates
])
def test_the_evaluation_estimate_is_near_xlas_own_plan(kwargs):
    """An evaluation chunk's estimate against what XLA plans for it (its temporary
    buffers): it charged every layer's inputs and outputs at every step, 24x the seed's
    and 800x a pixel-order SimpleRNN's, and refused runs that fit; unrolled or in bfloat16
    it read a tenth to a half of the plan, and let through runs that did not."""
    from rnnjax.loop import initial_state

    config = Config(**kwargs)
    model = evaluation_model(config, make_model(config))
    spec = DataSpec()
    steps, features = spec.sequence(config.order)
    state = jax.eval_shape(functools.partial(initial_state, model, make_optimizer(config)), 0)
    program = jax.jit(functools.partial(train.evaluate_sequences, model=model,
                                        chunk=config.eval_batch_size)).lower(
        state.params, jax.ShapeDtypeStruct((steps, 10000, features), jnp.float32),
        jax.ShapeDtypeStruct((10000,), jnp.int32)).compile()
    planned = program.memory_analysis().temp_size_in_bytes
    estimated = memory.evaluation_activations(model, state.params, spec,
                                              config.eval_batch_size, 10000)
    assert 0.95 * planned <= estimated <= 2.5 * planned, (estimated, planned)


def test_the_evaluation_estimate_takes_a_chunk_no_larger_than_the_test_set():
    config = Config(order="pixels", hidden_size=512)  # --eval-batch-size 10000
    model, optimizer = make_model(config), make_optimizer(config)
    small = memory.estimate(config, model, optimizer, DataSpec(), training=False,
                            test_examples=60)
    full = memory.estimate(config, model, optimizer, DataSpec(), training=False)
    params = memory.abstract_state(model, optimizer).params
    assert (small.batch, full.batch) == (60, 10000)
    assert small.activations == memory.evaluation_activations(model, params, DataSpec(), 60,
                                                              60)
    assert full.activations > 100 * small.activations


def test_cpu_devices_are_charged_together_against_the_hosts_ram():
    """CPU devices share the host's RAM: on 8 of them a run needs 8 devices' memory of it,
    refused where one device's fits (it could be charged as one device's), and said so:
    "800 MiB for its 8 devices together" (it said "on each of 8 devices", each device's
    need being 100); a GPU's or TPU's memory is each device's own, its need per device
    ("on each of 8 devices")."""
    mib = 2**20
    need = memory.Estimate(parameters=60 * mib, optimizer=0, gradients=0,
                           activations=40 * mib, dataset=0, batch=32)
    host = (3 * need.total, "the host has 300.0 MiB of RAM available", False)
    memory.check_fits(need, devices=1, room=host)
    memory.check_fits(need, devices=3, room=host)
    with pytest.raises(memory.OutOfMemory, match=r"^the run needs about 800\.0 MiB of memory "
                                                 r"for its 8 devices together \(each: "
                                                 r"parameters 60\.0 MiB, activations of "
                                                 r"32 examples 40\.0 MiB\) but the host has "
                                                 r"300\.0 MiB of RAM available; use a smaller"):
        memory.check_fits(need, devices=8, room=host)
    device = (3 * need.total, "gpu:0 has 300.0 MiB free", True)
    memory.check_fits(need, devices=8, room=device)
    with pytest.raises(memory.OutOfMemory, match=r"^the run needs about 100\.0 MiB of memory "
                                                 r"on each of 8 devices \(parameters 60\.0 "
                                                 r"MiB, .*\) but gpu:0 has 50\.0 MiB free;"):
        memory.check_fits(need, devices=8, room=(need.total // 2, "gpu:0 has 50.0 MiB free",
                                                 True))


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("rnnjax: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("tuning", [False, True])
def test_a_model_that_cannot_fit_is_refused_before_allocating(tuning, capsys, tmp_path,
                                                              monkeypatch):
    """With tuning on, before it: no tuner child starts (each would draw the parameters
    first), where the backend will be the CPU's."""
    def allocate(*args, **kwargs):
        raise AssertionError("the state was allocated: the estimate did not refuse first")

    monkeypatch.setattr("rnnjax.loop.init_state", allocate)
    if tuning:
        from rnnjax import tune

        def child(*args, **kwargs):
            raise AssertionError("a tuner child started: the estimate did not refuse first")

        monkeypatch.delenv(tune.ENV_VAR, raising=False)
        monkeypatch.setenv("JAX_PLATFORMS", "cpu")
        monkeypatch.setattr(tune, "cache_dir", lambda compile_cache: tmp_path / "tune")
        monkeypatch.setattr(tune, "run_child", child)
    work = tmp_path / "run"
    code = main(["train", "--hidden-size", HUGE, "--workdir", str(work),
                 "--compile-cache", "off"])
    err = one_line(capsys)
    assert code == 2
    assert "needs about 142.1 PiB of memory (parameters 35.5 PiB, optimizer state 71.1 PiB" \
        in err
    assert "of RAM available" in err or " free" in err
    assert "use a smaller --hidden-size or --num-layers" in err
    assert not work.exists()


def test_the_check_before_tuning_starts_no_backend(monkeypatch):
    """``rnnjax.cli.check_model``'s estimate, before tuning, in a fresh process: a model
    that fits (native: traced in its hand-written form) and one that cannot, and JAX's
    backend not started after either (the tuner's choice of XLA flags and CPUs still
    applies). The CPU's backend is known ahead from $JAX_PLATFORMS, else from the
    accelerator plugins installed."""
    script = textwrap.dedent("""
        from rnnjax import cli, runtime
        from rnnjax.config import Config, ConfigError

        cli.check_model(Config(backward="native"), examples=70000)
        try:
            cli.check_model(Config(hidden_size=100_000_000))
        except ConfigError as e:
            print("refused:", e)
        print("started:", runtime.backend_started())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True).stdout
    assert "refused: the run needs about 142.1 PiB" in out and "started: False" in out
    for platforms, cpu in (("cpu", True), ("cuda,cpu", False), ("tpu", False)):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert runtime.starts_on_cpu() is cpu
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(runtime, "installed", lambda names: "libtpu" in names)
    assert not runtime.starts_on_cpu()
    monkeypatch.setattr(runtime, "installed", lambda names: False)
    assert runtime.starts_on_cpu()


def test_an_allocation_that_fails_anyway_is_one_line(capsys, tmp_path, monkeypatch):
    """Without the estimate, XLA's own allocation fails: one line too, nothing written."""
    monkeypatch.setattr(memory, "check_fits", lambda *a, **k: None)
    work = tmp_path / "run"
    code = main(["train", "--hidden-size", HUGE, "--workdir", str(work),
                 "--compile-cache", "off"])
    err = one_line(capsys)
    assert code == 2
    assert "out of memory: the run asked for 35.5 PiB (40000000000000000 bytes) but" in err
    assert not work.exists()


@pytest.fixture(scope="module")
def too_large_checkpoint(tmp_path_factory):
    """A checkpoint of a tiny run whose recorded config is then a model that cannot fit."""
    work = tmp_path_factory.mktemp("oom") / "run"
    config = Config(steps=2, hidden_size=4, eval_every=1, compile_cache="off")
    train_and_evaluate(config, work, out=io.StringIO(), progress=False)
    [meta_file] = (work / "checkpoints" / "2" / "meta").glob("metadata")
    meta = json.loads(meta_file.read_text())
    meta["config"]["hidden_size"] = int(HUGE)
    meta_file.write_text(json.dumps(meta))
    return work


def test_eval_refuses_a_checkpoint_that_cannot_fit(capsys, too_large_checkpoint):
    out = too_large_checkpoint / "confusion.png"
    capsys.readouterr()
    code = main(["eval", str(too_large_checkpoint), "--out", str(out)])
    err = one_line(capsys)
    assert code == 2 and "simple_rnn 100000000 model needs about" in err, err
    assert "parameters 35.5 PiB" in err and "use a smaller --hidden-size" in err
    assert not out.exists()


def test_predict_refuses_a_checkpoint_that_cannot_fit(capsys, too_large_checkpoint, mnist,
                                                       tmp_path):
    from PIL import Image

    digit = tmp_path / "digit.png"
    Image.fromarray(np.asarray(mnist.test_images[0])).save(digit)
    capsys.readouterr()
    code = main(["predict", str(too_large_checkpoint), str(digit)])
    err = one_line(capsys)
    assert code == 2 and "simple_rnn 100000000 model needs about" in err, err
    assert capsys.readouterr().out == ""
