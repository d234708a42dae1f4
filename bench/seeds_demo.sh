#!/usr/bin/env bash
# The README's comparison table: the demo's stage 1 once, stage 2 with three seeds (checkpoints 150 and 300),
# generate.py on each, then python -m signllava.compare -- two checkpoints of one run, and three seeds.
#   bash bench/seeds_demo.sh [OUT]          (CPU: about 10 minutes on an idle 2-core machine)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR=cpu
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
OUT=${1:-runs/seeds}
PORT=${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
start=$(date +%s)
python data.py --make_demo "$OUT/data"
# demo.sh's recipe
deepspeed --num_gpus 1 --master_port "$PORT" pretrain.py --data_dir "$OUT/data" --output_dir "$OUT/stage1" --max_steps 300 \
  --learning_rate 2e-3 --save_steps 300 --eval_steps 300 --eval_generate 0 --overwrite_output_dir --weight_decay 0
for seed in 1 2 3; do
  deepspeed --num_gpus 1 --master_port "$PORT" finetune.py --projector "$OUT/stage1" --data_dir "$OUT/data" \
    --output_dir "$OUT/stage2-seed$seed" --seed "$seed" --max_steps 300 --learning_rate 3e-3 --save_steps 150 \
    --eval_steps 150 --save_total_limit 0 --overwrite_output_dir --weight_decay 0
done
gen() {   # gen CHECKPOINT NAME
  python generate.py --checkpoint "$1" --data_dir "$OUT/data" --split dev --output "$OUT/$2.json" \
    --metrics_out "$OUT/$2.metrics.json"
}
gen "$OUT/stage2-seed1/checkpoint-150" step150.seed1
for seed in 1 2 3; do gen "$OUT/stage2-seed$seed/checkpoint-300" "step300.seed$seed"; done
python -m signllava.compare "$OUT/step300.seed1.json" "$OUT/step150.seed1.json" --report "$OUT/checkpoints.html" \
  --json "$OUT/checkpoints.json" | tee "$OUT/checkpoints.md"
python -m signllava.compare "$OUT"/step300.seed{1,2,3}.json --json "$OUT/seeds.json" | tee "$OUT/seeds.md"
echo "done in $(( $(date +%s) - start )) s"
