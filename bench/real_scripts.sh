#!/usr/bin/env bash
# The real DeepSpeed scripts at 8B on one GPU, profiled: where QLoRA's step time goes under ZeRO-2 (with
# --compile_layers, against bench/benchmark.py's (g) at the same packed budget) and under ZeRO-3.
# Usage (one device call, about 8 minutes on an H200): bash bench/real_scripts.sh OUT [BUDGET]
# Writes OUT/<run>/{metrics.jsonl,profile/,log} for stage1 (a short run, only for its projector),
# qlora-zero2 and qlora-zero3, and OUT/summary.txt: real tokens/s after the compiling steps and each profile's
# wall and device-busy time a step (steps 32-34 under ZeRO-2, 7-9 under ZeRO-3).
# While the model is written, bench/data_index.py measures the dataset index's first start at YouTube-ASL
# size on this host's cores (OUT/data_index.log); the trainings start after it has finished.
#
# FP8=1 (about 5 minutes): the --fp8 scripts against benchmark.py's (h) rows instead: stage1-fp8, pretrain.py
# --fp8 --compile_layers at STAGE1_BUDGET (default 27084, stage 1's (h)) for 16 steps, and lora-fp8-zero2,
# finetune.py --bits 16 --fp8 --compile_layers at BUDGET for 24 steps (profiled at 21-23); no ZeRO-3 run (--fp8
# refuses it) and no data_index. While the 8B model is written, the demo (demo.sh, the embedded tiny Llama on
# its demo language) runs twice on the same GPU, bf16 LoRA ("--bits 16") and --fp8 in both stages, for the dev
# loss and dev BLEU of each (OUT/demo-bf16.log, OUT/demo-fp8.log, their numbers in summary.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1
BUDGET=${2:-13542}
STAGE1_BUDGET=${STAGE1_BUDGET:-27084}
W=${W:-/tmp/real8b}
SHAPE=${SHAPE:-8b}                        # tiny: a dry run of the whole script on a CPU
INDEX_SIZES=${INDEX_SIZES:-150000 600000}
FP8=${FP8:-0}
DEMO_EXTRA=${DEMO_EXTRA:-}                # more flags for both demo stages (a dry run: --max_steps 4 ...)
mkdir -p "$OUT"
background=()
if [ "$FP8" = 1 ]; then
  demo() {   # name, stage-1 flags, stage-2 flags
    STAGE1_FLAGS="$2 $DEMO_EXTRA" STAGE2_FLAGS="$3 $DEMO_EXTRA" timeout 400 bash demo.sh "$W/demo-$1" \
      > "$OUT/demo-$1.log" 2>&1 || echo "demo-$1: exit $?" >> "$OUT/summary.txt"
    cp "$W/demo-$1/dev.metrics.json" "$OUT/demo-$1.dev.metrics.json" 2>/dev/null || true
  }
  demo bf16 "" "--bits 16" & background+=($!)
  demo fp8 "--fp8" "--bits 16 --fp8" & background+=($!)
else
  python bench/data_index.py --sizes $INDEX_SIZES --shards 16 --modes new_cold new_warm --copy_to "$OUT" \
    > "$OUT/data_index.log" 2>&1 &
  index=$!
fi
[ -f "$W/llm/config.json" ] || python bench/prepare_8b.py "$W" --shape "$SHAPE" --train 600 --dev 32 --frames 100,350
[ "$FP8" = 1 ] || wait $index || echo "data_index failed (see data_index.log)"

common=(--data_dir "$W/data" --model "$W/llm" --num_workers 2 --eval_steps 1000
        --save_steps 1000 --eval_generate 0 --overwrite_output_dir)
run() {   # name, timeout seconds, script and flags
  local name=$1 limit=$2; shift 2
  timeout "$limit" deepspeed --num_gpus 1 "$@" --output_dir "$W/$name" > "$OUT/$name.log" 2>&1 \
    || echo "$name: exit $?" | tee -a "$OUT/summary.txt"
  mkdir -p "$OUT/$name/profile"        # the timeline (trace.json) stays on the machine: tens of MB
  cp "$W/$name/metrics.jsonl" "$OUT/$name/" 2>/dev/null || true
  cp "$W/$name/profile/summary.json" "$W/$name/profile/ops.txt" "$OUT/$name/profile/" 2>/dev/null || true
}
if [ "$FP8" = 1 ]; then
  # steady windows: steps 5-16 of stage 1 (the compiling steps are 1-2), 9-20 of stage 2 (before the profile)
  windows="stage1-fp8:4:16 lora-fp8-zero2:8:20"
  run stage1-fp8 200 pretrain.py "${common[@]}" --logging_steps 4 --max_steps 16 --fp8 --compile_layers \
    --max_tokens_per_batch "$STAGE1_BUDGET"
  run lora-fp8-zero2 240 finetune.py "${common[@]}" --logging_steps 4 --projector "$W/stage1-fp8" --max_steps 24 \
    --bits 16 --fp8 --compile_layers --max_tokens_per_batch "$BUDGET" --profile_steps 21:23
else
  windows="qlora-zero2:10:30 qlora-zero3:10:30"
  run stage1 150 pretrain.py "${common[@]}" --logging_steps 5 --max_steps 2 --max_tokens_per_batch 8000
  run qlora-zero2 240 finetune.py "${common[@]}" --logging_steps 5 --projector "$W/stage1" --max_steps 36 \
    --compile_layers --max_tokens_per_batch "$BUDGET" --profile_steps 31:34
  run qlora-zero3 150 finetune.py "${common[@]}" --logging_steps 5 --projector "$W/stage1" --max_steps 10 \
    --max_tokens_per_batch "$BUDGET" --profile_steps 6:9 --deepspeed_config ds_config_zero3.json
fi
for pid in "${background[@]}"; do wait "$pid" || true; done

python - "$OUT" $windows <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for spec in sys.argv[2:]:
    name, lo, hi = spec.split(":")
    m = out / name / "metrics.jsonl"
    rows = [json.loads(l) for l in m.read_text().splitlines()] if m.exists() else []
    # past the compiling steps, before the profiled ones
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and int(lo) < r["step"] <= int(hi)]
    line = f"{name}: real tokens/s, steps {int(lo) + 1}-{hi}: " + (", ".join(f"{s:.0f}" for s in speed) or "none")
    if speed:
        line += f" (mean {sum(speed) / len(speed):.0f})"
    dev = [r["dev_loss"] for r in rows if "dev_loss" in r]
    if dev:
        line += f"; dev loss {dev[-1]:.5f}"
    p = out / name / "profile" / "summary.json"
    if p.exists():
        s = json.loads(p.read_text())
        line += (f"; profile: {s['wall_s_per_step']:.3f} s a step, device busy "
                 f"{s.get('device_busy_s_per_step', float('nan')):.3f} s ({100 * s.get('device_busy_fraction', 0):.0f} %)")
    print(line)
for kind in ("bf16", "fp8"):          # FP8=1: the demo twice
    log = out / f"demo-{kind}.log"
    if not log.exists():
        continue
    # "step N: dev loss X" of stage 1's evaluations, then stage 2's
    dev = [l.split("dev loss")[-1].split()[0] for l in log.read_text().splitlines() if ": dev loss" in l]
    met = out / f"demo-{kind}.dev.metrics.json"
    bleu = json.loads(met.read_text()).get("bleu") if met.exists() else None
    print(f"demo {kind}: dev losses {', '.join(dev) or 'none'}; dev BLEU {bleu}")
PY
