#!/usr/bin/env bash
# The GPU check of issue 6, for a machine with one CUDA GPU: at most 9.5 minutes, about 8 on an H100
# (most of it torch.compile's first compilation and the training run, each stopped at its limit).
#   bash scripts/gpu_check.sh OUT_DIR
# 1. `bench speed` at the atari100k preset with bf16 autocast, eager (env, replay, world model,
#    imagination, one Dyna iteration's split, the projected hours of a whole atari100k run);
# 2. the same with the world-model loss under torch.compile;
# 3. the same in fp32 (no autocast), for the bf16 gain;
# 4. a short `wm-agent train` on Breakout at the atari100k preset (the whole CUDA path: warm-up,
#    world-model pre-training, Dyna iterations, a checkpoint) and `wm-agent eval` of its checkpoint.
# DEVICE, PRESET, TRAIN_STEPS and PYTHON may be set to try the script elsewhere (e.g. DEVICE=cpu PRESET=debug).
set -uo pipefail
OUT=${1:-runs/gpu_check}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-atari100k}
TRAIN_STEPS=${TRAIN_STEPS:-7168}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
status=0
step() {  # step NAME TIMEOUT_S ARGS...: run one stage with a time limit, log it, keep going on failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$PY" -m agent.cli "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
}
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/nvidia_smi.txt"
fi
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
step speed_bf16 120 bench speed --device "$DEVICE" --preset "$PRESET" --out "$OUT/speed_bf16.json"
step speed_bf16_compile 240 bench speed --device "$DEVICE" --preset "$PRESET" --skip-env --compile \
    --out "$OUT/speed_bf16_compile.json"
step speed_fp32 60 bench speed --device "$DEVICE" --preset "$PRESET" --skip-env --skip-dyna --no-amp \
    --out "$OUT/speed_fp32.json"
rm -rf /tmp/wm_gpu_run
step train 120 train --env ALE/Breakout-v5 --preset "$PRESET" --device "$DEVICE" --steps "$TRAIN_STEPS" \
    --run-dir /tmp/wm_gpu_run --checkpoint-every 0 --image-every 0
cp /tmp/wm_gpu_run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
step eval 45 eval /tmp/wm_gpu_run --episodes 8 --device "$DEVICE" --out "$OUT/eval.json"
exit $status
