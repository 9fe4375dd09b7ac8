#!/usr/bin/env bash
# Tokens/s of configs/moe_xs.yaml on one GPU, then on two GPUs (NCCL) with data parallel and with expert parallel.
# Same global batch everywhere (default 32 sequences of 1024 tokens: 2 micro-batches of 16 on one GPU, 1 per rank
# on two); GLOBAL_BATCH, MICRO_BATCH and LOG_INTERVAL override.
#   [GLOBAL_BATCH=256 MICRO_BATCH=32 LOG_INTERVAL=10] bash benchmarks/parallel_scaling.sh OUT_DIR [STEPS] [SECONDS_PER_RUN]
# Writes OUT_DIR/{gpu1,dp2,ep2}.log (one "step N | ... tokens_per_s ..." line per 50 steps) and run dirs;
# results: benchmarks/results/parallel_scaling_h200x2.{json,md}.
set -u
out=${1:?usage: parallel_scaling.sh OUT_DIR [STEPS] [SECONDS_PER_RUN]}
steps=${2:-300}
limit=${3:-100}
export NCCL_NVLS_ENABLE=0
common=(--config configs/moe_xs.yaml "train.steps=$steps" "train.micro_batch_size=${MICRO_BATCH:-16}"
        "train.global_batch_size=${GLOBAL_BATCH:-32}" "train.log_interval=${LOG_INTERVAL:-50}" train.eval_interval=0
        checkpoint.save=false)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/device.txt" 2>&1
timeout "$limit" python3 pretrain.py "${common[@]}" "logging.run_dir=$out/gpu1" > "$out/gpu1.log" 2>&1
echo "gpu1 rc=$?" >> "$out/rc.txt"
timeout "$limit" python3 -m torch.distributed.run --standalone --nproc_per_node=2 pretrain.py "${common[@]}" \
    "logging.run_dir=$out/dp2" > "$out/dp2.log" 2>&1
echo "dp2 rc=$?" >> "$out/rc.txt"
timeout "$limit" python3 -m torch.distributed.run --standalone --nproc_per_node=2 pretrain.py "${common[@]}" \
    parallel.expert=2 "logging.run_dir=$out/ep2" > "$out/ep2.log" 2>&1
echo "ep2 rc=$?" >> "$out/rc.txt"
cat "$out/rc.txt"
for r in gpu1 dp2 ep2; do echo "== $r"; grep "^step" "$out/$r.log" | cut -c1-200 | tail -4; done
