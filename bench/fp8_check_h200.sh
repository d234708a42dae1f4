#!/usr/bin/env bash
# One short H200 call for the FP8 targets left after the full benchmark run of 2026-12-02 (#27):
#  1. real training on the GPU, FP8 against bf16: demo.sh (the embedded tiny Llama on the demo language, both
#     stages) twice at once, bf16 LoRA ("--bits 16") and --fp8 in both stages; dev loss and dev BLEU of each;
#  2. the QLoRA section of bench/benchmark.py alone (its batch-1 reference, QLoRA packed + compiled, LoRA on an
#     FP8 base, and the FP8 base's <= 24 GiB rows sized from memory per token), ratios within this run.
# Usage: bash bench/fp8_check_h200.sh OUT [TOTAL_SECONDS]   (default 540: the demos get up to 200 s, the
# benchmark what is left; past its --time_limit_s only the memory target's own rows still start)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$1
TOTAL=${2:-540}
mkdir -p "$OUT"
demo() {   # name, stage-1 flags, stage-2 flags
  STAGE1_FLAGS="$2" STAGE2_FLAGS="$3" timeout "${DEMO_S:-200}" bash demo.sh "/tmp/demo-$1" > "$OUT/demo-$1.log" 2>&1 \
    || echo "demo-$1: exit $?" >> "$OUT/summary.txt"
  grep -h '"bleu"' "/tmp/demo-$1/dev.metrics.json" >> "$OUT/summary.txt" 2>/dev/null || true
  cp "/tmp/demo-$1/dev.metrics.json" "$OUT/demo-$1.dev.metrics.json" 2>/dev/null || true
  cp "/tmp/demo-$1/stage2/metrics.jsonl" "$OUT/demo-$1.stage2.metrics.jsonl" 2>/dev/null || true
  cp "/tmp/demo-$1/stage1/metrics.jsonl" "$OUT/demo-$1.stage1.metrics.jsonl" 2>/dev/null || true
}
demo bf16 "" "--bits 16" &
demo fp8 "--fp8" "--bits 16 --fp8" &
wait
[ "${BENCH:-1}" = 1 ] || exit 0           # BENCH=0: the demos alone
BENCH_S=$((TOTAL - SECONDS - 5))
echo "demos done at ${SECONDS} s; the benchmark gets ${BENCH_S} s" | tee -a "$OUT/summary.txt"
timeout "$BENCH_S" python3 bench/benchmark.py --only qlora --no_ablation --no_plain_hf --qlora_mem_gb 0 \
  --config_budget_s 5 --time_limit_s $((BENCH_S - 150)) --copy_to "$OUT" 2>&1 | tee "$OUT/benchmark.log" | tail -40
