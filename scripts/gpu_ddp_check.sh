#!/usr/bin/env bash
# Two-GPU checks of `visionlin train` / `visionlin distill` through accelerate, on a generated 10-class ImageFolder
# (32 px, 3,200 training and 500 validation images), in under 8 minutes:
#
#   one_gpu        1 GPU, batch 64, EMA                                 (the reference for DDP)
#   one_gpu_repeat the same again (on the other GPU)                    run-to-run determinism of one GPU
#   one_gpu_accum  1 GPU, 2 micro-batches of 32 (the same global batch) the drift of a changed summation order alone
#   ddp            2 GPUs (DDP), 2 x 32, EMA, recovery checkpoints       losses vs one_gpu, val counted once (500)
#   ddp_killed     the same run SIGKILLed (all processes) after step 90 (mid-epoch), then --resume auto: losses vs ddp
#   fsdp           2 GPUs, --fsdp (FSDP2), 2 x 32                        losses vs ddp
#   fsdp_killed    the same run killed after step 90 and resumed: losses vs fsdp (full-state checkpoints)
#   distill_ddp    2 GPUs: a depth-6 student distilled from the one_gpu model (logits, matched layers, masked
#                  prediction), bf16 autocast
#   distill_fsdp   the same with --fsdp
#
#   scripts/gpu_ddp_check.sh [OUT]        (OUT defaults to $OUT; run from the repository root)
#   scripts/gpu_ddp_check.sh OUT smoke    the same stages on the CPU (torchrun, gloo) with tiny data, to check the
#                                         script itself, without the --fsdp stages (accelerate forms FSDP on GPUs only)
#
# Writes OUT/ddp_check/<stage>.log, the run folders under OUT/ddp_check/runs/, and OUT/ddp_check/summary.json (per
# stage: exit status, seconds; per comparison: the largest relative loss difference and the verdict). Each stage is
# bounded by `timeout` and by the script's 460 s budget; a stage that runs out still leaves its log.
set -u
OUT=${1:-${OUT:?pass OUT or set the OUT variable}}
MODE=${2:-gpu}
D=$OUT/ddp_check
mkdir -p "$D/runs"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
PY=python3
BUDGET=${DDP_BUDGET:-460}
STAGES=$D/stages.tsv
: > "$STAGES"

# images per class, batch per process (one process: twice), checkpoint interval, the step after which runs are killed
PER_CLASS=320 B=32 EVERY=30 KILL=90 VAL=50 EPOCHS=4 SLOW=${DDP_SLOW:-1} SIZE=()  # DDP_SLOW: a shared machine
if [[ $MODE == smoke ]]; then
  PER_CLASS=8 B=2 EVERY=2 KILL=6 VAL=3 EPOCHS=2 BUDGET=2400 SLOW=5 SIZE=(embed_dim=32 num_heads=2)
  export OMP_NUM_THREADS=1
fi
KILL_LINE=$(printf 'checkpoint step-%09d (recovery' "$KILL")
MODEL=(--model infvit_tiny --img-size 32 --model-kwargs patch_size=4 "${SIZE[@]}")
COMMON=(--data-dir "$D/data" --epochs $EPOCHS --warmup-epochs 1 --lr 1e-3 --log-interval 5 --workers 4 --no-plot
        --smoothing 0.1 --seed 0 --output "$D/runs")
STUDENT=(--model infvit_tiny --img-size 32 --model-kwargs patch_size=4 depth=6 "${SIZE[@]}")
DISTILL=(--teacher infvit_tiny --teacher-kwargs patch_size=4 "${SIZE[@]}" --teacher-checkpoint "$D/runs/one_gpu"
         --distill-logits 1 --distill-temperature 2 --match-layers 3:6,6:12 --mask-weight 1 --mask-ratio 0.5 --amp
         --data-dir "$D/data" --epochs 2 --warmup-epochs 1 --lr 1e-3 --log-interval 5 --workers 4 --no-plot
         --seed 0 --output "$D/runs" -b $B)

launch2() {  # launch2 PORT ARGS...: two processes, one per GPU
  local port=$1
  shift
  if [[ $MODE == smoke ]]; then
    $PY -m torch.distributed.run --nproc_per_node 2 --master_port "$port" "$@"
    return
  fi
  $PY -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
    --dynamo_backend no --main_process_port "$port" "$@"
}

