#!/usr/bin/env bash
# Where each plan's step goes (issue 16): bench.py --profile for METHOD:BUDGET[:BSxGA] cases on one GPU,
# the plan chosen for that device-level budget (--memory-gib; none = the whole card), STEPS timed
# steps then one profiled step: kernel time by kind, the 25 costliest kernels, wall minus kernel
# time, and where the GPU waited (trace_gaps.py). BSxGA (e.g. 16x2): that micro-batch shape, not
# regrouped (the plan still picks checkpointing for it). TRACE=1 keeps each chrome trace (.json.gz).
#   GPU=0 OUT=DIR bash benchmarks/profile_plans.sh lora:none lora:18 lora:40:16x2 qlora:7.5 ...
# Results: $OUT/prof_<method>_<budget>[_<BSxGA>].json (+ .log). Needs .whl/ and .bench/seed_baseline.py.
set -u
OUT=$(realpath -m "${OUT:-benchmarks/results/raw}"); mkdir -p "$OUT"
GPU=${GPU:-0}; STEPS=${STEPS:-6}
export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=$GPU
. benchmarks/_prelude.sh
prelude_locked prelude_wheels || exit 1
prelude_pythonpath
prelude_locked prelude_model
for c in "$@"; do
  IFS=: read -r method budget shape <<< "$c"
  mem=(); [ "$budget" != none ] && mem=(--memory-gib "$budget")
  bs=8 ga=4 name=prof_${method}_$budget fixed=()
  if [ -n "$shape" ]; then bs=${shape%x*} ga=${shape#*x} name=${name}_$shape fixed=(--regroup off); fi
  echo "=== $c $(date +%T)"
  BENCH_TRACE=$([ "${TRACE:-0}" = 1 ] && echo "$OUT/trace_$name.json.gz") \
    timeout 480 python3 benchmarks/bench.py "$M" "$method" 512 "$bs" "$ga" "$STEPS" "$OUT/$name.json" --profile \
    "${mem[@]}" "${fixed[@]}" > "$OUT/$name.log" 2>&1
  echo "rc $? $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); p=d['profile']; print(d['tokens_per_s'], 'tok/s', d['device_peak_gib'], 'GiB', d['micro_batch_run'], 'x', d['accumulation_run'], d['plan'].get('checkpoint_layers'), 'wall', p['wall_ms'], 'kernels', p['kernel_ms'], p['by_kind_ms'], p.get('timeline'))" "$OUT/$name.json" 2>&1 | tail -1)"
done
