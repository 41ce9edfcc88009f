"""Data parallelism: mesh and sharding helpers, the batch divisibility error, and results
that do not depend on the device or process count (8 forced CPU devices; two processes).

A device count is fixed when JAX starts, so the multi-device runs happen in subprocesses
(this file is also their script: ``python tests/test_parallel.py SPEC_JSON``) and are
compared with a one-device run in this process.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from rnnjax import parallel, train
from rnnjax.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]
# Small but real: 12 steps in calls of 5 (three segments), evaluations after 0, 5 and 11,
# batch 32 (divides over 1, 2, 4 and 8 devices).
RUN = {"steps": 12, "eval_every": 5, "batch_size": 32, "hidden_size": 16,
       "steps_per_call": 5, "eval_batch_size": 4000}
RTOL, ATOL = 1e-5, 1e-6


# --- the subprocess side -----------------------------------------------------------------


def _flat_params(params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _worker(spec: dict) -> None:
    """Train each of ``spec["runs"]`` (name -> Config overrides, plus optional ``workdir``,
    a directory under ``spec["out"]``, and ``resume``) in order, and save its parameters and
    evaluation history under ``spec["out"]`` (process 0 only); optional extra checks."""
    from rnnjax.loop import train_and_evaluate

    out = Path(spec["out"])
    report: dict = {}  # nothing may touch JAX before the loop starts jax.distributed
    for name, overrides in spec["runs"].items():
        overrides = dict(overrides)
        workdir = overrides.pop("workdir", None)
        resume = overrides.pop("resume", False)
        for lost in overrides.pop("drop", ()):  # every process, before any runs on
            (out / workdir / lost).unlink(missing_ok=True)
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"{name} dropped {lost}")
        start, text = time.perf_counter(), io.StringIO()
        result = train_and_evaluate(Config(**{**spec.get("base", {}), **overrides}),
                                    workdir and out / workdir, out=text, resume=resume)
        report[name] = {"history": result.history, "s": time.perf_counter() - start,
                        "mesh_devices": result.summary["mesh_devices"],
                        "device_line": next(line for line in text.getvalue().splitlines()
                                            if line.startswith("device: "))}
        if jax.process_index() == 0:
            np.savez(out / f"{name}.npz", **_flat_params(result.state.params))
    report.update(devices=jax.device_count(), processes=jax.process_count())
    if spec.get("evaluate"):
        report["evaluate"] = {chunk: _evaluation(chunk, sharded=True)
                              for chunk in spec["evaluate"]}
    if spec.get("checks"):
        try:
            train_and_evaluate(Config(**{**RUN, "batch_size": 50}), out=io.StringIO())
        except ConfigError as e:
            report["divisibility_error"] = str(e)
        report["collectives"] = _collectives()
        # The native kernels (custom calls, no sharding rule) each on its device's rows.
        report["native_collectives"] = {cell: _collectives(cell=cell, backward="native")
                                        for cell in ("simple_rnn", "lstm", "gru")}
    if jax.process_index() == 0:
        (out / "report.json").write_text(json.dumps(report))


EVAL_EXAMPLES = 250


def _evaluation(chunk: int, sharded: bool) -> dict[str, float]:
    """``train.evaluate`` of a fresh hidden-8 model on the first 250 MNIST test examples,
    ``chunk`` at a time: on one device, or with each chunk split over every device."""
    from rnnjax.data.idx import load_idx_dir
    from rnnjax.data.sources import EMBEDDED_MNIST, MNIST_MD5
    from rnnjax.model import make_model
    from rnnjax.optim import make_optimizer
    from tests.jaxprs import equations

    data = load_idx_dir(EMBEDDED_MNIST, MNIST_MD5)
    config = Config(hidden_size=8)
    model = make_model(config)
    params = train.create_state(jax.random.key(0), model, make_optimizer(config)).params
    dp = parallel.DataParallel(parallel.make_mesh(num_devices=0 if sharded else 1))
    images = dp.replicate(data.test_images[:EVAL_EXAMPLES] / np.float32(255))
    labels = dp.replicate(data.test_labels[:EVAL_EXAMPLES])
    evaluate = lambda p, x, y: train.evaluate(  # noqa: E731
        p, x, y, model=model, chunk=chunk, batch_sharding=dp.batch if sharded else None)
    sums = jax.jit(evaluate)(dp.replicate(params), images, labels)
    padded = [eqn.outvars[0].aval.shape[1]  # the examples of every padded [T, N, F] array
              for eqn in equations(jax.make_jaxpr(evaluate)(params, images, labels).jaxpr)
              if eqn.primitive.name == "pad" and eqn.outvars[0].aval.ndim == 3]
    return {**{name: float(value) for name, value in jax.device_get(sums).items()},
            "rows": padded[0] if padded else EVAL_EXAMPLES}


def _collectives(**overrides) -> dict[str, int]:
    """Collectives in the compiled, 8-way sharded ``train_steps`` (of ``RUN`` with
    ``overrides``): the gradients must be all-reduced, never the activations all-gathered."""
    import functools

    from rnnjax.model import make_model
    from rnnjax.optim import make_optimizer

    config = Config(**RUN, **overrides)
    dp = parallel.DataParallel.from_config(config)
    model, optimizer = dp.model(make_model(config)), make_optimizer(config)
    state = dp.replicate(train.create_state(jax.random.key(0), model, optimizer))
    sequences = dp.replicate(np.zeros((28, 100, 28), np.float32))
    labels = dp.replicate(np.zeros((100,), np.int32))
    idx = dp.shard_steps(np.zeros((5, config.batch_size), np.int32))
    fn = jax.jit(functools.partial(train.train_steps, model=model, optimizer=optimizer),
                 out_shardings=dp.replicated)
    text = fn.lower(state, sequences, labels, idx).compile().as_text()
    return {op: text.count(f" {op}(") for op in ("all-reduce", "all-gather", "all-to-all")}


# --- the pytest side ---------------------------------------------------------------------


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(
        XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def _launch(spec: dict, devices: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
        env=_env(devices), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            output, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, f"worker failed ({p.returncode}):\n{output[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def _load(directory: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(directory / f"{name}.npz") as f:
        return dict(f)


def _assert_same(params: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    assert params.keys() == reference.keys()
    for key, value in reference.items():
        np.testing.assert_allclose(params[key], value, rtol=RTOL, atol=ATOL, err_msg=key)


def _assert_same_history(history: list[dict], reference: list[dict]) -> None:
    assert [h["step"] for h in history] == [h["step"] for h in reference]
    for a, b in zip(history, reference, strict=True):
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=2e-4)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def one_device():
    """The reference: this process, one device, the device feed."""
    from rnnjax.loop import train_and_evaluate

    result = train_and_evaluate(Config(**RUN, num_devices=1), out=io.StringIO())
    assert result.summary["mesh_devices"] == 1
    return _flat_params(result.state.params), result.history


def test_mesh_and_shardings():
    mesh = parallel.make_mesh(num_devices=1)
    assert mesh.axis_names == ("data",) and mesh.size == 1
    assert parallel.make_mesh().size == jax.local_device_count()
    dp = parallel.DataParallel(mesh)
    assert dp.replicated.spec == jax.sharding.PartitionSpec()
    assert dp.batch.spec == jax.sharding.PartitionSpec("data")
    assert dp.steps.spec == jax.sharding.PartitionSpec(None, "data")
    state = dp.replicate({"w": np.ones((3, 2), np.float32), "step": np.int32(4)})
    assert state["w"].sharding == dp.replicated and int(state["step"]) == 4
    idx = dp.shard_steps(np.arange(12, dtype=np.int32).reshape(3, 4))
    assert idx.sharding == dp.steps and idx.shape == (3, 4)
    assert dp.rows(8) == slice(0, 8)  # one process owns every row
    x = dp.global_batch(np.ones((8, 28, 28), np.float32), 8)
    assert x.shape == (8, 28, 28) and x.sharding == dp.batch
    assert dp.describe()["processes"] == 1
    with pytest.raises(ConfigError, match="--num-devices 99 but this process sees only"):
        parallel.select_devices(99)


def test_batch_must_divide_over_devices():
    parallel.check_batch(48, 8)
    with pytest.raises(ConfigError, match=r"^--batch-size 50 does not divide over 8 devices; "
                       r"use a multiple of 8 such as 48 or 56"):
        parallel.check_batch(50, 8)
    with pytest.raises(ConfigError, match=r"such as 4 \("):
        parallel.check_batch(3, 4)


def test_parallel_config_is_validated():
    assert Config().num_devices == 0 and Config().num_processes == 1
    with pytest.raises(ConfigError, match="--num-devices must be"):
        Config(num_devices=-1)
    with pytest.raises(ConfigError, match="needs --coordinator-address"):
        Config(num_processes=2)
    with pytest.raises(ConfigError, match=r"--process-id 2 must be in 0 \.\. 1"):
        Config(num_processes=2, process_id=2, coordinator_address="localhost:1234")
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        Config(coordinator_address="localhost")
    with pytest.raises(ConfigError, match="localhost:70000: port 70000 is not a port"):
        Config(coordinator_address="localhost:70000")  # was an OverflowError's traceback
    Config(coordinator_address="auto")
    assert parallel.initialize(Config()) is False  # one process: nothing to start


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_a_cluster_jax_cannot_detect_is_one_line(how, tmp_path):
    """``--coordinator-address auto`` (or ``JAX_COORDINATOR_ADDRESS`` alone) where JAX
    detects no cluster: jax.distributed's ValueError was a traceback, exit 1."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "TPU_"))}
    argv = [sys.executable, "-m", "rnnjax", "train", "--steps", "2", "--hidden-size", "8",
            "--no-tune", "--compile-cache", "off", "--workdir", str(tmp_path / "run")]
    if how == "flag":
        argv += ["--coordinator-address", "auto"]
    else:
        env["JAX_COORDINATOR_ADDRESS"] = "localhost:1"
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("rnnjax: error: jax.distributed did not start (")
    assert done.stderr.count("\n") == 1, done.stderr
    assert "pass --coordinator-address HOST:PORT --num-processes N" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, env", [
    (["--coordinator-address", "auto"], {}),
    ([], {"JAX_COORDINATOR_ADDRESS": "localhost:1"}),
    (["--coordinator-address", "localhost:1", "--num-processes", "2", "--process-id", "1"], {}),
], ids=["auto", "environment", "explicit"])
def test_a_run_of_several_processes_is_never_tuned(monkeypatch, flags, env):
    """Each process would tune, or read its own host's cache, on its own: processes running
    different programs (a collective mismatch, or a run mixing two programs), or a cached
    choice's device check starting the backend before jax.distributed. Under
    --coordinator-address auto the process count is JAX's to find: --num-processes stays 1."""
    from rnnjax import cli

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = cli.build_parser().parse_args(["train", "--tune", *flags])
    config = cli.config_from_args(args)
    assert cli.tuned_config(args, config, load=None) == (
        config, {"mode": "off", "reason": "several processes"})


