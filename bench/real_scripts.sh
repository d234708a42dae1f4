#!/usr/bin/env bash
# The real DeepSpeed scripts at 8B on one GPU, profiled: where QLoRA's step time goes under ZeRO-2 (with
# --compile_layers, against bench/benchmark.py's (g) at the same packed budget) and under ZeRO-3.
# Usage (one device call, about 8 minutes on an H200): bash bench/real_scripts.sh OUT [BUDGET]
# Writes OUT/<run>/{metrics.jsonl,profile/,log} for stage1 (a short run, only for its projector),
# qlora-zero2 and qlora-zero3, and OUT/summary.txt: real tokens/s after the compiling steps and each profile's
# wall and device-busy time a step (steps 32-34 under ZeRO-2, 7-9 under ZeRO-3).
# While the model is written, bench/data_index.py measures the dataset index's first start at YouTube-ASL
# size on this host's cores (OUT/data_index.log); the trainings start after it has finished.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1
BUDGET=${2:-13542}
W=${W:-/tmp/real8b}
SHAPE=${SHAPE:-8b}                        # tiny: a dry run of the whole script on a CPU
INDEX_SIZES=${INDEX_SIZES:-150000 600000}
mkdir -p "$OUT"
python bench/data_index.py --sizes $INDEX_SIZES --shards 16 --modes new_cold new_warm --copy_to "$OUT" \
  > "$OUT/data_index.log" 2>&1 &
index=$!
[ -f "$W/llm/config.json" ] || python bench/prepare_8b.py "$W" --shape "$SHAPE" --train 600 --dev 32 --frames 100,350
wait $index || echo "data_index failed (see data_index.log)"

common=(--data_dir "$W/data" --model "$W/llm" --num_workers 2 --logging_steps 5 --eval_steps 1000
        --save_steps 1000 --eval_generate 0 --overwrite_output_dir)
run() {   # name, timeout seconds, script and flags
  local name=$1 limit=$2; shift 2
  timeout "$limit" deepspeed --num_gpus 1 "$@" --output_dir "$W/$name" > "$OUT/$name.log" 2>&1 \
    || echo "$name: exit $?" | tee -a "$OUT/summary.txt"
  mkdir -p "$OUT/$name/profile"        # the timeline (trace.json) stays on the machine: tens of MB
  cp "$W/$name/metrics.jsonl" "$OUT/$name/" 2>/dev/null || true
  cp "$W/$name/profile/summary.json" "$W/$name/profile/ops.txt" "$OUT/$name/profile/" 2>/dev/null || true
}
run stage1 150 pretrain.py "${common[@]}" --max_steps 2 --max_tokens_per_batch 8000
run qlora-zero2 240 finetune.py "${common[@]}" --projector "$W/stage1" --max_steps 36 --compile_layers \
  --max_tokens_per_batch "$BUDGET" --profile_steps 31:34
run qlora-zero3 150 finetune.py "${common[@]}" --projector "$W/stage1" --max_steps 10 \
  --max_tokens_per_batch "$BUDGET" --profile_steps 6:9 --deepspeed_config ds_config_zero3.json

python - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("qlora-zero2", "qlora-zero3"):
    m = out / name / "metrics.jsonl"
    rows = [json.loads(l) for l in m.read_text().splitlines()] if m.exists() else []
    # past the compiling steps, before the profiled ones
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and 10 < r["step"] <= 30]
    line = f"{name}: real tokens/s, steps 11-30: " + (", ".join(f"{s:.0f}" for s in speed) or "none")
    p = out / name / "profile" / "summary.json"
    if p.exists():
        s = json.loads(p.read_text())
        line += (f"; profile: {s['wall_s_per_step']:.3f} s a step, device busy "
                 f"{s.get('device_busy_s_per_step', float('nan')):.3f} s ({100 * s.get('device_busy_fraction', 0):.0f} %)")
    print(line)
PY
