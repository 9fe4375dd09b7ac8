#!/usr/bin/env bash
# Tokens/s of configs/moe_xs.yaml on one GPU, then on each GPU count of GPUS (default "2"; NCCL) with data parallel
# (dpN) and with expert parallel over all N (epN). Same global batch everywhere (default 32 sequences of 1024
# tokens: 2 micro-batches of 16 on one GPU, 1 per rank on two); GLOBAL_BATCH, MICRO_BATCH and LOG_INTERVAL override.
#   [GPUS="2 4"] [GLOBAL_BATCH=256 MICRO_BATCH=32 LOG_INTERVAL=10] bash benchmarks/parallel_scaling.sh OUT_DIR [STEPS] [SECONDS_PER_RUN]
# Writes OUT_DIR/{gpu1,dpN,epN}.log (one "step N | ... tokens_per_s ..." line per LOG_INTERVAL steps) and run dirs;
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
runs=(gpu1)
for n in ${GPUS:-2}; do
    for kind in dp ep; do
        extra=(); [ "$kind" = ep ] && extra=("parallel.expert=$n")
        timeout "$limit" python3 -m torch.distributed.run --standalone --nproc_per_node="$n" pretrain.py "${common[@]}" \
            "${extra[@]}" "logging.run_dir=$out/$kind$n" > "$out/$kind$n.log" 2>&1
        echo "$kind$n rc=$?" >> "$out/rc.txt"
        runs+=("$kind$n")
    done
done
cat "$out/rc.txt"
for r in "${runs[@]}"; do echo "== $r"; grep "^step" "$out/$r.log" | cut -c1-200 | tail -4; done
