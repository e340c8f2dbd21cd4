#!/usr/bin/env bash
# Long context in one invocation (issue 16): the longest single sequence that trains (forward +
# backward + optimizer step) for 8B QLoRA, and its seconds per step, llamaft vs Unsloth (and the
# seed recipe) on the same card, same random Llama-3.1-8B-shaped model.
#   bash benchmarks/long_context.sh [LENGTHS] [TOOLS]
#     LENGTHS ascending, default 131072,196608,262144,327680 (each tool stops at its first failure)
#     TOOLS default "llamaft unsloth" (also: llamaft-tiles = the 16k MLP tiles instead of the deferred MLP, seed)
# Results: $OUT/long_<tool>.json (per length: ok, s/step of the first and second step, torch peak) and
# $OUT/long_context_log_gpu$GPU.txt; nvidia-smi memory.used is sampled every 100 ms per tool (long_<tool>.smi.txt).
# env: GPU (index, 0; a two-GPU machine can run this beside another driver on the other card), REPEAT (2).
# Needs .bench/{seed_baseline,maxlen,save_tok}.py (copies of ../shared/bench) and the wheels in .whl/.
set -u
GPU=${GPU:-0}; REPEAT=${REPEAT:-2}   # llamaft steps per length (the first is timed as maxlen.py times it)
export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=$GPU   # CUDA's index = nvidia-smi's index
source benchmarks/_prelude.sh
OUT=${OUT:-benchmarks/results/raw}; mkdir -p "$OUT"
LENGTHS=${1:-131072,196608,262144,327680}
TOOLS=${2:-llamaft unsloth}
LOG="$OUT/long_context_log_gpu$GPU.txt"
prelude_locked prelude_wheels || exit 1
prelude_pythonpath
prelude_locked prelude_model | tee -a "$LOG"
prelude_locked prelude_tokenizer | tee -a "$LOG"
prelude_gpu_line "$GPU" | tee -a "$LOG"
for tool in $TOOLS; do
  case $tool in
    llamaft)       cmd="python3 benchmarks/maxlen_fast.py $M $LENGTHS $OUT/long_llamaft.json varlen --deferred --repeat $REPEAT" ;;
    llamaft-tiles) cmd="python3 benchmarks/maxlen_fast.py $M $LENGTHS $OUT/long_llamaft-tiles.json varlen --repeat $REPEAT" ;;
    unsloth|seed)  cmd="python3 .bench/maxlen.py $M $tool $LENGTHS $OUT/long_$tool.json" ;;
    *) echo "long_context: unknown tool $tool (llamaft, llamaft-tiles, unsloth, seed)" | tee -a "$LOG"; continue ;;
  esac
  echo "=== $tool $(date +%T): $cmd" | tee -a "$LOG"
  nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/long_$tool.smi.txt" & smi=$!
  $cmd 2>&1 | grep -E '"L":|Error|error' | tee -a "$LOG"
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  echo "$tool device peak MiB: $(sort -n "$OUT/long_$tool.smi.txt" | tail -1)" | tee -a "$LOG"
done
