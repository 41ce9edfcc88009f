#!/usr/bin/env bash
# The throughput table on an accelerator machine, no TensorFlow, in well under 5 minutes.
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
