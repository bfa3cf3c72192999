#!/usr/bin/env bash
# One-shot training on a lent GPU machine (train/device/README.md): the campaign's arms side by
# side on one GPU, each with the same time budget, then their best checkpoints (without the
# optimiser state) packed into $OUT in parts small enough to come back.
#
#   FER_TRAIN_COMMIT=<sha> BUDGET=7m DATA=.device/fer2013.npz.xz OUT=<folder> [PLAN=finetune] train/device/oneshot.sh
#
# SMOKE=1 trains each arm for two batches on a few faces (a dry run of the script, e.g. on CPU).
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${DATA:?DATA=<packed FER2013 (python -m train pack)>}" "${OUT:?OUT=<folder for the results>}"
BUDGET="${BUDGET:-7m}"
PYTHON="${PYTHON:-python3}"
RUNS="${RUNS:-runs/device}"
THREADS="${THREADS:-2}"
FIT_TIMEOUT="${FIT_TIMEOUT:-}"  # e.g. 8m: a hard stop per arm (its checkpoints of each epoch stay)

# name | fit options. PLAN=scratch: the committed versions' recipes from scratch (two seeds per
# resnet). PLAN=finetune: four warm starts of the committed resnet ($PARENT), each with its own
# seed, for `python -m train soup` (on the CPU such rounds gained 0.84, 0.58, then 0.06 points).
PLAN="${PLAN:-scratch}"
PARENT="${PARENT:-model_store/resnet/6}"
case "$PLAN" in
    scratch) ARMS=(
        "resnet-s21|--model resnet --opt width=16 --aug crop=40 --lr 0.02 --seed 21"
        "resnet-s22|--model resnet --opt width=16 --aug crop=40 --lr 0.02 --seed 22"
        "resnet-plain-s21|--model resnet-plain --opt width=16 --aug crop=40 --lr 0.02 --seed 21"
        "resnet-plain-s22|--model resnet-plain --opt width=16 --aug crop=40 --lr 0.02 --seed 22"
        "cnn10-s21|--model cnn10 --opt batch_norm=true --lr 0.01 --seed 21"
    ) ;;
    finetune) ARMS=()
        for seed in 31 32 33 34; do
            ARMS+=("resnet-ft$seed|--model resnet --opt width=16 --aug crop=40 --init-from $PARENT --lr 0.01 --seed $seed")
        done ;;
    *) echo "PLAN=$PLAN: expected scratch or finetune" >&2; exit 2 ;;
esac
smoke=()
[ "${SMOKE:-0}" = 1 ] && smoke=(--subset-per-class 20 --max-batches-per-epoch 2 --epochs 2)

mkdir -p "$RUNS" "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  echo "commit ${FER_TRAIN_COMMIT:-unknown}  budget $BUDGET  plan $PLAN  arms ${#ARMS[@]}"; } | tee "$OUT/env.txt"

pids=()
for arm in "${ARMS[@]}"; do
    name="${arm%%|*}"
    # shellcheck disable=SC2206  # the options are separate words
    options=(${arm#*|})
    ${FIT_TIMEOUT:+timeout "$FIT_TIMEOUT"} "$PYTHON" -m train fit "${options[@]}" --data "$DATA" --run-dir "$RUNS/$name" \
        --epochs 1000 --early-stop-patience 1000 --time-budget "$BUDGET" --threads "$THREADS" \
        "${smoke[@]}" >"$RUNS/$name.out" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for arm in "${ARMS[@]}"; do
    name="${arm%%|*}"
    tail -n 3 "$RUNS/$name/log.txt" 2>/dev/null | sed "s|^|$name: |" || tail -n 5 "$RUNS/$name.out"
done

# best.pt without the optimiser (export, compare and soup need the weights, not the momentum)
"$PYTHON" - "$RUNS" <<'PY'
import sys
from pathlib import Path
import torch
for best in sorted(Path(sys.argv[1]).glob("*/best.pt")):
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    checkpoint.pop("optimizer", None)
    torch.save(checkpoint, best.with_name("weights.pt"))
PY
tar -C "$RUNS" -cf "$RUNS.tar" --exclude=last.pt --exclude=best.pt .
split -b 15M -d "$RUNS.tar" "$OUT/runs.tar.part-"
ls -l "$OUT"
exit "$status"
