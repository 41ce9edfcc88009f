"""Every flag of ``rnnjax train`` (every Config field) refuses its bad values.

Each bad value gives one line on stderr, ``rnnjax: error: ...`` naming the flag and what
would work, exit code 2, and nothing written: never a traceback, never a run that goes
on with a value that cannot work (NaN or infinite rates, a cache in the working dir, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from rnnjax.cli import main
from rnnjax.config import Config, ConfigError, to_dict
from rnnjax.data.idx import FILES, write_idx

N_TRAIN = 300

# (id, args, fragments of the one-line message). In args, {data} is a valid small dataset
# directory and {tmp} a fresh temporary directory holding a regular file {tmp}/file.
BAD = [
    # Model.
    ("cell_unknown", ["--cell", "gru2"], ["--cell: unknown cell 'gru2'; choose one of",
                                          "simple_rnn"]),
    ("hidden_size_zero", ["--hidden-size", "0"], ["--hidden-size must be at least 1, got 0"]),
    ("hidden_size_negative", ["--hidden-size", "-3"], ["--hidden-size must be at least 1"]),
    ("num_layers_zero", ["--num-layers", "0"], ["--num-layers must be at least 1, got 0"]),
    ("bidirectional_value", ["--bidirectional=yes"], ["--bidirectional", "ignored explicit"]),
    ("order_unknown", ["--order", "diagonal"], ["unknown --order 'diagonal'; choose rows, "
                                                "pixels, permuted, or one registered in "
                                                "rnnjax.orders.ORDERS"]),
    ("unroll_negative", ["--unroll", "-1"], ["--unroll must be 0 or more, got -1"]),
    ("cpus_negative", ["--cpus", "-1"], ["--cpus must be 0 or more, got -1"]),
    ("eval_unroll_below_minus_one", ["--eval-unroll", "-2"],
     ["--eval-unroll must be -1 (--unroll's), 0 (full) or more, got -2"]),
    ("cpus_beyond_the_machine", ["--cpus", "100000"],
     ["--cpus 100000: ", "or --cpus 0 for all"]),
    ("chunks_zero", ["--chunks", "0"], ["--chunks must be at least 1, got 0"]),
    ("chunks_beyond_the_steps", ["--chunks", "29"],
     ["--chunks 29 exceeds the 28 time steps of --order rows; choose 1 to 28"]),
    ("weight_grad_unknown", ["--weight-grad", "fast"],
     ["--weight-grad", "invalid choice: 'fast'", "'auto', 'product', 'per_step'"]),
    ("native_lanes_other", ["--native-lanes", "12"],
     ["--native-lanes", "invalid choice: 12", "8, 16"]),
    ("backward_unknown", ["--backward", "manual"],
     ["--backward", "invalid choice: 'manual'", "'auto', 'hand_written', 'autodiff', 'native'"]),
    ("projection_unknown", ["--projection", "inside"],
     ["--projection", "invalid choice: 'inside'", "'auto', 'hoisted', 'in_loop'"]),
    ("compute_dtype_unknown", ["--compute-dtype", "float16"],
     ["--compute-dtype", "invalid choice: 'float16'", "'float32', 'bfloat16'"]),
    ("num_classes_negative", ["--num-classes", "-1"], ["--num-classes must be 0 or more, got -1"]),
    ("num_classes_not_the_datasets", ["--num-classes", "5"],
     ["--num-classes 5 but the dataset has 10 classes; pass --num-classes 10, or 0"]),
    # Optimisation.
    ("optimizer_unknown", ["--optimizer", "adamm"],
     ["--optimizer 'adamm' is not an optax optimizer; try adam"]),
    ("optimizer_private", ["--optimizer", "_src"], ["--optimizer '_src' is not an optax"]),
    ("learning_rate_nan", ["--learning-rate", "nan"],
     ["--learning-rate must be a finite number, got nan"]),
    ("learning_rate_inf", ["--learning-rate", "inf"],
     ["--learning-rate must be a finite number, got inf"]),
    ("learning_rate_overflow", ["--learning-rate", "1e400"],
     ["--learning-rate must be a finite number, got inf"]),
    # Finite, but not in float32, which the step computes in: 1e39 gave NaN by step 2, an
    # eps of 1e-50 0/0, a rate of 1e-50 a run that never moved.
    ("learning_rate_float32_inf", ["--learning-rate", "1e39"],
     ["--learning-rate 1e+39 is inf in float32, which the train step computes in; give a "
      "value between 1.175e-38 and 3.403e+38"]),
    ("learning_rate_float32_zero", ["--learning-rate", "1e-50"],
     ["--learning-rate 1e-50 is 0 in float32"]),
    ("adam_eps_float32_zero", ["--adam-eps", "1e-50"], ["--adam-eps 1e-50 is 0 in float32"]),
    ("clip_norm_float32_inf", ["--clip-norm", "1e39"], ["--clip-norm 1e+39 is inf in float32"]),
    ("counts_overflow", ["--batch-size", "50000", "--eval-every", "42950", "--steps", "50000"],
     ["--batch-size 50000 x 42950 steps between logs = 2147500000 examples overflow their "
      "int32 counts (2**31); log more often: --eval-every 42949 at most"]),
    ("counts_overflow_in_one_batch", ["--batch-size", "2147483648"],
     ["--batch-size 2147483648: a step's examples are counted in int32; choose a batch below "
      "2**31 = 2147483648"]),
    ("counts_overflow_in_the_steps", ["--batch-size", "50000", "--eval-every", "100000",
                                      "--steps", "50000"],
     ["--batch-size 50000 x 50000 steps between logs = 2500000000 examples"]),
    ("learning_rate_negative", ["--learning-rate", "-0.1"],
     ["--learning-rate must be positive, got -0.1"]),
    ("learning_rate_zero", ["--learning-rate", "0"], ["--learning-rate must be positive, got 0"]),
    ("learning_rate_text", ["--learning-rate", "1e-3x"], ["--learning-rate", "invalid float"]),
    ("adam_eps_nan", ["--adam-eps", "NaN"], ["--adam-eps must be a finite number, got nan"]),
    ("adam_eps_inf", ["--adam-eps", "inf"], ["--adam-eps must be a finite number, got inf"]),
    ("adam_eps_negative", ["--adam-eps=-1e-8"],
     ["--adam-eps must be 0 (the optimizer's default) or positive"]),
    ("optimizer_kwargs_json", ["--optimizer-kwargs", "{b1: 0.8}"],
     ["--optimizer-kwargs is not valid JSON", "write e.g."]),
    ("optimizer_kwargs_nan", ["--optimizer-kwargs", '{"eps": NaN}'],
     ["--optimizer-kwargs: NaN is not a usable value"]),
    ("adam_eps_twice", ["--adam-eps", "1e-3", "--optimizer-kwargs", '{"eps": 1e-5}'],
     ["--adam-eps 0.001 and --optimizer-kwargs eps 1e-05: both set eps; keep one"]),
    ("adam_eps_unused", ["--optimizer", "sgd", "--adam-eps", "0.5"],
     ["--adam-eps 0.5: --optimizer sgd takes no eps; drop --adam-eps"]),
    ("optimizer_kwargs_unknown", ["--optimizer-kwargs", '{"beta1": 0.8}'],
     ["--optimizer-kwargs: adam has no argument(s) ['beta1']; it takes", "'b1'"]),
    ("schedule_unknown", ["--schedule", "linear"],
     ["--schedule", "invalid choice: 'linear'", "'warmup_cosine'"]),
    ("warmup_steps_negative", ["--schedule", "warmup_cosine", "--warmup-steps", "-1"],
     ["--warmup-steps must be 0 or more, got -1"]),
    ("warmup_steps_with_cosine", ["--schedule", "cosine", "--warmup-steps", "5"],
     ["--warmup-steps needs --schedule warmup_cosine"]),
    ("warmup_steps_not_below_steps", ["--schedule", "warmup_cosine", "--warmup-steps", "3"],
     ["--warmup-steps 3 must be below --steps 3"]),
    ("clip_norm_nan", ["--clip-norm", "nan"], ["--clip-norm must be a finite number, got nan"]),
    ("clip_norm_inf", ["--clip-norm", "inf"], ["--clip-norm must be a finite number, got inf"]),
    ("clip_norm_negative", ["--clip-norm", "-1"],
     ["--clip-norm must be 0 (off) or positive, got -1.0"]),
    ("batch_size_zero", ["--batch-size", "0"], ["--batch-size must be at least 1, got 0"]),
    ("batch_size_over_dataset", ["--batch-size", str(N_TRAIN + 1)],
     [f"--batch-size {N_TRAIN + 1} is larger than the {N_TRAIN} training examples; "
      f"use at most {N_TRAIN}"]),
    ("steps_negative", ["--steps", "-1"], ["--steps must be at least 1, got -1"]),
    ("steps_not_int", ["--steps", "2.5"], ["--steps", "invalid int value: '2.5'"]),
    # Form flags the run would not honour (it ran another form than config.json said).
    ("hand_written_flax_cell", ["--cell", "flax.linen:GRUCell", "--backward", "hand_written"],
     ["--backward hand_written: --cell flax.linen:GRUCell has none (it runs --backward "
      "autodiff); drop --backward, or choose autodiff"]),
    ("per_step_under_autodiff", ["--backward", "autodiff", "--weight-grad", "per_step"],
     ["--weight-grad per_step: --cell simple_rnn with --backward autodiff runs --weight-grad "
      "product; drop --weight-grad, or choose a backward that has it"]),
    ("in_loop_under_native", ["--backward", "native", "--projection", "in_loop"],
     ["--projection in_loop: --cell simple_rnn with --backward native runs --projection "
      "hoisted"]),
    ("seed_negative", ["--seed", "-1"], ["--seed must be 0 or more, got -1"]),
    ("seed_too_big", ["--seed", str(2**32 + 7)], [f"--seed must be below 2**32 = {2**32}",
                                                  "seeds 2**32 apart were the same run"]),
    ("seed_text", ["--seed", "lucky"], ["--seed", "invalid int value: 'lucky'"]),
    ("shuffle_value", ["--shuffle=1"], ["--shuffle", "ignored explicit"]),
    # Evaluation.
    ("eval_every_zero", ["--eval-every", "0"], ["--eval-every must be at least 1, got 0"]),
    ("eval_every_negative", ["--eval-every", "-10"], ["--eval-every must be at least 1"]),
    ("eval_batch_size_zero", ["--eval-batch-size", "0"],
     ["--eval-batch-size must be at least 1, got 0"]),
    # Data.
    ("dataset_empty", ["--dataset", ""], ["--dataset is empty; pass a dataset name"]),
    ("dataset_missing_dir", ["--dataset", "{tmp}/absent"],
     ["--dataset {tmp}/absent: no such directory"]),
    ("dataset_is_a_file", ["--dataset", "{tmp}/file"], ["no such directory"]),
    ("data_dir_missing", ["--dataset", "emnist", "--data-dir", "{tmp}/nowhere"],
     ["--dataset emnist: not found at {tmp}/nowhere/emnist", "--data-dir ROOT"]),
    ("source_unknown", ["--source", "hdf5"], ["--source", "invalid choice: 'hdf5'",
                                              "'idx', 'tfds'"]),
    ("tfds_dir_unwritable", ["--source", "tfds", "--tfds-dir", "{tmp}/file/tfds"],
     ["--tfds-dir {tmp}/file/tfds: cannot write the tfds build", "writable directory"]),
    ("tfds_download_value", ["--tfds-download=yes"], ["--tfds-download", "ignored explicit"]),
    ("tfds_download_without_tfds", ["--tfds-download"], ["--tfds-download needs --source tfds"]),
    ("tfds_dir_without_tfds", ["--tfds-dir", "/tmp/t"],
     ["--tfds-dir /tmp/t: only --source tfds reads it (this run reads --source idx); add "
      "--source tfds, or drop --tfds-dir"]),
    ("train_split_empty", ["--train-split", " "], ["--train-split is empty; pass a split name"]),
    ("train_split_with_idx", ["--train-split", "validation"],
     ["--train-split validation: IDX files hold only the splits train and test"]),
    ("test_split_empty", ["--test-split", ""], ["--test-split is empty; pass a split name"]),
    ("test_split_missing", ["--source", "tfds", "--tfds-dir", "{tmp}/tfds", "--test-split",
                            "validation"],
     ["--test-split validation: the IDX files of small have no split validation (they have "
      "train, test)"]),
    ("feed_unknown", ["--feed", "disk"], ["--feed", "invalid choice: 'disk'",
                                          "'device', 'stream'"]),
    ("compile_cache_empty", ["--compile-cache", ""],
     ["--compile-cache is empty; pass 'auto', 'off' or a directory"]),
    ("compile_cache_unwritable", ["--compile-cache", "{tmp}/file/cache"],
     ["--compile-cache {tmp}/file/cache: {tmp}/file is not a directory"]),
    ("steps_per_call_zero", ["--steps-per-call", "0"],
     ["--steps-per-call must be at least 1, got 0"]),
    ("steps_per_call_negative", ["--steps-per-call", "-1"], ["--steps-per-call must be at least"]),
    ("xla_flags_not_a_flag", ["--xla-flags=xla_cpu_use_xnnpack=false"],
     ["--xla-flags: 'xla_cpu_use_xnnpack=false' is not an XLA flag; pass space-separated"]),
    ("xla_flags_other_program", ["--xla-flags=--jax_enable_x64 --xla_cpu_use_xnnpack=false"],
     ["--xla-flags: '--jax_enable_x64' is not an XLA flag"]),
    ("huge_pages_value", ["--huge-pages=on"], ["--huge-pages", "ignored explicit"]),
    ("eval_native_value", ["--eval-native=on"], ["--eval-native", "ignored explicit"]),
    # Tuning (not Config fields: how the run's settings are chosen).
    ("tune_value", ["--tune=yes"], ["--tune", "ignored explicit"]),
    ("tune_budget_zero", ["--tune-budget", "0"],
     ["--tune-budget must be a positive number of seconds, got 0.0"]),
    ("tune_budget_nan", ["--tune-budget", "nan"],
     ["--tune-budget must be a positive number of seconds, got nan"]),
    ("tune_budget_inf", ["--tune-budget", "inf"], ["--tune-budget must be a positive number"]),
    ("tune_budget_beyond_timers", ["--tune-budget", "1e11"],
     ["--tune-budget 1e+11: more seconds than the tuner's timers can wait; give at most 1e+09"]),
    # Checkpoints and the run directory.
    ("checkpoint_every_negative", ["--checkpoint-every", "-1"],
     ["--checkpoint-every must be 0 or more, got -1"]),
    ("checkpoint_every_without_workdir", ["--checkpoint-every", "2", "--no-workdir"],
     ["--checkpoint-every needs --workdir DIR"]),
    ("keep_checkpoints_zero", ["--keep-checkpoints", "0"],
     ["--keep-checkpoints must be at least 1, got 0"]),
    ("keep_checkpoints_without_workdir", ["--keep-checkpoints", "5", "--no-workdir"],
     ["--keep-checkpoints 5: without --workdir no checkpoint is written; add --workdir DIR, "
      "or drop --keep-checkpoints"]),
    ("resume_without_workdir", ["--resume", "--no-workdir"], ["--resume needs --workdir DIR"]),
    ("resume_tuned", ["--resume", "--tune", "--tune-budget", "60"],
     ["--tune and --tune-budget: --resume takes the checkpoint's tuned settings and never "
      "tunes (so it stays bitwise); drop --tune and --tune-budget"]),
    ("resume_with_tune_budget_0", ["--resume", "--workdir", "{tmp}", "--tune-budget", "0"],
     ["--tune-budget: --resume takes the checkpoint's tuned settings"]),  # was run untuned
    # Flags the run would not read were recorded in config.json and ignored.
    ("tune_budget_without_tuning", ["--no-tune", "--tune-budget", "99"],
     ["--tune-budget: --no-tune tunes nothing; drop one of them"]),
    ("steps_per_call_stream", ["--feed", "stream", "--steps-per-call", "7"],
     ["--steps-per-call 7: --feed stream runs one step a call"]),
    ("workdir_under_a_file", ["--workdir", "{tmp}/file/run"],
     ["--workdir {tmp}/file/run: {tmp}/file is not a directory; choose another path"]),
    ("workdir_unwritable_fs", ["--workdir", "/proc/rnnjax-run"],
     ["--workdir /proc/rnnjax-run: /proc is not writable", "choose a writable directory"]),
    # Data parallelism.
    ("num_devices_negative", ["--num-devices", "-1"],
     ["--num-devices must be 0 (all) or more, got -1"]),
    ("num_devices_too_many", ["--num-devices", "4096"],
     ["--num-devices 4096 but this process sees only", "use at most"]),
    ("coordinator_address_malformed", ["--coordinator-address", "10.0.0.1"],
     ["--coordinator-address '10.0.0.1' is not HOST:PORT"]),
    ("num_processes_zero", ["--num-processes", "0"], ["--num-processes must be at least 1"]),
    ("num_processes_without_coordinator", ["--num-processes", "2"],
     ["--num-processes 2 needs --coordinator-address HOST:PORT"]),
    ("process_id_out_of_range", ["--process-id", "1"],
     ["--process-id 1 must be in 0 .. 0 (--num-processes 1)"]),
    ("coordinator_timeout_zero", ["--coordinator-timeout", "0"],
     ["--coordinator-timeout must be 1 to 1e+09 seconds", "got 0"]),
    ("coordinator_timeout_one_process", ["--coordinator-timeout", "60"],
     ["--coordinator-timeout 60: this run is one process, which waits for no others",
      "drop it, or start several processes"]),
    ("coordinator_ipv6_unbracketed", ["--coordinator-address", "::1:1234", "--num-processes",
                                      "2"],
     ["--coordinator-address '::1:1234': write an IPv6 host in brackets, e.g. [::1]:1234"]),
    ("coordinator_host_not_found", ["--coordinator-address", "nosuchhost.invalid:1234",
                                    "--num-processes", "2", "--process-id", "1"],
     ["--coordinator-address nosuchhost.invalid:1234: the host nosuchhost.invalid is not found "
      "here", "give process 0's host name or IP address"]),
    # The command line itself.
    ("unknown_flag", ["--hiden-size", "16"], ["unrecognized arguments: --hiden-size"]),
]

# Flags that are not Config fields but are checked with them.
EXTRA_FLAGS = {"workdir", "resume", "tune", "tune-budget"}


@pytest.fixture(scope="module")
def data(tmp_path_factory, mnist) -> Path:
    """A small valid dataset directory (N_TRAIN train, 60 test examples)."""
    directory = tmp_path_factory.mktemp("flags") / "small"
    directory.mkdir()
    for key, stem in FILES.items():
        n = N_TRAIN if key.startswith("train") else 60
        write_idx(directory / (stem + ".gz"), getattr(mnist, key)[:n].astype(np.uint8))
    return directory


def fill(text: str, tmp: Path, data: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{data}", str(data))


@pytest.mark.parametrize(("args", "fragments"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_flag_is_one_line_and_exit_2(capsys, tmp_path, data, args, fragments):
    if "tfds" in args:
        pytest.importorskip("tensorflow_datasets")
    (tmp_path / "file").write_text("a regular file")
    work = tmp_path / "run"
    args = [fill(a, tmp_path, data) for a in args]
    tail = [] if "--no-workdir" in args else ["--workdir", str(work)]
    args = [a for a in args if a != "--no-workdir"]
    code = main(["train", "--dataset", str(data), "--steps", "3", "--compile-cache", "off",
                 *tail, *args])
    captured = capsys.readouterr()
    assert code == 2, captured
    err = captured.err
    assert err.startswith("rnnjax: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert unquoted(fill(fragment, tmp_path, data)) in unquoted(err), err
    assert "Traceback" not in err and "step " not in captured.out  # refused before training
    assert not work.exists()  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # not even a probe


def unquoted(text: str) -> str:
    """``text`` without single quotes: argparse quotes its choices and the value refused up
    to Python 3.12 (``invalid choice: 12 (choose from 'a', 'b')``), not after (``invalid
    choice: '12' (choose from a, b)``)."""
    return text.replace("'", "")


def test_every_config_field_has_a_bad_value_case():
    flags = {a.split("=")[0] for _, args, _ in BAD for a in args if a.startswith("--")}
    missing = [f.name for f in dataclasses.fields(Config)
               if "--" + f.name.replace("_", "-") not in flags]
    assert not missing, f"add a bad-value case to BAD for: {missing}"
    assert {"--" + name for name in EXTRA_FLAGS} <= flags


def test_unwritable_workdir_by_permissions(capsys, tmp_path, data):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 0o555 does not stop root from writing "
                    "(workdir_unwritable_fs covers an unwritable place for root)")
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code = main(["train", "--dataset", str(data), "--workdir", str(parent / "run")])
    finally:
        parent.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and f"{parent} is not writable" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 2.5}, "--steps must be an int, got 2.5"),
        ({"hidden_size": True}, "--hidden-size must be an int, got True"),
        ({"learning_rate": "0.1"}, "--learning-rate must be a float, got '0.1'"),
        ({"shuffle": "no"}, "--shuffle must be a bool, got 'no'"),
        ({"cell": None}, "--cell must be a str, got None"),
        ({"clip_norm": float("nan")}, "--clip-norm must be a finite number, got nan"),
        ({"adam_eps": float("-inf")}, "--adam-eps must be a finite number, got -inf"),
    ],
)
def test_python_api_rejects_wrong_types(changes, message):
    """The same checks hold for ``Config(...)`` in Python, where no argparse types apply."""
    with pytest.raises(ConfigError) as info:
        Config(**changes)
    assert str(info.value) == message
    with pytest.raises(ConfigError):
        Config().replace(**changes)


def test_python_api_accepts_numpy_scalars():
    config = Config(seed=np.int64(3), steps=np.int32(5), learning_rate=np.float32(0.5),
                    shuffle=np.bool_(True))
    assert config.seed == 3 and config.steps == 5 and config.shuffle
    # Held as Python's own: config.json is written with json.dumps, which takes no NumPy
    # scalar (a run of this config failed there, its workdir made and left empty).
    assert [type(v) for v in (config.seed, config.steps, config.learning_rate,
                              config.shuffle)] == [int, int, float, bool]
    assert json.loads(json.dumps(to_dict(config)))["learning_rate"] == 0.5
    assert type(Config(learning_rate=1).learning_rate) is float
