#!/usr/bin/env bash
# Budget curve (issue 16): real tokens/s against whole-device memory for llamaft, Unsloth and the seed
# recipe (HF Trainer + PEFT + bitsandbytes) on W512, same card, same weights, same invocation.
#   bash benchmarks/budget_curve.sh [CASE...]          CASE = TOOL:METHOD:BUDGET
#     TOOL    llamaft | unsloth | seed | plain (bench.py --variant plain, same steps: loss parity)
#     METHOD  lora | qlora | full
#     BUDGET  GiB left free on the card (16, 7.5, ...: an emulated smaller card) or none (the whole card)
#     A CASE holding * picks from the default list ('llamaft:qlora:*', '*:*:none'); no CASE = all of it.
#   env: GPU (index, 0)  STEPS (timed steps, 10)  OUT (benchmarks/results/raw)  CASE_TIMEOUT (s, 540)
#        DRY_RUN=1 (print the commands, run nothing)  LLAMAFT_ARGS (extra bench.py arguments of llamaft cases,
#        e.g. "--pack-multiple 0")
#   two GPUs: GPU=0 bash benchmarks/budget_curve.sh A... & GPU=1 bash benchmarks/budget_curve.sh B... & wait
# A numeric budget: .bench/ballast.py holds memory in its own process until only BUDGET GiB are free,
# and the tool runs its DEFAULT plan (no --memory-gib): the plan has to fit what the card has free.
# Device peak = max nvidia-smi memory.used (every 100 ms) minus the ballast-only baseline (the idle
# card for none). After every case: its JSON (budget_record.py) and log into
# $OUT/budget_cases_gpu<GPU>_<time>.tgz and a line in $OUT/budget_log_gpu<GPU>.txt (so a call cut off
# at its time limit still returns what finished); at the end budget_table.py writes the table.
# Needs .bench/{seed_baseline,unsloth_bench,save_tok,ballast}.py (from ../shared/bench) and .whl/.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${OUT:-$ROOT/benchmarks/results/raw}")
cd "$ROOT"
GPU=${GPU:-0}; STEPS=${STEPS:-10}; PLAIN_STEPS=$STEPS  # same rows, same batches: the workload's size sets the order
CASE_TIMEOUT=${CASE_TIMEOUT:-540}; BALLAST_TIMEOUT=${BALLAST_TIMEOUT:-180}; DRY_RUN=${DRY_RUN:-0}
STAGE=${STAGE:-/tmp/budget_curve_gpu$GPU}   # case files while running (the device returns <= 8 files from $OUT)
TGZ=budget_cases_gpu${GPU}_$(date +%m%d_%H%M%S).tgz
LOG=$OUT/budget_log_gpu$GPU.txt
export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=$GPU   # CUDA's index = nvidia-smi's index
. benchmarks/_prelude.sh

DEFAULT_CASES="llamaft:lora:16 llamaft:lora:18 llamaft:lora:24 llamaft:lora:40 llamaft:lora:80 llamaft:lora:none
llamaft:qlora:7.5 llamaft:qlora:8 llamaft:qlora:12 llamaft:qlora:none
llamaft:full:46 llamaft:full:48 llamaft:full:80 llamaft:full:none
unsloth:lora:none unsloth:qlora:none unsloth:full:none
seed:lora:none seed:qlora:none seed:full:none
plain:lora:none plain:qlora:none plain:full:none"

expand_cases() {  # CASE... -> CASES (patterns expanded against the default list, each one checked, once)
  CASES=()
  local c d hit
  add() { [[ " ${CASES[*]} " == *" $1 "* ]] || CASES+=("$1"); }
  for c in "${@:-*}"; do
    if [[ $c == *'*'* ]]; then
      hit=0
      for d in $DEFAULT_CASES; do [[ $d == $c ]] && { add "$d"; hit=1; }; done
      [ $hit = 1 ] || { echo "budget_curve: '$c' matches no default case" >&2; return 2; }
    elif [[ $c =~ ^(llamaft|unsloth|seed|plain):(lora|qlora|full):([0-9]+(\.[0-9]+)?|none)$ ]]; then
      add "$c"
    else
      echo "budget_curve: bad case '$c': TOOL:METHOD:BUDGET, TOOL llamaft|unsloth|seed|plain," \
           "METHOD lora|qlora|full, BUDGET GiB (e.g. 7.5) or none" >&2; return 2
    fi
  done
}

