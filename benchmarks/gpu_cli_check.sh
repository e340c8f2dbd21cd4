#!/usr/bin/env bash
# Run on the device from the repo root, with bitsandbytes/pydantic/llama-models wheels in .whl/ (see benchmarks/README.md):
#   bash benchmarks/gpu_cli_check.sh            (SKIP_LORA=1 for the qlora part only; NPROC=2: DDP and FSDP2 too;
#                                                MULTI_ONLY=1 with NPROC=2: only the several-process part)
# GPU end-to-end check of the real CLI on a tiny random Llama-3.1-shaped model (real 128,256 tokenizer):
# train (lora fast path default, qlora fast path) with generation eval, eval --compare-base, merge, stop check.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LLAMAFT_CACHE=/tmp/lcache
W=/tmp/e2e; mkdir -p $W/data/val
python3 - <<'PY'
import json, random, torch
from transformers import LlamaConfig, LlamaForCausalLM
from llamaft.model.tokenizer import llama3_tokenizer
tok = llama3_tokenizer("3.1")
cfg = LlamaConfig(vocab_size=128256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained("/tmp/e2e/tiny31"); tok.save_pretrained("/tmp/e2e/tiny31")
r = random.Random(0)
def rows(n):
    out = []
    for _ in range(n):
        a, b = r.randint(0, 9), r.randint(0, 9)
        out.append({"question": f"{a} plus {b}?", "answer": "yes" if (a + b) % 2 else "no"})
    return out
for name, n in [("train.jsonl", 256), ("val/parity_val.jsonl", 24), ("val/other_val.jsonl", 16)]:
    open(f"/tmp/e2e/data/{name}", "w").write("".join(json.dumps(x) + "\n" for x in rows(n)))
PY
cat > $W/run.yaml <<'Y'
model: {name: /tmp/e2e/tiny31, method: lora}
lora: {r: 16, alpha: 16}
data: {train: [/tmp/e2e/data/train.jsonl], validation: /tmp/e2e/data/val, max_seq_length: 128}
train: {output_dir: /tmp/e2e/lora, max_steps: 12, learning_rate: 1.0e-3, micro_batch_size: 8, eval_every: 6, save_every: 6}
eval: {generation: {parity_val: {metrics: [accuracy, macro_f1, exact_match], labels: ["yes", "no"], max_new_tokens: 8}}}
Y
single_process_checks() {
[ "${SKIP_LORA:-0}" = 1 ] || { python3 -m llamaft train $W/run.yaml 2>&1 | grep -v "it/s]" | tail -25
cp $W/lora/summary.json $OUT/e2e_lora_summary.json; cp $W/lora/metrics.jsonl $OUT/e2e_lora_metrics.jsonl; }
python3 -m llamaft train $W/run.yaml model.method=qlora train.output_dir=$W/qlora train.optimizer=paged_adamw_8bit train.gradient_accumulation=2 2>&1 | grep -v "it/s]" | tail -12
cp $W/qlora/summary.json $OUT/e2e_qlora_summary.json; cp $W/qlora/metrics.jsonl $OUT/e2e_qlora_metrics.jsonl
python3 -m pytest -q -p no:cacheprovider tests/model/fast/test_gpu.py -m gpu 2>&1 | tail -3 | tee $OUT/gpu_tests.txt
[ "${SKIP_LORA:-0}" = 1 ] && return 0
python3 -m llamaft eval $W/lora --compare-base --max-samples 16 2>&1 | tail -20
python3 -m llamaft merge $W/lora --out $W/merged 2>&1 | tail -3
python3 - <<'PY'
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained("/tmp/e2e/merged", dtype=torch.bfloat16).cuda()
t = AutoTokenizer.from_pretrained("/tmp/e2e/merged")
print("generation_config eos:", m.generation_config.eos_token_id, "pad:", m.generation_config.pad_token_id)
ids = t.apply_chat_template([{"role": "user", "content": "3 plus 4?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True).to("cuda")
out = m.generate(**ids, max_new_tokens=20, do_sample=False)
new = out[0, ids["input_ids"].shape[1]:].tolist()
print("generated:", new, repr(t.decode(new)), "stopped:", new[-1] in (128001, 128008, 128009))
PY
}
[ "${MULTI_ONLY:-0}" = 1 ] || single_process_checks
# Several GPUs (NPROC=2 on a 2-GPU machine): the same run under DDP and FSDP2 through the CLI -- the fast
# path's reasons under each strategy, per-step losses against the one-process run above (same global
# batch), every adapter tensor in the FSDP checkpoint, and a merge of the FSDP-trained run.
[ "${NPROC:-1}" -gt 1 ] || exit 0
B="train.micro_batch_size=$((8 / NPROC)) train.gradient_accumulation=$NPROC"   # the config's batch is global
python3 -m llamaft train $W/run.yaml $B train.output_dir=$W/lora_one 2>&1 | grep -v "it/s]" | tail -3
for s in ddp fsdp; do
  python3 -m llamaft train $W/run.yaml --nproc "$NPROC" distributed.strategy=$s train.output_dir=$W/lora_$s $B \
    2>&1 | grep -v "it/s]" | tail -8
  cp $W/lora_$s/summary.json $OUT/e2e_lora_${s}_summary.json
done
python3 - <<'PY'
import json
def losses(d):
    return {r["step"]: r["train/loss"] for r in map(json.loads, open(f"/tmp/e2e/{d}/metrics.jsonl")) if "train/loss" in r}
one = losses("lora_one")
for s in ("ddp", "fsdp"):
    many = losses(f"lora_{s}")
    common = sorted(set(one) & set(many))
    print(s, "max |loss - one process| over", len(common), "steps:", max(abs(one[k] - many[k]) for k in common))
PY
python3 -m llamaft merge $W/lora_fsdp --out $W/merged_fsdp 2>&1 | tail -2
