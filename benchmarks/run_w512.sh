#!/usr/bin/env bash
# One device invocation: GPU parity tests, then W512 for llamaft's fast path AND the seed recipe on
# the same card, same model weights, same data. Results land in $OUT (or ./benchmarks/results/raw).
#   bash benchmarks/run_w512.sh [STEPS] [WHAT...]   WHAT: tests lora seed plain qlora seedq lora16 ... or NAME:MODE,BS,GA,FLAGS
# Needs: .bench/seed_baseline.py (copy of ../shared/bench) and wheels in .whl/ (bitsandbytes, pydantic).
set -u
OUT=${OUT:-benchmarks/results/raw}; mkdir -p "$OUT"
STEPS=${1:-10}; shift || true
WHAT=${*:-tests lora seed plain qlora seedq}
. benchmarks/_prelude.sh   # env, .whl/ -> /tmp/site, $M (shared with budget_curve.sh)
prelude_locked prelude_wheels || exit 1
prelude_pythonpath
prelude_gpu_line | tee -a "$OUT/log.txt"
prelude_locked prelude_model | tee -a "$OUT/log.txt"
B="python3 benchmarks/bench.py $M"
for w in $WHAT; do
  echo "=== $w $(date +%T)" | tee -a "$OUT/log.txt"
  case $w in
    tests)  python3 -m pytest -q -m gpu tests/model/fast/test_gpu.py 2>&1 | tail -25 > "$OUT/gpu_tests.txt"; tail -3 "$OUT/gpu_tests.txt" ;;
    lora)   $B lora 512 8 4 $STEPS "$OUT/w512_lora_fast.json" ;;
    lora16) $B lora 512 16 2 $STEPS "$OUT/w512_lora_fast_bs16.json" ;;
    lora16ng) $B lora 512 16 2 $STEPS "$OUT/w512_lora_fast_bs16_nogc.json" --gc off ;;
    lorac)  $B lora 512 8 4 $STEPS "$OUT/w512_lora_fast_compile.json" --compile on ;;
    best)   $B lora 512 16 2 $STEPS "$OUT/w512_lora_fast_best.json" --gc off --compile on --optim adamw_torch_fused ;;
    lorafa) $B lora 512 8 4 $STEPS "$OUT/w512_lora_fast_fusedadam.json" --optim adamw_torch_fused ;;
    plain)  $B lora 512 8 4 $STEPS "$OUT/w512_lora_plain.json" --variant plain --gc off ;;
    seed)   python3 .bench/seed_baseline.py run $M lora 512 8 4 $STEPS "$OUT/w512_lora_seed.json" ;;
    qlora)  $B qlora 512 8 4 $STEPS "$OUT/w512_qlora_fast.json" ;;
    qlorang) $B qlora 512 8 4 $STEPS "$OUT/w512_qlora_fast_nogc.json" --gc off ;;
    qplain) $B qlora 512 8 4 $STEPS "$OUT/w512_qlora_plain.json" --variant plain --gc off ;;
    qlora84) $B qlora 512 8 4 $STEPS "$OUT/w512_qlora_fast_8x4.json" --regroup off ;;
    qlorac) $B qlora 512 8 4 $STEPS "$OUT/w512_qlora_fast_compile.json" --compile on ;;
    qlora16) $B qlora 512 16 2 $STEPS "$OUT/w512_qlora_fast_bs16.json" ;;
    qlora16c) $B qlora 512 16 2 $STEPS "$OUT/w512_qlora_fast_bs16_compile.json" --compile on ;;
    qlorags) $B qlora 512 8 4 $STEPS "$OUT/w512_qlora_fast_gpuckpt.json" --offload off ;;
    lora84) $B lora 512 8 4 $STEPS "$OUT/w512_lora_fast_8x4.json" --regroup off ;;
    profq)  python3 benchmarks/profile_qlora.py $M "$OUT/profile_w512_qlora.json" 2>&1 | grep -v Warning | tail -70 ;;
    maxattn) python3 benchmarks/maxlen_fast.py $M 32768 "$OUT/maxlen_attn_32k.json" varlen,sdpa,cudnn ;;
    maxlong) python3 benchmarks/maxlen_fast.py $M 131072,196608,262144 "$OUT/maxlen_qlora_fast_long.json" ${MAXATTN:-varlen} ;;
    seedq)  python3 .bench/seed_baseline.py run $M qlora 512 8 4 $STEPS "$OUT/w512_qlora_seed.json" ;;
    full)   $B full 512 8 4 $STEPS "$OUT/w512_full_fast.json" ;;
    s2048)  $B lora 2048 4 2 $STEPS "$OUT/seq2048_lora_fast.json" --fixed-len 2048 ;;
    s8192)  $B lora 8192 1 2 $STEPS "$OUT/seq8192_lora_fast.json" --fixed-len 8192 ;;
    # any other W512 variant: NAME:MODE,BS,GA[,bench.py flags...]  e.g. full40c:full,8,4,--memory-gib,40,--compile,on
    *:*)    IFS=, read -r -a a <<< "${w#*:}"
            $B ${a[0]} 512 ${a[1]} ${a[2]} $STEPS "$OUT/w512_${w%%:*}.json" "${a[@]:3}" ;;
  esac 2>&1 | grep -v -E "it/s\]|s/it\]|Warning|warn\(" | tail -15 | tee -a "$OUT/log.txt"
done
# the device returns at most 8 files: bundle every JSON into one archive
(cd "$OUT" && tar czf results_json.tgz *.json && rm -f *.json) 2>/dev/null || true
