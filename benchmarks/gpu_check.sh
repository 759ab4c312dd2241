#!/usr/bin/env bash
# GPU checks in one go, within ten minutes on one GPU (never needed by CI):
#   1. qsd_8_256 W4 finetune with bf16 AMP, a few hundred synthetic steps: images/s, loss finite
#      and falling, peak memory;
#   2. the same finetune through torchrun --nproc-per-node 1 (nccl backend);
#   3. float vs W4 training-step time.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (writes OUT_DIR/gpu_check.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check-out}
mkdir -p "$out"
py=${PYTHON:-python}
export PYTHONUNBUFFERED=1 QSDCOMPRESS_QUIET=1
"$py" benchmarks/gpu_check.py amp --steps 300 --workdir "$out" | tee "$out/gpu_check.jsonl"
"$py" -m torch.distributed.run --nproc-per-node 1 -m qsdcompress.cli finetune "$out/converted.qsd" \
  --data synthetic:512 --steps 100 --batch-size 32 --lambda-kd 0 --lambda-fgd 0 --amp bf16 --device cuda \
  --eval-max-batches 2 --workdir "$out" --run-dir "$out/ddp" --output "$out/ddp.qsd" --json \
  | "$py" -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(json.dumps({"check":"torchrun nccl","world_size":r["world_size"],"steps":r["steps"],"images_per_s":r["history"][-1]["images_per_s"],"loss":r["losses"]["loss"]}))' \
  | tee -a "$out/gpu_check.jsonl"
"$py" benchmarks/gpu_check.py ratio --steps 20 --workdir "$out" | tee -a "$out/gpu_check.jsonl"
