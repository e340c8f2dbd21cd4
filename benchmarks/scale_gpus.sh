#!/usr/bin/env bash
# Several GPUs and 70B (issue 17): bench.py on one GPU and under torchrun (DDP, one process per GPU,
# the plan llamaft.train makes for several processes), same W512 workload per GPU (BS x GA sequences
# per GPU and optimizer step), tokens summed over the processes, memory the largest process's.
#   bash benchmarks/scale_gpus.sh CASE...        CASE = NPROC:MODEL:METHOD[:STEPS[:STRATEGY[:OPTIM]]]
#     NPROC   processes (GPUs 0 .. NPROC-1)
#     MODEL   8b (the saved random Llama-3.1-8B, $M) | 70b (random:llama-3.1-70b, built on each GPU)
#     METHOD  lora | qlora | full
#     STRATEGY ddp (default) | fsdp (FSDP2 as llamaft.train sets it up; qlora with bf16-stored 4-bit weights)
#     OPTIM   bench.py --optim (default: adamw_torch for lora, paged_adamw_8bit for qlora / full)
#   e.g. bash benchmarks/scale_gpus.sh 1:8b:lora 2:8b:lora 2:8b:lora:10:fsdp 1:8b:full 2:8b:full:10:fsdp 1:70b:qlora:3
# Results: $OUT/scale_<NPROC>gpu_<MODEL>_<METHOD>[_fsdp].json (+ .log), a line each in $OUT/scale_log.txt.
set -u
OUT=$(realpath -m "${OUT:-benchmarks/results/raw}"); mkdir -p "$OUT"
. benchmarks/_prelude.sh
prelude_locked prelude_wheels || exit 1
prelude_pythonpath
for c in "$@"; do
  IFS=: read -r nproc model method steps strategy optim <<< "$c"
  steps=${steps:-10} strategy=${strategy:-ddp}
  case $model in 8b) prelude_locked prelude_model; dir=$M ;; 70b) dir=random:llama-3.1-70b ;;
    *) echo "scale_gpus: bad model '$model' (8b | 70b)" >&2; exit 2 ;; esac
  name=scale_${nproc}gpu_${model}_$method$([ "$strategy" = fsdp ] && echo _fsdp)${optim:+_$optim}
  export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((nproc - 1)))
  if [ "$nproc" = 1 ]; then run=(python3); else run=(torchrun --standalone --nproc-per-node "$nproc"); fi
  echo "=== $c $(date +%T)"
  timeout "${CASE_TIMEOUT:-420}" "${run[@]}" benchmarks/bench.py "$dir" "$method" 512 8 4 "$steps" "$OUT/$name.json" \
    --strategy "$strategy" ${optim:+--optim "$optim"} > "$OUT/$name.log" 2>&1
  rc=$?
  line=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['tokens_per_s'], 'tok/s', d['tokens_per_s_per_gpu'], 'per GPU', d['device_peak_gib'], 'GiB device', d['peak_mem_gib'], 'GiB torch', d['micro_batch_run'], 'x', d['accumulation_run'])" "$OUT/$name.json" 2>/dev/null)
  echo "$c rc $rc ${line:-$(tail -3 "$OUT/$name.log" | cut -c1-300)}" | tee -a "$OUT/scale_log.txt"
done
