#!/usr/bin/env bash
# rnnjax on an accelerator machine as a user runs it, no TensorFlow: the seed run
# (`rnnjax train`, defaults, its first-run tuning, then the cached choice), the GPU's native
# kernels against the default form, rnnjax against Flax's own RNNs, and the throughput
# table with the host CPU beside the accelerator.
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
# Needs only jax (with its GPU/TPU plugin), flax, optax, orbax and numpy; rnnjax runs from
# this checkout (PYTHONPATH), so nothing is installed. Results land in OUT_DIR (default
# benchmarks/results/gpu): a log per part, seed_*/ (each run's config and summary),
# native_kernels/, flax_*/flax_peers.{json,md}, throughput/throughput.{json,md,png}; where
# $OUT is set (the device tool's machine, which returns few files) also all of it as
# $OUT/gpu.tar.gz. Each
# part has its own time limit (about 9 minutes in all); a part that fails or runs out is
# reported and the next one still runs. The tuner's and JAX's caches start empty.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-benchmarks/results/gpu}")
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cache=$(mktemp -d)
export XDG_CACHE_HOME="$cache"  # empty tuner and compilation caches: a first run's costs
bundle() {
  rm -rf "$cache"
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu.tar.gz" -C "$out" .; fi
}
trap bundle EXIT

part() {  # part NAME LIMIT_S COMMAND...: run with a limit, log to $out/NAME.log, time it
  local name=$1 limit=$2 start end rc
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  start=$(date +%s.%N)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  tail -n 25 "$out/$name.log"
  echo "=== $name: rc $rc, $(python3 -c "print(f'{$end - $start:.2f}')") s whole process"
}

python3 - <<'EOF'
import jax, flax, optax, numpy, sys
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "numpy", numpy.__version__)
print("devices", jax.devices())
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>/dev/null

# The seed run as a user runs it: first `rnnjax train` of the shape (tunes within its budget,
# then trains), then the same command again (the cached choice).
part seed_first 90 python3 -m rnnjax train --workdir "$out/seed_first"
part seed_cached 40 python3 -m rnnjax train --workdir "$out/seed_cached"
grep -h "final test accuracy\|^tuned\|chose\|wall time" "$out"/seed_*.log | head -20

# The GPU's native form (rnnjax.native_gpu's Pallas kernels) against the default form at
# both unrolls, in turns: its first step checked against the hand-written form's first.
part native_kernels 80 python3 -m benchmarks.native_kernels --cells simple_rnn \
  --cases rows:50,rows:1024,rows:4096 --forms default --rounds 5 --out "$out/native_kernels"
grep "^|" "$out/native_kernels/native_kernels.md" 2>/dev/null

# rnnjax (as rnnjax train runs it, tuned now) against flax.linen / flax.nnx RNN, in turns.
part flax_rows 170 python3 -m benchmarks.flax_peers --cases rows:50,rows:1024,rows:4096 \
  --cells simple_rnn --rounds 5 --out "$out/flax_rows"
part flax_pixels 140 python3 -m benchmarks.flax_peers --cases pixels:50 \
  --cells lstm,gru,simple_rnn --apis linen --rounds 3 --out "$out/flax_pixels"
cat "$out"/flax_rows/flax_peers.md "$out"/flax_pixels/flax_peers.md 2>/dev/null | grep "^|"

# The accelerator against the host's CPUs, the same programs.
part throughput 60 python3 -m benchmarks.throughput --batch-sizes 50,1024,4096 \
  --unrolls 1,0 --cells simple_rnn --repeats 3 --out "$out/throughput"
grep "^|" "$out/throughput/throughput.md" 2>/dev/null | head -20