export -f launch2
export PY MODE
tree() {  # tree PID: PID and every process below it (torchrun / accelerate start each worker in its own session)
  local c
  echo "$1"
  for c in $(pgrep -P "$1"); do tree "$c"; done
}

left() { echo $((BUDGET - SECONDS)); }

stage() {  # stage NAME LIMIT CMD...: run CMD under min(LIMIT, budget left), log to D/NAME.log
  local name=$1 limit=$(($2 * SLOW)) t0=$SECONDS rc
  shift 2
  local budget
  budget=$(left)
  ((budget < limit)) && limit=$budget
  if ((limit < 20)); then
    echo "== $name skipped (budget)"
    printf '%s\tskipped\t0\n' "$name" >> "$STAGES"
    return
  fi
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" > "$D/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) >> "$STAGES"
  grep -E "^epoch [0-9]+ done|rror|Traceback" "$D/$name.log" | tail -4
}

killed_then_resumed() {  # NAME PORT ARGS...: kill every process after checkpoint step 90 (mid-epoch 2), then resume
  local name=$1 port=$2 t0=$SECONDS
  shift 2
  if (($(left) < 60)); then
    echo "== $name skipped (budget)"
    printf '%s\tskipped\t0\n' "$name" >> "$STAGES"
    return
  fi
  echo "== $name (kill after step $KILL)"
  setsid bash -c '"$@"' "$name" launch2 "$port" "$@" > "$D/$name.log" 2>&1 &
  local pid=$! waited=0
  until grep -q "^$KILL_LINE" "$D/$name.log" 2>/dev/null; do
    sleep 0.2
    waited=$((waited + 1))
    if ((waited > 5 * 90 * SLOW)) || ! kill -0 "$pid" 2>/dev/null; then break; fi
  done
  local doomed
  doomed=$(tree "$pid")
  kill -KILL $doomed 2>/dev/null
  wait "$pid" 2>/dev/null
  sleep 1
  for p in $doomed; do
    if [[ $(ps -o stat= -p "$p" 2>/dev/null) == [^Z]* ]]; then echo "process $p survived the kill"; fi
  done
  echo "killed at: $(grep -c '^epoch [0-9]* step' "$D/$name.log") progress lines, $(ls "$D/runs/$name/checkpoints")"
  printf '%s\t%s\t%s\n' "$name-killed" 137 $((SECONDS - t0)) >> "$STAGES"
  stage "$name-resumed" 90 launch2 $((port + 1)) "$@" --resume auto
}

echo "== data"
$PY - "$D/data" "$PER_CLASS" "$VAL" <<'EOF'
import sys
from visionlin.train.data import make_synthetic_imagefolder
make_synthetic_imagefolder(sys.argv[1], classes=10, train_per_class=int(sys.argv[2]), val_per_class=int(sys.argv[3]),
                           size=32, seed=0)
EOF
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$D/gpus.txt" 2>&1
$PY -c "import torch, accelerate, timm; print(torch.__version__, accelerate.__version__, timm.__version__)" \
  > "$D/versions.txt" 2>&1

stage one_gpu 70 env CUDA_VISIBLE_DEVICES=0 $PY -m visionlin.train "${MODEL[@]}" "${COMMON[@]}" -b $((2 * B)) \
  --model-ema --model-ema-decay 0.99 --experiment one_gpu
if [[ $MODE != smoke ]]; then  # what one GPU alone does: a repeat (is it deterministic?) and the same global batch as
  # two micro-batches (only the summation order differs from one_gpu, as in DDP), side by side on the two GPUs
  stage one_gpu_repeat 70 env CUDA_VISIBLE_DEVICES=1 $PY -m visionlin.train "${MODEL[@]}" "${COMMON[@]}" \
    -b $((2 * B)) --model-ema --model-ema-decay 0.99 --experiment one_gpu_repeat &
  stage one_gpu_accum 70 env CUDA_VISIBLE_DEVICES=0 $PY -m visionlin.train "${MODEL[@]}" "${COMMON[@]}" -b $B \
    --grad-accum-steps 2 --model-ema --model-ema-decay 0.99 --experiment one_gpu_accum
  wait
fi
stage ddp 80 launch2 29611 -m visionlin.train "${MODEL[@]}" "${COMMON[@]}" -b $B --model-ema \
  --model-ema-decay 0.99 --recovery-interval "$EVERY" --experiment ddp
killed_then_resumed ddp_killed 29621 -m visionlin.train "${MODEL[@]}" "${COMMON[@]}" -b $B --model-ema \
  --model-ema-decay 0.99 --recovery-interval "$EVERY" --experiment ddp_killed
