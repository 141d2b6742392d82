#!/usr/bin/env bash
# One device call that always returns its results: groups of scripts/gpu_check.sh stages run side by side (one group
# per GPU, or several on one), everything still running is stopped STOP_AT seconds after the start, and the results are
# packed into OUT before the call's own limit (the device tool returns at most 8 files, none if the command overruns).
#
#   scripts/gpu_session.sh OUT COMMIT STOP_AT "GPU:stage stage ..." ["GPU:stage ..." ...]
#   e.g. scripts/gpu_session.sh "$OUT" abc1234 540 "0:tests-rerun bench-na" "1:fmnist-finish"
#
# Each group writes under /tmp/gpu_session/g<i> (its stages' JSON, PNG and logs) and its console to g<i>/console.txt.
# At the end: OUT/results.tgz (every group's folder) and OUT/summary.txt (each group's last console lines). A group
# may also be run through another script: "0,1:ddp" runs scripts/gpu_ddp_check.sh on both GPUs.
set -u
OUT=$1
COMMIT=$2
STOP_AT=$3
shift 3
W=/tmp/gpu_session
rm -rf "$W"
mkdir -p "$W" "$OUT"
pids=()
i=0
for group in "$@"; do
  gpus=${group%%:*}
  stages=${group#*:}
  d=$W/g$i
  mkdir -p "$d"
  echo "group $i on GPU $gpus: $stages" | tee -a "$W/groups.txt"
  if [[ $stages == ddp ]]; then
    (CUDA_VISIBLE_DEVICES=$gpus DDP_BUDGET=$((STOP_AT - 40)) setsid bash scripts/gpu_ddp_check.sh "$d" \
      > "$d/console.txt" 2>&1) &
  else
    # shellcheck disable=SC2086  # the stages are separate words
    (CUDA_VISIBLE_DEVICES=$gpus setsid bash scripts/gpu_check.sh "$d" "$COMMIT" $stages > "$d/console.txt" 2>&1) &
  fi
  pids+=($!)
  i=$((i + 1))
done
while ((SECONDS < STOP_AT)); do
  alive=0
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  ((alive)) || break
  sleep 2
done
if ((SECONDS >= STOP_AT)); then
  echo "stopping what still runs at ${SECONDS}s"
  for p in $(pgrep -f "scripts/gpu_(check|ddp_check).sh"); do kill -TERM -- -"$(ps -o sid= -p "$p" | tr -d ' ')" 2>/dev/null; done
  sleep 3
  pkill -KILL -f "visionlin|benchmarks/|pytest" 2>/dev/null
fi
for ((j = 0; j < i; j++)); do
  { echo "=== group $j: $(sed -n "$((j + 1))p" "$W/groups.txt")"; tail -25 "$W/g$j/console.txt"; } >> "$OUT/summary.txt"
done
tar czf "$OUT/results.tgz" -C "$W" --exclude='checkpoints' --exclude='data' --exclude='*.safetensors' . 2>/dev/null
ls -la "$OUT"
cat "$OUT/summary.txt"
