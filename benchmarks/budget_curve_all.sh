#!/usr/bin/env bash
# The whole budget curve (issue 16) in one command, on every visible GPU: the default cases of
# budget_curve.sh, grouped by method so that every comparison (llamaft at each budget, Unsloth, the
# seed recipe, the plain HF path) stays on one card, the groups in parallel on separate GPUs, then one
# table over all of them.
#   bash benchmarks/budget_curve_all.sh            # 1 GPU: everything in turn; 2: LoRA | QLoRA + full; 3+: one method each
#   DRY_RUN=1 NGPU=2 bash benchmarks/budget_curve_all.sh   # the commands only
set -u -f   # -f: the cases' `*` is budget_curve.sh's pattern, not the shell's
OUT=${OUT:-benchmarks/results/raw}; export OUT
if [ "${DRY_RUN:-}" = 1 ]; then n=${NGPU:-1}; else n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); fi
LORA='llamaft:lora:* unsloth:lora:none seed:lora:none plain:lora:none'
QLORA='llamaft:qlora:* unsloth:qlora:none seed:qlora:none plain:qlora:none'
FULL='llamaft:full:* unsloth:full:none seed:full:none plain:full:none'
if [ "$n" -ge 3 ]; then groups=("$LORA" "$QLORA" "$FULL")
elif [ "$n" -eq 2 ]; then groups=("$LORA" "$QLORA $FULL")
else groups=("$LORA $QLORA $FULL"); fi
for i in "${!groups[@]}"; do
  GPU=$i bash benchmarks/budget_curve.sh ${groups[$i]} &
done
wait
[ "${DRY_RUN:-}" = 1 ] && echo "+ python3 benchmarks/budget_table.py $OUT" || python3 benchmarks/budget_table.py "$OUT"