if [[ $MODE != smoke ]]; then  # accelerate forms FSDP on GPUs only
  stage fsdp 80 launch2 29631 -m visionlin.train "${MODEL[@]}" "${COMMON[@]}" -b $B --fsdp --recovery-interval "$EVERY" \
    --experiment fsdp
  killed_then_resumed fsdp_killed 29641 -m visionlin.train "${MODEL[@]}" "${COMMON[@]}" -b $B --fsdp \
    --recovery-interval "$EVERY" --experiment fsdp_killed
fi
stage distill_ddp 70 launch2 29651 -m visionlin.cli distill "${STUDENT[@]}" "${DISTILL[@]}" --experiment distill_ddp
if [[ $MODE != smoke ]]; then
  stage distill_fsdp 70 launch2 29661 -m visionlin.cli distill "${STUDENT[@]}" "${DISTILL[@]}" --fsdp \
    --experiment distill_fsdp
fi

$PY - "$D" <<'EOF'
import json
import math
import sys
from pathlib import Path

from visionlin.train.plot import read_log

d = Path(sys.argv[1])
stages = {}
for line in (d / "stages.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    stages[name] = {"rc": rc, "seconds": int(secs)}


def log(name):
    p = d / "runs" / name
    return read_log(p) if (p / "log.jsonl").is_file() else None


def losses(name):
    lg = log(name)
    return {r["step"]: r["loss"] for r in lg["train"]} if lg else {}


def compare(a, b, rel_ok):
    la, lb = losses(a), losses(b)
    common = sorted(set(la) & set(lb))
    if not common:
        return {"steps": 0, "verdict": "missing"}
    rel = [abs(la[s] - lb[s]) / max(abs(la[s]), 1e-12) for s in common]
    worst = max(range(len(rel)), key=rel.__getitem__)
    early = [r for s, r in zip(common, rel) if s <= 20]
    return {"steps": len(common), "last_step": common[-1], "max_rel": rel[worst], "at_step": common[worst],
            "max_rel_first_20_steps": max(early, default=None),
            "rel_at": {s: float(f"{r:.2e}") for s, r in zip(common, rel) if s in (5, 10, 15, 20, 50, 100, 200)},
            "verdict": "ok" if rel[worst] <= rel_ok else f"DIFFERS (> {rel_ok})"}


runs = {}
for name in ("one_gpu", "one_gpu_repeat", "one_gpu_accum", "ddp", "ddp_killed", "fsdp", "fsdp_killed", "distill_ddp", "distill_fsdp"):
    lg = log(name)
    if lg is None:
        runs[name] = None
        continue
    ep = lg["epoch"][-1] if lg["epoch"] else {}
    tr = lg["train"]
    runs[name] = {"steps": tr[-1]["step"] if tr else 0, "first_loss": tr[0]["loss"] if tr else None,
                  "last_loss": tr[-1]["loss"] if tr else None,
                  "finite": all(math.isfinite(r["loss"]) for r in tr),
                  "img_s_median": sorted(r["img_s"] for r in tr)[len(tr) // 2] if tr else None,
                  **{k: ep[k] for k in ("val_top1", "val_loss", "val_n", "ema_val_top1") if k in ep}}
summary = {
    "stages": stages,
    "runs": runs,
    # other processes sum in other orders (and cuDNN's convolutions use TF32 by default): differences grow over the
    # steps, so a loose bound, with the first 20 steps reported apart; resumed runs should be (near) identical
    "one_gpu_repeat_vs_one_gpu": compare("one_gpu", "one_gpu_repeat", 1e-4),
    # the reference for judging ddp_vs_one_gpu: the same data and global batch on one GPU, summed in two halves
    "one_gpu_accum_vs_one_gpu": compare("one_gpu", "one_gpu_accum", 5e-3),
    "ddp_vs_one_gpu": compare("one_gpu", "ddp", 5e-3),
    "ddp_resumed_vs_ddp": compare("ddp", "ddp_killed", 1e-4),
    "fsdp_vs_ddp": compare("ddp", "fsdp", 5e-3),
    "fsdp_resumed_vs_fsdp": compare("fsdp", "fsdp_killed", 1e-4),
    "val_counted_once": {k: (v or {}).get("val_n") for k, v in runs.items()},
}
(d / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
echo "total ${SECONDS}s"
