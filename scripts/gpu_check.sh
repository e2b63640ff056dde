#!/usr/bin/env bash
# The prepared command for a lent GPU (issue 23):
#   bash scripts/gpu_check.sh OUT_DIR
# 1. (about 2 min) `bench graphs`: the --cuda-graphs steps against the eager ones on a fixed batch (loss,
#    gradients, the graphed rollout replayed eagerly; exit 1 beyond bf16 tolerance) and ms per step of
#    each; `bench speed` at the atari100k preset, eager (--cuda-graphs False) and graphed.
# 2. the whole 100k Breakout run at the atari100k preset, stopped by SIGTERM at TRAIN_LIMIT seconds (400) if
#    it has not finished (it then writes a checkpoint; the figures say how far it got), and `wm-agent eval`
#    over 100 episodes; metrics.jsonl, summary.json, eval.json and the learning curve copied to OUT_DIR.
# Try it elsewhere first: DEVICE=cpu PRESET=debug bash scripts/gpu_check.sh /tmp/gpu_check (must pass).
# DEVICE, PRESET, STEPS, TRAIN_LIMIT, EPISODES, STAGES (speed,train: both; speed or train: one; a device
# call runs at most 10 minutes, so on a lent GPU run them as two calls; the train stage's 400 s, 20 s to
# stop and 120 s of evaluation fit one) and PYTHON may be set. Off CUDA the speed stages get 4x their limits.
set -uo pipefail
OUT=${1:-runs/gpu_check}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-atari100k}
STEPS=${STEPS:-100000}
TRAIN_LIMIT=${TRAIN_LIMIT:-400}
EPISODES=${EPISODES:-100}
STAGES=${STAGES:-speed,train}
SCALE=1
[ "$DEVICE" = cuda ] || SCALE=4
PY=${PYTHON:-python3}
RUN=${RUN_DIR:-/tmp/wm_gpu_run}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
status=0
step() {  # step NAME TIMEOUT_S ARGS...: one stage under a time limit (SIGTERM, then SIGKILL 20 s later)
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=20 "$limit" "$PY" -m agent.cli "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 20 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    echo "$name $rc $((SECONDS - t0))" >>"$OUT/stages.txt"
    # A training run stopped at its limit (124) wrote its checkpoint: what the stage is for.
    [ $rc -eq 0 ] || { [ "$name" = train ] && [ $rc -eq 124 ]; } || status=1
}
: >"$OUT/stages.txt"
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/nvidia_smi.txt"
fi
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)" | tee "$OUT/versions.txt"
if [[ $STAGES == *speed* ]]; then
    step graphs $((60 * SCALE)) bench graphs --device "$DEVICE" --preset "$PRESET" --out "$OUT/graphs.json"
    step speed_eager $((30 * SCALE)) bench speed --device "$DEVICE" --preset "$PRESET" --skip-env --skip-dyna \
        --out "$OUT/speed_eager.json" --cuda-graphs False
    step speed_graphed $((45 * SCALE)) bench speed --device "$DEVICE" --preset "$PRESET" --skip-env \
        --out "$OUT/speed_graphed.json" --cuda-graphs True
fi
if [[ $STAGES == *train* ]]; then
    rm -rf "$RUN"
    # The run's own limit: SIGTERM makes it finish the update in progress and write its checkpoint.
    step train "$TRAIN_LIMIT" train --env ALE/Breakout-v5 --preset "$PRESET" --device "$DEVICE" --steps "$STEPS" \
        --run-dir "$RUN" --checkpoint-every 0 --image-every 0
    [ "$(tail -n 1 "$OUT/stages.txt" | cut -d' ' -f2)" = 124 ] && echo "=== train stopped at its limit; its checkpoint is evaluated"
    for f in metrics.jsonl summary.json config.json; do cp "$RUN/$f" "$OUT/train_$f" 2>/dev/null; done
    step eval 120 eval "$RUN" --episodes "$EPISODES" --device "$DEVICE" --out "$OUT/eval.json"
    "$PY" -m scripts.plot_learning "$RUN" --random 1.7 --title "Breakout, $PRESET on $DEVICE" \
        --out "$OUT/learning_curve.png" >"$OUT/plot.log" 2>&1 || status=1
    "$PY" - "$RUN" "$OUT" <<'EOF' || status=1
import json, sys
from pathlib import Path
run, out = Path(sys.argv[1]), Path(sys.argv[2])
summary = json.loads((run / "summary.json").read_text())
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
last = rows[-1] if rows else {}
ev = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else {}
print("=== run:", {k: summary.get(k) for k in ("env_steps", "stopped_early", "train_seconds_total", "return_last100")})
print("=== updates:", {k: last.get(k) for k in ("world_model/updates", "policy/updates")})
print("=== time split:", {k: round(v, 3) for k, v in last.items() if k.startswith("time/")})
print("=== eval:", {k: ev.get(k) for k in ("episodes", "mean", "std", "env_steps_trained")})
EOF
fi
exit $status
