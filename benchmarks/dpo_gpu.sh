#!/usr/bin/env bash
# DPO on the GPU (issue 18): plain TRL vs llamaft on a random Llama-3.1-8B-shaped model, LoRA r=16 on every
# linear layer, 4 pairs per step (dpo_bench.py: one process per tool, device-level peak, TRL's token count).
# Two workloads side by side on a 2-GPU machine (one GPU each; on one GPU they run one after the other):
#   GPU 0: same-length pairs  -- trl, llamaft (checkpointing on, as TRL; the plan's: ours + compile), then
#          llamaft eager (fast.compile=off)
#   GPU 1: mixed-length pairs -- trl, llamaft; then same-length pairs, llamaft with checkpoints offloaded to CPU
# (session 9's variants: llamaft --gc off, and --tools llamaft_padded: fast.preference_packing=off)
#   bash benchmarks/dpo_gpu.sh            # results in $OUT (default benchmarks/results/raw): dpo_*.json + .log
set -u
OUT=$(realpath -m "${OUT:-benchmarks/results/raw}"); mkdir -p "$OUT"
STEPS=${STEPS:-8}
. benchmarks/_prelude.sh
prelude_locked prelude_wheels || exit 1
prelude_pythonpath
MD=/tmp/dpo_llama31_8b
[ -f "$MD/model/config.json" ] || python3 -c "
import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); import dpo_bench as d
d.make_model_dir(Path('$MD'), d.parse_args(['--out', '-']))" || exit 1
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
bench() {  # GPU NAME TIMEOUT ARGS...
  local gpu=$1 name=$2 limit=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 benchmarks/dpo_bench.py --model-dir "$MD/model" --steps "$STEPS" \
    "$@" --out "$OUT/dpo_$name.json" > "$OUT/dpo_$name.log" 2>&1
  echo "dpo_$name rc $? $(python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['tools']; print({t: (v.get('tokens_per_s'), v.get('device_peak_gib'), (v.get('losses') or [None])[0], v.get('failed')) for t, v in d.items()})" "$OUT/dpo_$name.json" 2>/dev/null)"
}
fixed() { bench 0 fixed 300 --tools trl,llamaft; bench 0 fixed_eager 200 --tools llamaft --compile off; }
mixed() { local g=$(( gpus > 1 ? 1 : 0 )); bench $g mixed 300 --tools trl,llamaft --vary; bench $g fixed_offload 200 --tools llamaft --offload on; }
if [ "$gpus" -gt 1 ]; then fixed & mixed; wait; else fixed; mixed; fi
