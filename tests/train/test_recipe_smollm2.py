"""Slow: LoRA on the embedded SmolLM2-135M-Instruct GGUF through the real tokenizer/data modules."""

import json

import pytest
import torch


@pytest.mark.slow
def test_lora_on_smollm2_lowers_validation_loss(tmp_path):
    from llamaft.assets import smollm2_gguf
    from llamaft.config import config_from_dict
    from llamaft.train import train

    gguf = smollm2_gguf()
    # a checkable task the base model does not know: a fixed code word per colour
    words = {"red": "zorp", "blue": "quib", "green": "flen", "black": "trax", "white": "mivo", "pink": "dask"}
    rows = [{"question": f"What is the code word for {c}?{' Answer briefly.' * (i % 2)}", "answer": w}
            for i in range(4) for c, w in words.items()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:18]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[18:]))
    run = tmp_path / "run"
    cfg = config_from_dict({
        "model": {"name": str(gguf)},
        "lora": {"r": 8, "alpha": 16},
        "data": {"train": [str(tmp_path / "train.jsonl")], "validation": {"codes": str(tmp_path / "val.jsonl")},
                 "max_seq_length": 128},
        "train": {"output_dir": str(run), "max_steps": 8, "micro_batch_size": 6, "learning_rate": 3e-3,
                  "warmup_steps": 1, "eval_every": 0, "save_every": 4, "report_to": []},
    })
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(cfg, training_args={"eval_on_start": True})  # the "before" loss at step 0
    finally:
        torch.set_num_threads(n)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/codes/loss"] for r in rows if "eval/codes/loss" in r]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["codes"]["loss"] == evals[-1]
    steps = [r["step"] for r in rows if "eval/codes/loss" in r]
    assert steps == [0, 8] and evals[-1] < evals[0] * 0.7, evals
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "tokenizer.json").is_file()
