# Sourced (from the repository root) by the device drivers run_w512.sh and budget_curve.sh:
# environment, the wheels in .whl/ installed into $SITE, and the random Llama-3.1-8B-shaped model in $M.
# Two drivers may run at once on a two-GPU machine: both share $SITE and $M, so installing and
# saving run under one lock (flock) and are skipped when already done.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
M=${M:-/tmp/llama31_8b_random}
SITE=${SITE:-/tmp/site}
PRELUDE_LOCK=${PRELUDE_LOCK:-/tmp/llamaft_bench_prelude.lock}

prelude_pythonpath() {  # wheels (bitsandbytes, pydantic, unsloth ...) first, then this checkout's src/
  if ls .whl/*.whl >/dev/null 2>&1; then export PYTHONPATH=$SITE:$PWD/src; else export PYTHONPATH=$PWD/src; fi
}

prelude_locked() {  # run "$@" holding the prelude lock (no flock: run it unlocked)
  if command -v flock >/dev/null 2>&1; then ( flock 9; "$@" ) 9>"$PRELUDE_LOCK"; else "$@"; fi
}

prelude_wheels() {  # install .whl/*.whl into $SITE unless this exact set is installed there already
  ls .whl/*.whl >/dev/null 2>&1 || return 0
  local sums; sums=$(cksum .whl/*.whl)
  [ "$sums" = "$(cat "$SITE/.llamaft_wheels" 2>/dev/null)" ] && return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || return 1
  printf '%s\n' "$sums" > "$SITE/.llamaft_wheels"
}

prelude_model() {  # the seed script's random 8B model; written to $M.part first so a crash leaves no half model
  [ -d "$M" ] && return 0
  rm -rf "$M.part"
  python3 .bench/seed_baseline.py save "$M.part" 2>&1 | tail -2
  [ -f "$M.part/config.json" ] && mv "$M.part" "$M"
}

prelude_tokenizer() {  # Unsloth wants a tokenizer beside the weights
  [ -f "$M/tokenizer_config.json" ] || python3 .bench/save_tok.py "$M" 2>&1 | tail -1
}

prelude_gpu_line() {  # GPU [ID]: name, total memory, driver
  nvidia-smi ${1:+-i "$1"} --query-gpu=name,memory.total,driver_version --format=csv
}
