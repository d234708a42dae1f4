#!/usr/bin/env bash
# The README's modality table: the demo (demo.sh's two stages) trained without and with --modality_dropout,
# then dev BLEU from all modalities and from each single one (the others given their learned absent rows).
# Usage: bash bench/modality_subsets.sh [OUT_DIR] [DROPOUT] [RUNS] [PORT]
#        (defaults runs/modalities, 0.5, "plain dropout", 29500; two invocations with one run each and
#        distinct ports train side by side, and a last one with both prints the table)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/modalities}
P=${2:-0.5}
RUNS=${3:-plain dropout}
PORT=${4:-29500}
# LAUNCH (default: the deepspeed launcher), PY (default python) and STAGE2_FLAGS (e.g. "--bits 16" where
# bitsandbytes is missing) adapt the commands to a machine without the venv's tools.
PY=${PY:-python}
LAUNCH=${LAUNCH:-deepspeed --num_gpus 1 --master_port $PORT}
STAGE2_FLAGS=${STAGE2_FLAGS:-}
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR=cpu
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
[ -f "$OUT/data/annotation.train.json" ] || $PY data.py --make_demo "$OUT/data"
for run in $RUNS; do
  flags=""; [ $run = dropout ] && flags="--modality_dropout $P"
  if [ ! -f "$OUT/$run/stage2/train_summary.json" ]; then
    $LAUNCH pretrain.py --data_dir "$OUT/data" --output_dir "$OUT/$run/stage1" --max_steps 300 \
      --learning_rate 2e-3 --save_steps 100 --eval_steps 100 --overwrite_output_dir $flags
    $LAUNCH finetune.py --projector "$OUT/$run/stage1" --data_dir "$OUT/data" \
      --output_dir "$OUT/$run/stage2" --max_steps 300 --learning_rate 3e-3 --save_steps 100 --eval_steps 100 \
      --overwrite_output_dir $flags $STAGE2_FLAGS
  fi
  [ -f "$OUT/$run/dev.pose.metrics.json" ] && continue
  for mods in all mae sign2vec dino pose; do
    sel=""; [ $mods = all ] || sel="--modalities $mods"
    $PY generate.py --checkpoint "$OUT/$run/stage2" --data_dir "$OUT/data" --split dev $sel \
      --output "$OUT/$run/dev.$mods.json" --metrics_out "$OUT/$run/dev.$mods.metrics.json" | head -2
  done
done
[ "$RUNS" = "plain dropout" ] || exit 0
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
mods = ["all", "mae", "sign2vec", "dino", "pose"]
print("| training | " + " | ".join(mods) + " |")
print("|---" * (len(mods) + 1) + "|")
for run in ("plain", "dropout"):
    b = [json.load(open(f"{out}/{run}/dev.{m}.metrics.json"))["bleu"] for m in mods]
    print(f"| {run} | " + " | ".join(f"{x:.2f} ({100 * x / b[0]:.0f} %)" if i else f"{x:.2f}" for i, x in enumerate(b)) + " |")
PY