def test_a_refusal_of_process_0_is_every_processs_one_line(tmp_path):
    """A workdir another run holds, or a damaged metrics line to resume over: process 0
    refused in one line, and process 1 waited in its first collective until
    jax.distributed gave up, about 5 minutes, then aborted (exit 134). Both now exit 2 at
    once, in one line each."""
    from rnnjax import checkpoint

    work, address = tmp_path / "run", f"localhost:{_free_port()}"
    argv = [sys.executable, "-m", "rnnjax", "train", "--steps", "2", "--hidden-size", "8",
            "--no-tune", "--compile-cache", "off", "--workdir", str(work),
            "--coordinator-address", address, "--num-processes", "2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    with checkpoint.workdir_lock(work):
        procs = [subprocess.Popen([*argv, "--process-id", str(i)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i in (0, 1)]
        done = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err), line in zip(procs, done, [
            f"rnnjax: error: {work} is in use by another rnnjax run",
            "rnnjax: error: process 0 of this run refused to start it (its error says why)"],
            strict=True):
        assert proc.returncode == 2, err
        assert err.startswith(line) and err.count("\n") == 1, err
    # A resume over a damaged metrics line, which only process 0 read: now every process
    # reads it, and refuses it alike.
    def run(*flags):
        address = ["--coordinator-address", f"localhost:{_free_port()}"]
        procs = [subprocess.Popen([*argv[:-4], *address, "--num-processes", "2",
                                   "--process-id", str(i), *flags], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i in (0, 1)]
        return [(p.wait(timeout=120), p.communicate()[1]) for p in procs]

    assert [code for code, _ in run("--checkpoint-every", "2")] == [0, 0]
    lines = (work / "metrics.jsonl").read_text().splitlines()
    (work / "metrics.jsonl").write_text("\n".join([lines[0], "{broken", *lines[2:]]) + "\n")
    for code, err in run("--resume", "--steps", "4"):
        assert code == 2, err
        assert err.startswith(f"rnnjax: error: {work / 'metrics.jsonl'}: line 2 is not a "
                              "metrics record"), err


def test_the_port_check_falls_back_to_ipv4_on_a_host_without_ipv6(monkeypatch):
    """A kernel without IPv6 cannot make an AF_INET6 socket: the check raised that
    OSError as a traceback, where jax.distributed runs over IPv4."""
    real = socket.socket

    def no_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    with real() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(socket, "socket", no_ipv6)
        with pytest.raises(ConfigError, match=f"port {port}, which is in use"):
            parallel._check_port_free(f"localhost:{port}")
    parallel._check_port_free(f"localhost:{_free_port()}")


def test_a_coordinator_port_in_use_is_one_line(tmp_path):
    """Process 0 serves jax.distributed on the coordinator's port: where something listened
    there already, the process crashed (segfault, exit 139) after XLA's own log lines."""
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "rnnjax", "train", "--steps", "2", "--hidden-size", "8",
             "--no-tune", "--compile-cache", "off", "--coordinator-address",
             f"localhost:{port}", "--num-processes", "2", "--process-id", "0"],
            capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"rnnjax: error: --coordinator-address localhost:{port}: process 0 serves the run on "
        f"port {port}, which is in use on this machine (Address already in use); choose "
        "another port (the same for every process)\n")


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_process_whose_others_never_join_stops_in_one_line(tmp_path, process_id):
    """A process missing (never started, or started with another --num-processes or the
    same --process-id), a wrong address or an unreachable port: every process that started
    waited in jax.distributed.initialize, silent, for 5 minutes, then died of SIGABRT
    (exit 134) with a C++ stack trace. Now a note after a third of --coordinator-timeout,
    then one line naming what to check at it, exit 2, nothing written."""
    address = f"localhost:{_free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "rnnjax", "train", "--steps", "2", "--hidden-size", "8",
         "--no-tune", "--compile-cache", "off", "--workdir", str(tmp_path / "run"),
         "--coordinator-address", address, "--num-processes", "2", "--process-id",
         str(process_id), "--coordinator-timeout", "3"],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    who = f"process {process_id} of 2 at {address}"
    assert done.stderr.splitlines() == [
        f"rnnjax: {who}: waiting for the others to join jax.distributed (up to "
        "--coordinator-timeout 3 s)",
        f"rnnjax: error: jax.distributed did not start in --coordinator-timeout 3 s: {who} "
        "waited for the others. Start each of --process-id 0 to 1 once, with the same "
        "--coordinator-address and --num-processes (process 0 on localhost), and check "
        "that every host reaches the port; or give a longer --coordinator-timeout"]
    assert not (tmp_path / "run").exists()