tool_cmd() {  # TOOL METHOD JSON -> the tool's command line (paths hold no spaces)
  case $1 in
    llamaft) echo "python3 benchmarks/bench.py $M $2 512 8 4 $STEPS $3${LLAMAFT_ARGS:+ $LLAMAFT_ARGS}" ;;
    plain)   echo "python3 benchmarks/bench.py $M $2 512 8 4 $PLAIN_STEPS $3 --variant plain" ;;
    unsloth) echo "python3 .bench/unsloth_bench.py $M $2 512 8 4 $STEPS $3" ;;
    seed)    echo "python3 .bench/seed_baseline.py run $M $2 512 8 4 $STEPS $3" ;;
  esac
}

SMI_LOOP="nvidia-smi -i $GPU --query-gpu=memory.used --format=csv,noheader,nounits -lms 100"
smi_used() { nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc 0-9; }

BALLAST= SAMPLER= TOOL=
stop_bg() {  # the tool (if interrupted), the sampler and the ballast: killed and waited for
  local p
  for p in $TOOL $SAMPLER $BALLAST; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  TOOL= SAMPLER= BALLAST=
}
trap stop_bg EXIT
trap 'stop_bg; exit 130' INT TERM

settle() {  # wait (<= 60 s) for the card to come back to the idle level seen at the start
  local i used=
  for i in $(seq 60); do
    used=$(smi_used); [ -n "$used" ] && [ "$used" -le $((IDLE0 + 1024)) ] && return 0; sleep 1
  done
  echo "warning: GPU $GPU still uses ${used:-?} MiB (idle at start: $IDLE0 MiB)" | tee -a "$LOG"
}

start_ballast() {  # BUDGET READY: 0 once the ballast holds its memory, 1 if it died or timed out
  rm -f "$2"
  python3 .bench/ballast.py "$1" "$2" > "${2%.ready}.ballast.txt" 2>&1 &
  BALLAST=$!
  local n=0
  until [ -s "$2" ]; do
    kill -0 "$BALLAST" 2>/dev/null || return 1
    [ $n -ge $((BALLAST_TIMEOUT * 10)) ] && return 1
    sleep 0.1; n=$((n + 1))
  done
}

