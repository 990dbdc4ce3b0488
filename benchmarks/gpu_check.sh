#!/usr/bin/env bash
# The GPU checks of the core issue, as one script for a lent accelerator (see benchmarks/RESULTS.md), most
# important first: compiled hybrid vs compiled plain step (the MFU comparison the issue asks for), then eager,
# then the other objectives compiled. Writes logs and JSON to ${OUT:-/tmp/gpu_out}.
set -u
out=${OUT:-/tmp/gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/nvidia-smi.txt"
args="--variant B/16 --img-size 224 --batch 256 --warmup 5 --steps 20"
timeout 300 python3 benchmarks/step_throughput.py $args --compile --only plain,hybrid \
  --json "$out/compiled_hybrid.json" 2>&1 | tee "$out/compiled_hybrid.log"
timeout 150 python3 benchmarks/step_throughput.py $args --json "$out/eager.json" 2>&1 | tee "$out/eager.log"
timeout 240 python3 benchmarks/step_throughput.py $args --compile --only plain,simmim,mocov3 \
  --json "$out/compiled_rest.json" 2>&1 | tee "$out/compiled_rest.log"
# MAE (encoder on 25% of the tokens: well above SimMIM's images/s) and DINO (2 global + 8 local crops), bf16 eager
timeout 240 python3 benchmarks/step_throughput.py $args --only plain,simmim,mae,dino \
  --json "$out/mae_dino.json" 2>&1 | tee "$out/mae_dino.log"