def test_a_coordinator_host_not_found_is_one_line(monkeypatch):
    """A host name with a typo: every process looked it up again and again in
    jax.distributed, silent, until its deadline killed it with SIGABRT."""
    with pytest.raises(ConfigError, match=(
            r"^--coordinator-address nosuchhost\.invalid:1234: the host nosuchhost\.invalid is "
            r"not found here \(.+\); give process 0's host name or IP address, the same for "
            r"every process$")):
        parallel._check_host("nosuchhost.invalid:1234")
    parallel._check_host("localhost:1234")
    parallel._check_host("127.0.0.1:1234")
    parallel._check_host("[::1]:1234")
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        Config(coordinator_address=":1234")
    for timeout in (0, 10**9 + 1):
        with pytest.raises(ConfigError, match=r"^--coordinator-timeout must be 1 to 1e\+09 "):
            Config(coordinator_timeout=timeout)


def test_sharded_evaluation_pads_to_the_device_count(tmp_path):
    """Three devices, which divide neither the evaluation chunks nor the test set: each
    chunk is rounded up to a multiple of 3 with masked rows, and the sums equal one
    device's, exactly in count and correct; a 3-device run with an --eval-batch-size of
    1000 trains and evaluates like one device."""
    config = {**RUN, "batch_size": 48, "eval_batch_size": 1000}  # 1000 -> 1002 rows
    chunks = [100, 1000]  # 250 examples: chunks of 102 and 252, padded and masked
    spec = {"out": str(tmp_path), "base": config, "runs": {"device3": {}},
            "evaluate": chunks}
    proc = _launch(spec, devices=3)
    from rnnjax.loop import train_and_evaluate

    try:
        reference = train_and_evaluate(Config(**config, num_devices=1), out=io.StringIO())
        plain = {chunk: _evaluation(chunk, sharded=False) for chunk in chunks}
    finally:
        _wait([proc], timeout=240)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["devices"] == 3 and report["device3"]["mesh_devices"] == 3
    assert all(chunk % 3 and EVAL_EXAMPLES % 3 for chunk in chunks)
    # the examples padded to: 3 chunks of 102 and one of 252 on 3 devices; 3 of 100 and the
    # 250 themselves on one
    for chunk, rows, one in zip(chunks, (306, 252), (300, 250), strict=True):
        sharded = report["evaluate"][str(chunk)]
        assert (sharded["rows"], plain[chunk]["rows"]) == (rows, one), chunk
        assert sharded["count"] == plain[chunk]["count"] == EVAL_EXAMPLES, chunk
        assert sharded["correct"] == plain[chunk]["correct"], chunk
        assert sharded["loss_sum"] == pytest.approx(plain[chunk]["loss_sum"], rel=1e-6)
    _assert_same(_load(tmp_path, "device3"), _flat_params(reference.state.params))
    _assert_same_history(report["device3"]["history"], reference.history)


