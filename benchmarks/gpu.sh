#!/usr/bin/env bash
# rnnjax on an accelerator machine as a user runs it, no TensorFlow: the seed run
# (`rnnjax train`, defaults, its first-run tuning, then the cached choice), the GPU's native
# kernels against the default form, rnnjax against Flax's own RNNs, and the throughput
# table with the host CPU beside the accelerator.
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#   GPU_PARTS=seed_first,seed_cached GPU_SEED_FLAGS="--steps 3" bash benchmarks/gpu.sh DIR
#
# Needs only rnnjax's own dependencies: jax (with its GPU/TPU plugin), ml_dtypes, flax, optax,
# orbax-checkpoint, numpy, Pillow (the seed runs' figures) and tensorboardX (their TensorBoard
# event files; where it is missing they say so and train on); rnnjax runs from this checkout
# (PYTHONPATH), so nothing is installed. Results land in OUT_DIR (default
# benchmarks/results/gpu): a log per part, seed_*/ (each run's config and summary),
# native_kernels/, flax_*/flax_peers.{json,md}, throughput/throughput.{json,md,png}; where
# $OUT is set (the device tool's machine, which returns few files) also all of it as
# $OUT/gpu.tar.gz. Each part has its own time limit (560 s in all, under the device tool's
# 600 s a command); a part that fails or runs out is reported and the next one still runs,
# and the script then exits 1 naming the parts that failed (0 when every part ran).
# The tuner's and JAX's caches start empty. OUT_DIR may hold an earlier run's results: a
# part first removes its own (OUT_DIR/NAME/), and each seed run trains in a fresh temporary
# workdir, its config.json and summary.json then copied into OUT_DIR/seed_*/.
# GPU_PARTS (comma- or space-separated) runs only the parts it names; GPU_SEED_FLAGS adds
# flags to the seed runs' `rnnjax train` (a short run, for a test); unset, every part runs
# as described here.
set -uo pipefail
given=${1:+$(realpath -m "$1")}  # OUT_DIR from the caller's directory
cd "$(dirname "$0")/.."
all_parts="seed_first seed_cached native_kernels flax_rows flax_pixels throughput"
parts=" ${GPU_PARTS:-$all_parts} "
parts=${parts//,/ }
for name in $parts; do
  case " $all_parts " in
    *" $name "*) ;;
    *) echo "gpu.sh: error: GPU_PARTS names $name; give some of ${all_parts// /, }" >&2
       exit 2 ;;
  esac
done
runs() { case "$parts" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }  # runs NAME: asked for?
read -ra seed_flags <<<"${GPU_SEED_FLAGS:-}"
out=${given:-$(realpath -m benchmarks/results/gpu)}
# OUT_DIR made and written to now: one it cannot be is refused before any part runs.
if ! { mkdir -p "$out" 2>/dev/null && probe=$(mktemp -p "$out" 2>/dev/null) && rm -f "$probe"; }
then
  echo "gpu.sh: error: cannot write in OUT_DIR $out; give a directory you can write to" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cache=$(mktemp -d)
export XDG_CACHE_HOME="$cache"  # empty tuner and compilation caches: a first run's costs
work=$(mktemp -d)  # the seed runs' workdirs
bundle() {
  rm -rf "$cache" "$work"
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu.tar.gz" -C "$out" .; fi
}
trap bundle EXIT
failed=()  # the parts that exited non-zero or ran out of time: the script's exit status

part() {  # part NAME LIMIT_S COMMAND...: run with a limit, log to $out/NAME.log, time it
  local name=$1 limit=$2 start end rc
  shift 2
  rm -rf "${out:?}/$name"  # an earlier run's results of this part
  echo "=== $name (limit ${limit}s): $*"
  start=$(date +%s.%N)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  tail -n 25 "$out/$name.log"
  echo "=== $name: rc $rc, $(python3 -c "print(f'{$end - $start:.2f}')") s whole process"
  if [ "$rc" -ne 0 ]; then failed+=("$name"); fi
}

seed() {  # seed NAME LIMIT_S: part NAME, `rnnjax train` (defaults) in a fresh workdir; its
  # config.json and summary.json into $out/NAME
  local name=$1 limit=$2
  part "$name" "$limit" python3 -m rnnjax train --workdir "$work/$name" \
    ${seed_flags[@]+"${seed_flags[@]}"}
  mkdir -p "$out/$name"
  cp "$work/$name/config.json" "$work/$name/summary.json" "$out/$name/" 2>/dev/null
}

python3 - <<'EOF'
import jax, flax, optax, numpy, sys
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "numpy", numpy.__version__)
print("devices", jax.devices())
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>/dev/null

# The seed run as a user runs it: first `rnnjax train` of the shape (tunes within its budget,
# then trains), then the same command again (the cached choice), each in a fresh workdir.
for name in seed_first:80 seed_cached:30; do
  if runs "${name%:*}"; then
    seed "${name%:*}" "${name#*:}"
    grep -h "final test accuracy\|^tuned\|chose\|wall time" "$out/${name%:*}.log"
  fi
done

# The GPU's native form (rnnjax.native_gpu's Pallas kernels) against the default form at
# both unrolls, in turns: its first step checked against the hand-written form's first.
if runs native_kernels; then
  part native_kernels 80 python3 -m benchmarks.native_kernels --cells simple_rnn \
    --cases rows:50,rows:1024,rows:4096 --forms default --rounds 5 --out "$out/native_kernels"
  grep "^|" "$out/native_kernels/native_kernels.md" 2>/dev/null
fi

# rnnjax (as rnnjax train runs it, tuned now) against flax.linen / flax.nnx RNN, in turns.
if runs flax_rows; then
  part flax_rows 170 python3 -m benchmarks.flax_peers --cases rows:50,rows:1024,rows:4096 \
    --cells simple_rnn --rounds 5 --out "$out/flax_rows"
  grep "^|" "$out/flax_rows/flax_peers.md" 2>/dev/null
fi
if runs flax_pixels; then
  part flax_pixels 140 python3 -m benchmarks.flax_peers --cases pixels:50 \
    --cells lstm,gru,simple_rnn --apis linen --rounds 3 --out "$out/flax_pixels"
  grep "^|" "$out/flax_pixels/flax_peers.md" 2>/dev/null
fi

# The accelerator against the host's CPUs, the same programs.
if runs throughput; then
  part throughput 60 python3 -m benchmarks.throughput --batch-sizes 50,1024,4096 \
    --unrolls 1,0 --cells simple_rnn --repeats 3 --out "$out/throughput"
  grep "^|" "$out/throughput/throughput.md" 2>/dev/null | head -20
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu.sh: error: ${#failed[@]} part(s) failed: ${failed[*]}; their logs are in $out" >&2
  exit 1
fi
