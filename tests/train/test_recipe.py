"""End-to-end training on a tiny random Llama (CPU, seconds) through the real tokenizer and data layers:
run directory, resume, atomic checkpoints."""

import io
import json
import math
import re
import warnings
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from safetensors.torch import load_file

from llamaft.train import train
from llamaft.train.checkpoint import AtomicCheckpointTrainer
from train_helpers import one_torch_thread, run_config, tiny_project


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # module-wide (conftest's is per test): the module-scoped runs below train under it too
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def full_run_io(model_dir, tmp_path_factory):
    """One uninterrupted LoRA run of 8 steps (2 epochs of 32 rows, grad accumulation 2, dropout on):
    (run dir, its stdout, its stderr, the warnings it raised). Not a terminal: plain lines."""
    out = tmp_path_factory.mktemp("runs") / "full"
    stdout, stderr = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, redirect_stdout(stdout), redirect_stderr(stderr):
        warnings.simplefilter("always")  # pytest would otherwise keep them from being seen
        train(run_config(model_dir, out, dropout=0.1, scheduler="linear", warmup_steps=2))
    return out, stdout.getvalue(), stderr.getvalue(), [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def full_run(full_run_io):
    return full_run_io[0]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contents(full_run):
    run = full_run
    assert (run / "config.yaml").read_text().startswith("model:")
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert (run / "adapter" / "tokenizer.json").is_file()
    assert json.loads((run / "adapter" / "generation_config.json").read_text())["eos_token_id"] == [1, 3]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # save_every=3 of 8 steps, save_total_limit=2 → checkpoint-3 rotated out
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-6", "checkpoint-8"]

    rows = _rows(run)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert all(r["train/grad_norm"] > 0 for r in train_rows)
    # eval_every=0.25 of 8 steps → every 2 steps; the final evaluation reuses step 8 (not run twice)
    eval_steps = [r["step"] for r in rows if "eval/alpha/loss" in r]
    assert eval_steps == [2, 4, 6, 8]
    assert [r["step"] for r in rows if "eval/b_set/loss" in r] == eval_steps

    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_loss"] == train_rows[-1]["train/loss"]
    assert summary["steps"] == 8 and summary["method"] == "lora"
    last = {n: [r for r in rows if f"eval/{n}/loss" in r][-1][f"eval/{n}/loss"] for n in ("alpha", "b_set")}
    # each set's final loss, and the perplexity the eval callback logged with it (exp of that loss)
    assert summary["eval"] == {n: {"loss": last[n], "perplexity": math.exp(last[n])} for n in ("alpha", "b_set")}
    assert [r["eval/alpha/perplexity"] for r in rows if "eval/alpha/perplexity" in r][-1] == math.exp(last["alpha"])
    assert 0 < summary["trainable_params"] < summary["total_params"]
    # training on 32 examples for 2 epochs at lr 1e-2 must reduce the loss
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]


def test_progress_lines_in_a_log_and_no_library_noise(full_run_io):
    run, out, err, caught = full_run_io
    assert "\r" not in out and "{'loss'" not in out and "{'eval_" not in out  # HF's bar and printed dicts are gone
    steps = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(steps) == 8, out
    line = re.compile(r"step (\d)/8 · loss \d\.\d+ · [\d,]+ tok/s · \d+\.\d\d s/step · ETA \d+:\d\d · peak (\d+ MiB|\d+\.\d GiB)")
    assert [int(line.fullmatch(ln).group(1)) for ln in steps] == list(range(1, 9)), steps
    for name in ("alpha", "b_set"):  # one line per set and evaluation (every 2 steps)
        assert len([ln for ln in out.splitlines() if ln.startswith(f"eval {name} @ step ")]) == 4
    assert re.search(r"^trained 8 steps in \d+:\d\d · [\d,]+ tok/s", out, re.M)
    assert "Loading weights" not in err and "Writing model shards" not in err and "it/s" not in err, err
    assert not [m for m in caught if "gradient_checkpointing" in m], caught


