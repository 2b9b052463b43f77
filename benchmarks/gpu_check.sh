#!/bin/bash
# The GPU checks in one run (about 5 minutes on one H100): the CUDA-only tests, then the
# synthesis timings of docs/RESULTS.md "Synthesis time on one H100 GPU". Log: $OUT/gpu-check.log
# (OUT defaults to runs/gpu-check). Usage: bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
nvidia-smi -L
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
T0=$SECONDS
step() { echo; echo "=== [$((SECONDS - T0)) s] ${*:2}"; timeout "$@"; echo "exit $?"; }
step 180 python3 -m pytest -q -s -p no:cacheprovider tests -k cuda
B="python3 benchmarks/bench_synthesis.py --device cuda"
step 150 $B --iters 1000 --configs ce-only,psaq,dfq
step 150 $B --iters 200 --configs ce-only,psaq,dfq --no-cuda-graph
step 120 python3 -m dfqvit.cli synth --model zoo:deit-fmnist --calib dfq --calib-size 32 --seed 0 --device cuda \
  --out "$OUT/deit-fmnist-dfq-s0.safetensors"
echo "=== done in $((SECONDS - T0)) s"
