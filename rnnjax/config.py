"""The one frozen configuration every part of rnnjax is handed (stdlib only).

Nothing in rnnjax reads flags or globals: the CLI builds a :class:`Config` from its
arguments and passes it down. The defaults are the seed experiment, the Keras tutorial
``SimpleRNN(50, tanh) -> Dense(10) -> softmax``, Adam(1e-3), batch 50, 4001 steps in
order, a full test evaluation every 500 steps, seed 1337.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

CELLS = ("simple_rnn", "irnn", "lstm", "gru")
ORDERS = ("rows", "pixels", "permuted")
SOURCES = ("idx", "tfds")
FEEDS = ("device", "stream")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
# Forms of the same computation (rnnjax.cells.resolve_form), 'auto' the untuned rule:
# the backward pass hand-written, autodiff of the scan or native custom calls (simple_rnn,
# lstm and gru on a CPU: rnnjax.native); the input projection before the loop or inside
# it; the weight gradient one product after the backward loop or accumulated inside it.
# The same sums, equal up to rounding. In bfloat16 every form sums a weight's gradient over
# the steps in float32, and autodiff the bias's over the batch (and, hoisted, over the
# steps) in bfloat16: its hoisted bias gradient was 1.6-2.9e-2 off float32's where the
# other forms' worst leaves were 1.0-1.6e-2 (hidden 16-50, 2026-12-08).
BACKWARDS = ("auto", "hand_written", "autodiff", "native")
PROJECTIONS = ("auto", "hoisted", "in_loop")
WEIGHT_GRADS = ("auto", "product", "per_step")
# The fields rnnjax.tune chooses by measurement unless set on the command line.
TUNED = ("unroll", "backward", "projection", "weight_grad", "native_lanes", "chunks", "feed",
         "xla_flags", "huge_pages", "cpus", "eval_unroll", "eval_native")
# Floats per vector the native kernels (backward 'native') are built for: 256-bit or 512-bit
# vectors. Which runs faster depends on the CPU (its vector units) and the shape, so the
# tuner times both where the CPU has 512-bit registers (rnnjax.native.wide_vectors).
NATIVE_LANES = (8, 16)
# float32's range: a larger value is inf, a smaller is 0 (XLA:CPU flushes subnormals).
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_NORMAL = 2.0**-126
# The longest wait a flag may ask for (--tune-budget, --coordinator-timeout): Python's
# timers take up to threading.TIMEOUT_MAX, about 9.2e9 s, and raise past it.
MAX_WAIT_S = 10**9
XLA_FLAG = re.compile(r"--xla_[a-z0-9_]+(=\S*)?")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


def error_line(error: BaseException, limit: int | None = None) -> str:
    """``error`` for a one-line message: ``Type: its first line`` (the type alone where it
    says nothing), the line cut to ``limit`` characters where given."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    if limit is not None and len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


