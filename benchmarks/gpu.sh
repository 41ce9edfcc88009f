#!/usr/bin/env bash
# The throughput table and the Flax comparison on an accelerator machine, no TensorFlow.
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
# Needs only jax (with its GPU/TPU plugin), optax and numpy; rnnjax runs from this checkout
# (PYTHONPATH), so nothing is installed. Results land in OUT_DIR (default $OUT, else
# benchmarks/results/gpu): throughput.{json,md,png} with the accelerator and the host CPU
# side by side and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'EOF'
import jax, optax, numpy
print("jax", jax.__version__, "optax", optax.__version__, "numpy", numpy.__version__)
print("devices", jax.devices())
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
timeout 280 python3 -m benchmarks.throughput --batch-sizes 50,256,1024,4096 --unrolls 1,4,0 \
  --repeats 5 --out "$out" 2>&1 | tee "$out/throughput.log"
# rnnjax against Flax's own RNNs on the same accelerator (no TensorFlow needed either).
timeout 280 python3 -m benchmarks.flax_peers --cases rows:50,rows:1024,rows:4096 --rounds 5 \
  --out "$out" 2>&1 | tee "$out/flax_peers.log"