def test_throughput_counts_every_real_token_once(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    t = summary["throughput"]
    # 8 steps of 8 examples = 2 epochs over the 32 training examples: each one's tokens twice, no padding
    assert t["train_tokens"] == 2 * summary["data"]["train"]["tokens"]["total"]
    assert t["steps"] == 8 and t["device"] == "cpu" and t["memory_peak_gib"] > 0
    assert t["tokens_per_s"] == pytest.approx(t["train_tokens"] / t["train_time_s"], rel=0.01)
    assert t["train_time_s"] < t["wall_time_s"]  # evaluation and checkpoints are not step time
    train_rows = [r for r in _rows(full_run) if "train/loss" in r]
    assert all(r["train/tokens_per_s"] > 0 and r["train/step_time_s"] > 0 and r["train/mem_peak_gib"] > 0 for r in train_rows)


def test_padded_packed_rows_count_their_real_tokens_only(model_dir, tmp_path):
    """data.packing=on with fast.pack_multiple (the plain path: reference attention): one epoch of
    packed rows, each padded to a multiple of 64 tokens; the pads are not counted as trained tokens."""
    cfg = run_config(model_dir, tmp_path / "run", max_steps=4, eval_every=0, save_every=0)
    cfg.data.packing, cfg.fast.pack_multiple, cfg.data.validation = "on", 64, None
    summary = json.loads((train(cfg) / "summary.json").read_text())
    assert any("multiple of 64 tokens (fast.pack_multiple=64)" in r for r in summary["fast_path"])
    assert summary["throughput"]["train_tokens"] == summary["data"]["train"]["tokens"]["total"]


def test_every_run_writes_its_report(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    report = (full_run / "report.md").read_text()
    for png in ("loss.png", "throughput.png"):
        assert (full_run / "plots" / png).read_bytes()[:4] == b"\x89PNG" and f"plots/{png}" in report
    for name in ("alpha", "b_set"):
        assert f"### {name}" in report and f"| {name} |" in report
    assert f"{summary['throughput']['tokens_per_s']:,.0f} tokens/s" in report
    assert "| status | completed |" in report


def test_summary_says_what_the_evaluation_during_training_was_computed_on(full_run):
    scope = json.loads((full_run / "summary.json").read_text())["eval_during_training"]
    assert "llamaft eval" in scope["note"] and "sample" in scope["note"]
    assert scope["sets"] == {
        "alpha": {"rows": 8, "loss_examples": 8, "note": "loss and perplexity only (eval.generation does not name this set)"},
        "b_set": {"rows": 6, "loss_examples": 6, "note": "loss and perplexity only (eval.generation does not name this set)"},
    }


def test_linear_warmup_schedule_in_metrics(full_run):
    # linear, warmup_steps=2, 8 steps: HF logs the lr used for the step just taken
    lrs = [r["train/learning_rate"] for r in _rows(full_run) if "train/learning_rate" in r]
    expected = [1e-2 * (s / 2 if s < 2 else (8 - s) / 6) for s in range(0, 8)]
    assert lrs == pytest.approx(expected, abs=1e-9)


def test_interrupted_run_resumes_to_identical_weights(full_run, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    real = AtomicCheckpointTrainer._save_rng_state

    def crash_at_6(self, output_dir):  # a crash in the middle of writing checkpoint-6
        if self.state.global_step == 6:
            raise KeyboardInterrupt("simulated crash while saving")
        return real(self, output_dir)

    monkeypatch.setattr(AtomicCheckpointTrainer, "_save_rng_state", crash_at_6)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(model_dir, out, dropout=0.1, scheduler="linear", warmup_steps=2))
    monkeypatch.setattr(AtomicCheckpointTrainer, "_save_rng_state", real)
    stopped = json.loads((out / "summary.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["throughput"]["steps"] == 6
    assert "| status | interrupted |" in (out / "report.md").read_text()  # an interrupted run has its page too
    ckpts = out / "checkpoints"
    assert not (ckpts / "checkpoint-6").exists()  # the half-written one never appeared
    assert not (ckpts / ".staging").exists()  # an interrupted save removes what it had staged
    # what a hard crash (SIGKILL mid-save) leaves behind: a staged checkpoint, and a foreign
    # half-written dir (no trainer_state.json); both must be ignored, then removed
    (ckpts / ".staging" / "checkpoint-6").mkdir(parents=True)
    (ckpts / ".staging" / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"partial")
    (ckpts / "checkpoint-7").mkdir()
    (ckpts / "checkpoint-7" / "adapter_model.safetensors").write_bytes(b"partial")

    train(run_config(model_dir, out, dropout=0.1, scheduler="linear", warmup_steps=2, resume=True))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-3")
    assert summary["throughput"]["steps"] == 5  # this process: steps 4 to 8
    assert not (ckpts / "checkpoint-7").exists() and not (ckpts / ".staging").exists()

    a = load_file(full_run / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # same ops in the same order on CPU: bitwise equal
        assert torch.equal(a[k], b[k]), k
    losses = lambda run: [(r["step"], r["train/loss"]) for r in _rows(run) if "train/loss" in r]
    assert losses(out) == losses(full_run)
    assert summary["eval"] == json.loads((full_run / "summary.json").read_text())["eval"]


def test_fresh_run_refuses_existing_run_dir(full_run, model_dir):
    from llamaft.errors import LlamaftError

    with pytest.raises(LlamaftError, match="already holds a run; set train.resume=true"):
        train(run_config(model_dir, full_run))


def test_resume_without_checkpoint_is_clear_error(model_dir, tmp_path):
    from llamaft.errors import LlamaftError

    with pytest.raises(LlamaftError, match="no complete checkpoint"):
        train(run_config(model_dir, tmp_path / "new", resume=True))


def test_full_finetuning_writes_loadable_weights(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = train(run_config(model_dir, tmp_path / "full-ft", method="full", max_steps=2, save_every=0, eval_every=0))
    assert not (out / "adapter").exists() and not list((out / "checkpoints").glob("checkpoint-*"))
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"] == sum(p.numel() for p in base.parameters())
    # eval_every=0: no periodic evaluation, only the final one
    assert set(summary["eval"]) == {"alpha", "b_set"}
    assert [r["step"] for r in _rows(out) if "eval/alpha/loss" in r] == [2]
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert json.loads((out / "model" / "generation_config.json").read_text())["eos_token_id"] == [1, 3]
