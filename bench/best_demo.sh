#!/usr/bin/env bash
# Picking the best model, checked on the demo: demo.sh's two stages with --save_total_limit 1 and an evaluation
# (dev loss + translation of every dev clip, 5 beams) every EVAL steps; then which checkpoints survived, whether
# O/best names the highest logged dev BLEU, and whether generate.py on O/best reproduces that BLEU.
# Usage: bash bench/best_demo.sh OUT_DIR       (EVAL, default 50; MASTER_PORT for two at once)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1
PORT=${MASTER_PORT:-29500}
EVAL=${EVAL:-50}
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR=cpu
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
launch="python -m deepspeed.launcher.runner --num_gpus 1 --master_port $PORT"
common="--data_dir $OUT/data --max_steps 300 --save_steps $EVAL --eval_steps $EVAL --save_total_limit 1
        --metric_for_best bleu --overwrite_output_dir --weight_decay 0"
python data.py --make_demo "$OUT/data"
$launch pretrain.py $common --output_dir "$OUT/stage1" --learning_rate 2e-3
$launch finetune.py $common --projector "$OUT/stage1" --output_dir "$OUT/stage2" --learning_rate 3e-3 2>&1 \
  | tee "$OUT/stage2.log"
best=$(cat "$OUT/stage2/best")
# the flags the training log names as the ones that repeat its evaluation
flags=$(grep -o 'generate.py --limit [0-9]* --num_beams [0-9]* --max_new_tokens [0-9]*' "$OUT/stage2.log" | tail -1 | cut -d' ' -f2-)
python generate.py --checkpoint "$OUT/stage2/best" --data_dir "$OUT/data" --split dev $flags \
  --output "$OUT/best.generation.json" --metrics_out "$OUT/best.metrics.json" --report "$OUT/best.report.html"
python - "$OUT" "$best" <<'PY'
import json, sys
from pathlib import Path
from signllava.curves import read_series
out, best = Path(sys.argv[1]), sys.argv[2]
for stage in ("stage1", "stage2"):
    d = out / stage
    rows = read_series(d / "metrics.jsonl")["dev_bleu"]          # step -> dev BLEU, as training logged it
    kept = sorted(p.name for p in d.glob("checkpoint-*"))
    print(f"{stage}: dev BLEU by step {rows}; kept {kept}; best -> {(d / 'best').read_text().strip()}")
top = max(rows, key=lambda s: (rows[s], -s))                      # stage 2's: the first of equal scores
met = json.loads((out / "best.metrics.json").read_text())
print(f"highest logged dev BLEU {rows[top]:.4f} at step {top}; O/best = {best}; "
      f"generate.py --checkpoint O/best: BLEU {met['bleu']:.4f} ({'reproduced' if abs(met['bleu'] - rows[top]) < 1e-9 else 'DIFFERS'})")
PY