def test_stream_feeds_give_a_process_its_rows(mnist, tmp_path):
    """With ``rows`` the NumPy and the tf.data feeds yield exactly those rows of each global
    batch (what one of several processes feeds)."""
    from rnnjax.data.idx import FILES, Arrays, write_idx
    from rnnjax.data.pipeline import host_batches

    small = Arrays(mnist.train_images[:200], mnist.train_labels[:200],
                   mnist.test_images[:20], mnist.test_labels[:20])
    rows, batch, start, steps = slice(8, 16), 32, 3, 9  # crosses the wrap at 200
    whole = list(host_batches(*small[:2], batch, start, steps))
    mine = list(host_batches(*small[:2], batch, start, steps, rows=rows))
    for (x, y), (wx, wy) in zip(mine, whole, strict=True):
        np.testing.assert_array_equal(x, wx[rows])
        np.testing.assert_array_equal(y, wy[rows])

    pytest.importorskip("tensorflow_datasets")
    from rnnjax.data import tfds_mnist

    (tmp_path / "small").mkdir()
    for key, stem in FILES.items():
        array = getattr(small, key)
        write_idx(tmp_path / "small" / stem, array.astype(np.uint8) if "labels" in key else array)
    feed = tfds_mnist.train_batches("small", tmp_path / "small", None, str(tmp_path / "tfds"),
                                    batch, start_step=start, rows=rows)
    for (wx, wy), (x, y) in zip(whole, feed, strict=False):
        assert x.shape == (8, 28, 28) and x.dtype == np.float32
        np.testing.assert_array_equal(x, wx[rows])
        np.testing.assert_array_equal(y, wy[rows])


