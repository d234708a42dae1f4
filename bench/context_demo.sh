#!/usr/bin/env bash
# Context that helps, measured on the demo: the demo language with --demo_context (a pointing sign whose English
# is the previous sentence's subject), demo.sh's two stages with --context_window 1, then dev BLEU with none /
# predicted / gold context. Extra arguments go to both stages (e.g. --context_dropout 0.25 --context_noise 0.25).
# Usage: bash bench/context_demo.sh OUT_DIR [training flags]
#   MASTER_PORT=N for two at once; STEPS1 / STEPS2 (default 300 / 300, as demo.sh) for shorter runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1
shift
PORT=${MASTER_PORT:-29500}
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR=cpu
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
python data.py --make_demo "$OUT/data" --demo_context
python -m deepspeed.launcher.runner --num_gpus 1 --master_port "$PORT" pretrain.py --data_dir "$OUT/data" \
  --output_dir "$OUT/stage1" --max_steps "${STEPS1:-300}" --learning_rate 2e-3 --save_steps 100 --eval_steps 100 \
  --overwrite_output_dir --context_window 1 "$@"
python -m deepspeed.launcher.runner --num_gpus 1 --master_port "$PORT" finetune.py --projector "$OUT/stage1" \
  --data_dir "$OUT/data" --output_dir "$OUT/stage2" --max_steps "${STEPS2:-300}" --learning_rate 3e-3 \
  --save_steps 100 --eval_steps 100 --overwrite_output_dir --context_window 1 "$@"
for context in none predicted gold; do
  python generate.py --checkpoint "$OUT/stage2" --data_dir "$OUT/data" --split dev --context "$context" \
    --output "$OUT/dev.$context.json" --metrics_out "$OUT/dev.$context.metrics.json"
done
python -c "import json; print('$OUT', *(f\"{c} {json.load(open(f'$OUT/dev.{c}.metrics.json'))['bleu']:.2f}\" for c in ('none', 'predicted', 'gold')))"
