#!/usr/bin/env bash
# Issue 9's paired runs on one host of NGPU GPUs: MoE-Medium with NGPU-way expert parallelism (data parallel over
# the same ranks for the dense weights) and Transformer-Medium data parallel, same global batch, same lease.
#   NGPU=8 [STEPS=300] [MICRO=8] [GLOBAL=512] [LOG=10] [BACKEND=scatter] [LIMIT=seconds per run] \
#       bash benchmarks/scale_out.sh OUT_DIR
# Writes OUT_DIR/{moe_medium,transformer_medium}.log and run dirs (metrics.jsonl: tokens/s, TFLOP/s, MFU, memory).
set -u
out=${1:?usage: NGPU=N bash benchmarks/scale_out.sh OUT_DIR}
n=${NGPU:?set NGPU}
export NCCL_NVLS_ENABLE=0
common=("train.steps=${STEPS:-300}" "train.micro_batch_size=${MICRO:-8}" "train.global_batch_size=${GLOBAL:-512}"
        "train.log_interval=${LOG:-10}" train.eval_interval=0 checkpoint.save=false)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/device.txt" 2>&1
for run in moe_medium transformer_medium; do
    extra=(); [ "$run" = moe_medium ] && extra=("parallel.expert=$n" "moe.backend=${BACKEND:-scatter}")
    timeout "${LIMIT:-1200}" python3 -m torch.distributed.run --standalone --nproc_per_node="$n" pretrain.py \
        --config "configs/$run.yaml" "${common[@]}" "${extra[@]}" "logging.run_dir=$out/$run" > "$out/$run.log" 2>&1
    echo "$run rc=$?" >> "$out/rc.txt"
done
cat "$out/rc.txt"
for run in moe_medium transformer_medium; do echo "== $run"; grep -E "^(step|layout|params|vocab)" "$out/$run.log" | cut -c1-220 | tail -6; done