@dataclass(frozen=True)
class Config:
    """Hyper-parameters, data and run settings of one experiment.

    Field metadata ``help`` is the CLI's help text; ``choices`` restricts the values.
    """

    # Model.
    cell: str = field(
        default="simple_rnn",
        metadata={"help": f"recurrent cell: {', '.join(CELLS)}, one registered in "
                  "rnnjax.cells.CELLS, or any Flax RNN cell class as MODULE:CLASS "
                  "(e.g. flax.linen:GRUCell, flax.nnx:OptimizedLSTMCell)"},
    )
    hidden_size: int = field(default=50, metadata={"help": "units per recurrent layer"})
    num_layers: int = field(default=1, metadata={"help": "stacked recurrent layers"})
    bidirectional: bool = field(
        default=False, metadata={"help": "run each layer forwards and backwards in time"}
    )
    order: str = field(
        default="rows",
        metadata={
            "help": "sequence order of an HxWxC image: rows (H steps of W*C; MNIST 28 x 28), "
            "pixels (H*W steps of C; MNIST 784 x 1), permuted (pixels in a fixed seeded "
            "order), or one registered in rnnjax.orders.ORDERS",
        },
    )
    unroll: int = field(
        default=1, metadata={"help": "lax.scan unroll factor over time (0 = fully unrolled); "
                             "rnnjax train tunes it unless given"}
    )
    eval_unroll: int = field(
        default=-1, metadata={"help": "the evaluations' lax.scan unroll factor (0 = fully "
                              "unrolled, -1 = --unroll's); the same sums, bit for bit, where "
                              "rnnjax train tunes it (unless given)"}
    )
    eval_native: bool = field(
        default=True, metadata={"help": "with --backward native on a CPU: the evaluations run "
                                "the native forward too, which writes the last step alone "
                                "(--no-eval-native: XLA's hand-written form, at "
                                "--eval-unroll); tuned unless given"}
    )
    backward: str = field(
        default="auto",
        metadata={"help": "backward pass: the cell's hand-written one or autodiff of the scan "
                  "('auto': the cell's default; hand-written for simple_rnn, irnn, lstm); "
                  "native: the forward and backward passes as native XLA:CPU calls "
                  "(simple_rnn, lstm, gru; CPU, float32; built once with the machine's C++ "
                  "compiler); "
                  "tuned unless given",
                  "choices": BACKWARDS},
    )
    projection: str = field(
        default="auto",
        metadata={"help": "input projection x_t @ kernel under a gradient: hoisted before the "
                  "loop as one product, or in_loop ('auto': hoisted for a hand-written "
                  "backward, in the loop for autodiff); tuned unless given",
                  "choices": PROJECTIONS},
    )
    weight_grad: str = field(
        default="auto",
        metadata={"help": "hand-written backward's weight gradient (simple_rnn, irnn, lstm, "
                  "gru): one product after the backward loop, or accumulated per step inside it "
                  "('auto': per step from batch 512); tuned unless given",
                  "choices": WEIGHT_GRADS},
    )
    native_lanes: int = field(
        default=NATIVE_LANES[0],
        metadata={"help": "floats per vector of the native kernels (--backward native): 8 "
                  "(256-bit vectors) or 16 (512-bit, where the CPU has them; elsewhere two "
                  "256-bit halves); tuned unless given",
                  "choices": NATIVE_LANES},
    )
    chunks: int = field(
        default=1,
        metadata={"help": "time chunks per layer: the sequence scanned in this many "
                  "consecutive parts, the carry passed on, so that each part's products "
                  "(weight gradients, input projection) can run beside another part's "
                  "loop; the same sums, the weight gradients added part by part (1 = one "
                  "scan); tuned unless given"},
    )
    compute_dtype: str = field(
        default="float32",
        metadata={"help": "compute dtype; parameters stay float32", "choices": DTYPES},
    )
    num_classes: int = field(
        default=0,
        metadata={"help": "output classes: 0 = the dataset's (its tfds ClassLabel; 10 for IDX "
                  "files); another value is checked against the dataset's"},
    )

    # Optimisation.
    optimizer: str = field(
        default="adam", metadata={"help": "any optax optimizer by name, keras_adam, or one "
                                  "registered in rnnjax.optim.OPTIMIZERS"}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    adam_eps: float = field(
        default=0.0,
        metadata={"help": "epsilon of optimizers that take one (refused for others); 0 = "
                  "the optimizer's own (optax adam 1e-8, keras_adam 1e-7 as Keras)"},
    )
    optimizer_kwargs: str = field(
        default="",
        metadata={"help": "extra optimizer arguments as JSON, e.g. '{\"b1\": 0.8}'"},
    )
    schedule: str = field(
        default="constant",
        metadata={"help": "learning-rate schedule", "choices": SCHEDULES},
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    clip_norm: float = field(
        default=0.0, metadata={"help": "clip gradients to this global norm (0 = off)"}
    )
    batch_size: int = field(default=50, metadata={"help": "training batch size"})
    steps: int = field(default=4001, metadata={"help": "training steps"})
    seed: int = field(default=1337, metadata={"help": "seed for init, shuffling and permutation"})
    shuffle: bool = field(
        default=False,
        metadata={"help": "seeded reshuffle every epoch instead of the seed's in-order walk"},
    )

    # Evaluation and logging.
    eval_every: int = field(
        default=500, metadata={"help": "evaluate on the full test set after every N-th step"}
    )
    eval_batch_size: int = field(
        default=10000, metadata={"help": "test examples per evaluation chunk"}
    )

    # Data.
    dataset: str = field(
        default="mnist",
        metadata={"help": "dataset name (mnist, fashion_mnist, kmnist, ...) or a directory "
                  "holding the four IDX files"},
    )
    data_dir: str = field(
        default="",
        metadata={"help": "root where named datasets live as DATA_DIR/NAME/ "
                  "(default: ~/rnnjax_data, where mnist falls back to the copy inside "
                  "rnnjax)"},
    )
    source: str = field(
        default="idx",
        metadata={"help": "read arrays straight from IDX files, or through the tfds dataset",
                  "choices": SOURCES},
    )
    tfds_dir: str = field(
        default="",
        metadata={"help": "tfds data dir holding prepared tfds datasets, and where IDX files "
                  "are prepared once with --source tfds (default: tfds' own, "
                  "$TFDS_DATA_DIR or ~/tensorflow_datasets; gs:// and other paths tfds "
                  "reads work)"},
    )
    tfds_download: bool = field(
        default=False,
        metadata={"help": "with --source tfds, let tfds download and prepare a catalog "
                  "dataset that is not prepared in the tfds dir (needs network)"},
    )
    train_split: str = field(
        default="train",
        metadata={"help": "the split to train on (tfds split syntax with a prepared tfds "
                  "dataset, e.g. 'train[:90%]'; IDX files have train and test)"},
    )
    test_split: str = field(
        default="test",
        metadata={"help": "the split to evaluate on (e.g. 'validation', 'train[90%:]')"},
    )
    feed: str = field(
        default="device",
        metadata={"help": "device: dataset on the device, K steps per compiled call; "
                  "stream: one step per call fed batch by batch (tf.data with --source tfds); "
                  "tuned unless given",
                  "choices": FEEDS},
    )
    compile_cache: str = field(
        default="auto",
        metadata={"help": "directory of JAX's persistent compilation cache, so later runs "
                  "skip compiling ('auto': $XDG_CACHE_HOME/rnnjax/jax or ~/.cache/rnnjax/jax; "
                  "'off': none); programs compiled for N CPUs are kept in its cpus-N/"},
    )
    steps_per_call: int = field(
        default=500, metadata={"help": "train steps per compiled call with --feed device"}
    )
    xla_flags: str = field(
        default="",
        metadata={"help": "XLA flags for this run, space-separated, written "
                  "--xla-flags='--xla_...' (added to $XLA_FLAGS before the backend starts); "
                  "tuned unless given"},
    )
    huge_pages: bool = field(
        default=False,
        metadata={"help": "CPU: XLA's buffers on transparent huge pages, asked for by glibc's "
                  "malloc (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, read when a process starts: "
                  "the rnnjax program starts itself again with it; Linux, glibc 2.35+, "
                  "huge pages in the kernel's 'madvise' mode, else ignored with a note); "
                  "tuned unless given"},
    )
    cpus: int = field(
        default=0,
        metadata={"help": "CPU: run on the first N of the CPUs this process may use (its "
                  "affinity, set before JAX's backend starts: XLA:CPU sizes its thread pools "
                  "by it; Linux); 0 = all of them; tuned unless given. Every process given N "
                  "takes the same first N: give processes sharing a machine their own CPUs "
                  "with taskset"},
    )

    # Checkpoints (in WORKDIR/checkpoints/; they need --workdir).
    checkpoint_every: int = field(
        default=0,
        metadata={"help": "save a checkpoint every N steps (0 = only at the end of the run); "
                  "needs --workdir"},
    )
    keep_checkpoints: int = field(
        default=3, metadata={"help": "how many of the latest checkpoints to keep"}
    )

    # Data parallelism (rnnjax.parallel).
    num_devices: int = field(
        default=0,
        metadata={"help": "devices per process to train on, the batch split over them "
                  "(0 = every local device)"},
    )
    coordinator_address: str = field(
        default="",
        metadata={"help": "multi-process: HOST:PORT of process 0 for jax.distributed, or "
                  "'auto' to detect it (TPU pod slice, SLURM, Open MPI); '' = one process"},
    )
    num_processes: int = field(
        default=1, metadata={"help": "multi-process: how many processes train together"}
    )
    process_id: int = field(
        default=0, metadata={"help": "multi-process: this process's index, 0 .. N-1"}
    )
    coordinator_timeout: int = field(
        default=300,
        metadata={"help": "multi-process: seconds each process waits for all of them to "
                  "join jax.distributed before it stops with an error (JAX's default)"},
    )

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field and how to fix it."""
        self._validate_types()
        self._validate_parallel()
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(
                    f"{flag_name(f.name)} {value!r} is not one of {', '.join(map(str, choices))}"
                )
        positive = ("hidden_size", "num_layers", "chunks", "batch_size", "steps",
                    "eval_every", "eval_batch_size", "steps_per_call", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{flag_name(name)} must be at least 1, got {getattr(self, name)}"
                )
        if self.batch_size >= 2**31:  # one step's examples alone overflow the count
            raise ConfigError(f"--batch-size {self.batch_size}: a step's examples are counted "
                              f"in int32; choose a batch below 2**31 = {2**31}")
        between = min(self.eval_every, self.steps)  # train steps between two logs at most
        if self.batch_size * between >= 2**31:  # a log interval's train metrics count in int32
            raise ConfigError(
                f"--batch-size {self.batch_size} x {between} steps between logs = "
                f"{self.batch_size * between} examples overflow their int32 counts (2**31); "
                f"log more often: --eval-every {(2**31 - 1) // self.batch_size} at most")
        for name in ("unroll", "warmup_steps", "seed", "checkpoint_every", "num_classes", "cpus"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag_name(name)} must be 0 or more, got {getattr(self, name)}")
        if self.eval_unroll < -1:
            raise ConfigError(f"--eval-unroll must be -1 (--unroll's), 0 (full) or more, got "
                              f"{self.eval_unroll}")
        if self.seed >= 2**32:  # jax.random.key keeps a seed's low 32 bits (no x64)
            raise ConfigError(f"--seed must be below 2**32 = {2**32} (a JAX key holds 32 "
                              f"bits: seeds 2**32 apart were the same run), got {self.seed}")
        for name in ("learning_rate", "adam_eps", "clip_norm"):
            value = getattr(self, name)
            if not math.isfinite(value):  # NaN fails no `<` test: ask first
                raise ConfigError(f"{flag_name(name)} must be a finite number, got {value}")
            # The step computes in float32: a value past its range is inf there (the first
            # update NaN), one below its smallest is 0 (eps 0: 0/0; a rate 0: nothing moves).
            if value and not FLOAT32_NORMAL <= abs(value) <= FLOAT32_MAX:
                raise ConfigError(f"{flag_name(name)} {value} is "
                                  f"{'0' if abs(value) < 1 else 'inf'} in float32, which the "
                                  f"train step computes in; give a value between "
                                  f"{FLOAT32_NORMAL:.4g} and {FLOAT32_MAX:.4g}")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.adam_eps < 0:
            raise ConfigError(
                f"--adam-eps must be 0 (the optimizer's default) or positive, got {self.adam_eps}"
            )
        if self.clip_norm < 0:
            raise ConfigError(f"--clip-norm must be 0 (off) or positive, got {self.clip_norm}")
        if self.warmup_steps and self.schedule != "warmup_cosine":
            raise ConfigError("--warmup-steps needs --schedule warmup_cosine")
        if not self.dataset.strip():
            raise ConfigError("--dataset is empty; pass a dataset name (mnist, fashion_mnist, "
                              "...) or a directory holding the four IDX files")
        for name in ("train_split", "test_split"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{flag_name(name)} is empty; pass a split name such as "
                                  f"{'train' if name == 'train_split' else 'test'}")
        if self.source == "idx":
            for name, split in (("train_split", "train"), ("test_split", "test")):
                if getattr(self, name) != split:
                    raise ConfigError(
                        f"{flag_name(name)} {getattr(self, name)}: IDX files hold only the "
                        f"splits train and test; use --source tfds for other splits"
                    )
        if self.tfds_download and self.source != "tfds":
            raise ConfigError("--tfds-download needs --source tfds")
        for flag in self.xla_flags.split():
            if not XLA_FLAG.fullmatch(flag):
                raise ConfigError(f"--xla-flags: {flag!r} is not an XLA flag; pass "
                                  "space-separated flags like '--xla_cpu_use_xnnpack=false'")
        if not self.compile_cache.strip():
            raise ConfigError("--compile-cache is empty; pass 'auto', 'off' or a directory")
        if self.schedule == "warmup_cosine" and self.warmup_steps >= self.steps:
            raise ConfigError(
                f"--warmup-steps {self.warmup_steps} must be below --steps {self.steps}"
            )

    def _validate_types(self) -> None:
        """Each field holds a value of its type (the CLI parses them; Python callers may not)."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            ok = {
                "int": isinstance(value, numbers.Integral) and not isinstance(value, bool),
                "float": isinstance(value, numbers.Real) and not isinstance(value, bool),
                "str": isinstance(value, str),
                "bool": type(value).__name__ in ("bool", "bool_"),  # NumPy's too
            }.get(kind, True)
            if not ok:
                raise ConfigError(f"{flag_name(f.name)} must be {'an' if kind == 'int' else 'a'} "
                                  f"{kind}, got {value!r}")
            python = {"int": int, "float": float, "bool": bool}.get(kind)
            if python is not None and type(value) is not python:
                # A NumPy scalar (or an int for a float) as the Python value: config.json and
                # the checkpoints' meta are JSON, which takes no NumPy scalar.
                object.__setattr__(self, f.name, python(value))

    def _validate_parallel(self) -> None:
        if self.num_devices < 0:
            raise ConfigError(f"--num-devices must be 0 (all) or more, got {self.num_devices}")
        if self.num_processes < 1:
            raise ConfigError(f"--num-processes must be at least 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ConfigError(f"--process-id {self.process_id} must be in 0 .. "
                              f"{self.num_processes - 1} (--num-processes {self.num_processes})")
        if not 1 <= self.coordinator_timeout <= MAX_WAIT_S:
            raise ConfigError(f"--coordinator-timeout must be 1 to {MAX_WAIT_S:g} seconds (what "
                              f"a timer can wait), got {self.coordinator_timeout}")
        address = self.coordinator_address
        if self.num_processes > 1 and not address:
            raise ConfigError(f"--num-processes {self.num_processes} needs "
                              "--coordinator-address HOST:PORT (process 0's), or 'auto'")
        if address and address != "auto":
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--coordinator-address {address!r} is not HOST:PORT "
                                  "(e.g. 10.0.0.1:1234) or 'auto'")
            if ":" in host and not (host.startswith("[") and host.endswith("]")):
                raise ConfigError(f"--coordinator-address {address!r}: write an IPv6 host in "
                                  "brackets, e.g. [::1]:1234 (unbracketed, its last part was "
                                  "read as the port)")
            if not 1 <= int(port) <= 65535:
                raise ConfigError(f"--coordinator-address {address}: port {int(port)} is not "
                                  "a port (1 to 65535)")


def flag_name(name: str) -> str:
    """The CLI flag of a Config field: ``hidden_size`` -> ``--hidden-size``."""
    return "--" + name.replace("_", "-")


def to_dict(config: Config) -> dict[str, Any]:
    """Plain JSON-able dict of every field."""
    return dataclasses.asdict(config)


# Fields added after configs were first written, with the value that runs what a config
# written without them ran (its default may differ): a run resumed, or a checkpoint
# evaluated, as it was. eval_native: a native model's evaluations ran XLA's form.
BEFORE = {"eval_native": False}


def from_dict(values: dict[str, Any]) -> Config:
    """Inverse of :func:`to_dict`; unknown keys are an error naming them; a field missing
    from ``values`` (written before it existed) takes :data:`BEFORE`'s value, else its
    default."""
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}: written by another rnnjax version?")
    return Config(**{**BEFORE, **values})