bundle() {  # every case JSON + sample file + filtered log so far -> $OUT/$TGZ (replaced whole, by a rename)
  (cd "$STAGE" && shopt -s nullglob && f=(*.json *.smi.txt *.log.txt) && [ ${#f[@]} -gt 0 ] &&
   tar czf "$OUT/.$TGZ.part" -- "${f[@]}") && mv -f "$OUT/.$TGZ.part" "$OUT/$TGZ"
}

run_case() {  # TOOL METHOD BUDGET
  local case="$1:$2:$3" name="$1_$2_$3" reason= rc=0 base= idle extra=()
  local json=$STAGE/$name.json ready=$STAGE/$name.ready smi=$STAGE/$name.smi.txt log=$STAGE/$name.log
  local cmd; read -r -a cmd <<< "$(tool_cmd "$1" "$2" "$json")"
  rm -f "$json" "$ready" "$smi" "$log"
  echo "=== $case $(date +%T)" | tee -a "$LOG"
  settle; idle=$(smi_used)
  if [ "$3" != none ]; then
    if start_ballast "$3" "$ready"; then
      sleep 0.2; base=$(smi_used); extra+=(--ballast-free-bytes "$(head -1 "$ready")")
      tail -1 "${ready%.ready}.ballast.txt" | tee -a "$LOG"
    else
      reason="ballast not ready ($(tail -1 "${ready%.ready}.ballast.txt" 2>/dev/null | cut -c1-100))"; rc=1
      cp "${ready%.ready}.ballast.txt" "$log" 2>/dev/null
    fi
  fi
  local t0; t0=$(date +%s.%N)
  if [ -z "$reason" ]; then
    $SMI_LOOP > "$smi" 2>/dev/null & SAMPLER=$!
    timeout --kill-after=30 "$CASE_TIMEOUT" "${cmd[@]}" > "$log" 2>&1 & TOOL=$!
    wait "$TOOL"; rc=$?; TOOL=
    sleep 0.1   # one more sample after the tool's exit
  fi
  local wall; wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  stop_bg
  tr '\r' '\n' < "$log" 2>/dev/null | grep -v -E "it/s\]|s/it\]" | tail -300 > "$STAGE/$name.log.txt"
  [ -n "$reason" ] && extra+=(--reason "$reason")
  python3 benchmarks/budget_record.py "$json" --case "$case" --rc "$rc" --wall "$wall" --command "${cmd[*]}" \
    --smi "$smi" --base-mib "${base:-$idle}" --idle-mib "$idle" --log "$log" --timeout "$CASE_TIMEOUT" \
    --gpu "$GPU" --gpu-name "$GPU_NAME" --gpu-total-mib "$GPU_TOTAL" "${extra[@]}" 2>&1 | tee -a "$LOG"
  [ "$rc" = 0 ] || tail -4 "$STAGE/$name.log.txt" | cut -c1-200 | sed 's/^/    /' | tee -a "$LOG"
  bundle
}

dry_run() {
  echo "+ export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=$GPU"
  ls .whl/*.whl >/dev/null 2>&1 && echo "+ python3 -m pip install --no-index --no-deps --target $SITE .whl/*.whl"
  echo "+ python3 .bench/seed_baseline.py save $M        # if $M is missing"
  [[ " ${CASES[*]}" == *" unsloth:"* ]] && echo "+ python3 .bench/save_tok.py $M        # Unsloth wants a tokenizer"
  local c t m b json
  for c in "${CASES[@]}"; do
    IFS=: read -r t m b <<< "$c"; json=$STAGE/${t}_${m}_$b.json
    echo "# case $c"
    [ "$b" != none ] && echo "+ python3 .bench/ballast.py $b $STAGE/${t}_${m}_$b.ready &        # wait for the file, then read the baseline"
    echo "+ $SMI_LOOP > $STAGE/${t}_${m}_$b.smi.txt &"
    echo "+ timeout --kill-after=30 $CASE_TIMEOUT $(tool_cmd "$t" "$m" "$json")"
    echo "+ python3 benchmarks/budget_record.py $json --case $c ..."
  done
  echo "+ python3 benchmarks/budget_table.py $OUT"
}

need_files() {  # the .bench/ scripts these cases use
  local f missing=() want=(seed_baseline)
  [[ " ${CASES[*]}" == *" unsloth:"* ]] && want+=(unsloth_bench save_tok)
  [[ " ${CASES[*]} " =~ :[0-9.]+\  ]] && want+=(ballast)
  for f in "${want[@]}"; do [ -f ".bench/$f.py" ] || missing+=(".bench/$f.py"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "budget_curve: missing ${missing[*]}: mkdir -p .bench && cp ../shared/bench/{seed_baseline,unsloth_bench,save_tok,ballast}.py .bench/" >&2
  return 1
}

expand_cases "$@" || exit 2
if [ "$DRY_RUN" = 1 ]; then need_files; dry_run; exit 0; fi
need_files || exit 1
mkdir -p "$OUT"; rm -rf "$STAGE"; mkdir -p "$STAGE"
prelude_locked prelude_wheels || exit 1
prelude_pythonpath
{ echo "budget_curve $(date '+%F %T') GPU $GPU, llamaft $(git rev-parse --short HEAD 2>/dev/null || echo '?'), STEPS $STEPS: ${CASES[*]}"
  prelude_gpu_line "$GPU"; } | tee -a "$LOG"
IFS=, read -r GPU_NAME GPU_TOTAL <<< "$(nvidia-smi -i "$GPU" --query-gpu=name,memory.total --format=csv,noheader,nounits)"
GPU_TOTAL=${GPU_TOTAL// /}
IDLE0=$(smi_used); IDLE0=${IDLE0:-0}
prelude_locked prelude_model | tee -a "$LOG"
[ -f "$M/config.json" ] || { echo "budget_curve: no model in $M" | tee -a "$LOG"; exit 1; }
[[ " ${CASES[*]}" == *" unsloth:"* ]] && prelude_locked prelude_tokenizer | tee -a "$LOG"
for c in "${CASES[@]}"; do
  IFS=: read -r t m b <<< "$c"
  run_case "$t" "$m" "$b"
done
python3 benchmarks/budget_table.py "$OUT" 2>&1 | tee -a "$LOG"