def test_eight_devices_train_like_one(one_device, tmp_path):
    """Device feed and stream feed over 8 devices (and the device feed over 2 of them) give
    the one-device parameters; the batch error names sizes that divide; the compiled step
    all-reduces gradients and gathers nothing."""
    spec = {"out": str(tmp_path), "base": RUN, "checks": True,
            "runs": {"device8": {}, "stream8": {"feed": "stream"}, "device2": {"num_devices": 2},
                     "native8": {"backward": "native"}, "native1": {"backward": "native",
                                                                    "num_devices": 1}}}
    _wait([_launch(spec, devices=8)], timeout=240)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["devices"] == 8
    params, history = one_device
    for name, mesh_devices in (("device8", 8), ("stream8", 8), ("device2", 2)):
        assert report[name]["mesh_devices"] == mesh_devices
        shown = " x8;" if mesh_devices == 8 else f" x{mesh_devices} (of 8);"
        assert shown in report[name]["device_line"], report[name]["device_line"]
        _assert_same(_load(tmp_path, name), params)
        _assert_same_history(report[name]["history"], history)
    # The native form on 8 devices, each on its rows, as on one (it ran the whole batch on
    # each, its inputs all-gathered).
    assert report["native8"]["mesh_devices"] == 8
    _assert_same(_load(tmp_path, "native8"), _load(tmp_path, "native1"))
    _assert_same_history(report["native8"]["history"], report["native1"]["history"])
    for cell, counts in report["native_collectives"].items():
        assert counts["all-reduce"] >= 1, cell
        assert counts["all-gather"] == 0 and counts["all-to-all"] == 0, (cell, counts)
    assert report["divisibility_error"].startswith(
        "--batch-size 50 does not divide over 8 devices; use a multiple of 8 such as 48 or 56"
    )
    assert report["collectives"]["all-reduce"] >= 1
    assert report["collectives"]["all-gather"] == 0 and report["collectives"]["all-to-all"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(one_device, tmp_path):
    """Two processes of two CPU devices each (jax.distributed, gloo collectives) train the
    one-process model, with the device feed and the stream feed (each process feeding
    only its half of every batch), and stopped after 6 steps then resumed from the
    checkpoint they saved together."""
    address = f"localhost:{_free_port()}"
    procs = []
    for process_id in (0, 1):
        spec = {"out": str(tmp_path), "base": {**RUN, "coordinator_address": address,
                                               "num_processes": 2, "process_id": process_id},
                "runs": {"device": {}, "stream": {"feed": "stream"},
                         "stopped": {"steps": 6, "workdir": "work"},
                         "resumed": {"workdir": "work", "resume": True},
                         "finished": {"workdir": "work", "resume": True,
                                      "drop": ["summary.json"]},
                         # gloo's collectives had stopped for good within 100-300
                         # back-to-back calls: parallel.calls_must_finish.
                         "long": {"feed": "stream", "steps": 300, "eval_every": 300}}}
        procs.append(_launch(spec, devices=2))
    _wait(procs, timeout=300)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["processes"] == 2 and report["devices"] == 4
    params, history = one_device
    assert [h["step"] for h in report["stopped"]["history"]] == [0, 5]
    assert sorted(p.name for p in (tmp_path / "work" / "checkpoints").iterdir()) == ["12", "6"]
    for name in ("device", "stream", "resumed", "finished"):
        assert report[name]["mesh_devices"] == 4
        _assert_same(_load(tmp_path, name), params)
        _assert_same_history(report[name]["history"], history)
    # Stopped after its final checkpoint (its summary lost): finished by both processes
    # (process 1 read no history, and said the records lacked the final evaluation).
    assert json.loads((tmp_path / "work" / "summary.json").read_text())["resumed_from"] == 12
    assert [h["step"] for h in report["long"]["history"]] == [0, 299]


def test_two_processes_stop_at_sigterm(tmp_path):
    """jax.distributed's preemption notifier took SIGTERM over: both processes trained on
    through a scheduler's stop, to their end or the SIGKILL after it. They stop at it now,
    as one process does, their checkpoints kept."""
    address = f"localhost:{_free_port()}"
    procs = [_launch({"out": str(tmp_path),
                      "base": {**RUN, "coordinator_address": address, "num_processes": 2,
                               "process_id": process_id},
                      "runs": {"endless": {"feed": "stream", "steps": 100_000,
                                           "eval_every": 100_000, "checkpoint_every": 20,
                                           "workdir": "work"}}}, devices=2)
             for process_id in (0, 1)]
    try:
        deadline = time.monotonic() + 240
        while (not (tmp_path / "work" / "checkpoints" / "40").is_dir()
               and all(p.poll() is None for p in procs) and time.monotonic() < deadline):
            time.sleep(0.05)
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.communicate(timeout=60)
            assert p.returncode == -signal.SIGTERM
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert (tmp_path / "work" / "checkpoints" / "40").is_dir()


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
