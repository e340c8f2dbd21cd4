"""DPO on packed pairs (train/preference_fast.py) against TRL's own padded path, on a tiny random
fp32 Llama with a LoRA adapter that is not zero (so policy and reference differ): the per-sequence
log-probs, one training step's loss, TRL metrics and gradients, the reference (adapter disabled, no
grad), no full-vocabulary logits; then the whole recipe with fast.preference_packing=on (CPU)."""

import copy
import json

import pytest
import torch

from llamaft.data.pack_pairs import PackedPairCollator
from llamaft.model.fast.attention import install_attention
from llamaft.train.preference import _dpo_class
from llamaft.train.preference_fast import forward_packed, padded

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 101  # no other tensor of the model or the batch has a dimension this size (the logits probe)
# (prompt, chosen, rejected): different prompt and answer lengths, the longer answer on either side
PAIRS = [([5, 6, 7], [8, 9], [10, 11, 12, 13]), ([14, 15, 16, 17, 18], [19, 20, 21], [22]),
         ([23, 24], [25], [26, 27, 28, 29, 30])]


def _rows():
    return [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS]


def _llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                      bos_token_id=None, eos_token_id=1)
    return LlamaForCausalLM(cfg)


def _policy():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                             target_modules=["q_proj", "v_proj", "gate_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)  # a trained-looking adapter: the policy is not the reference
    return model


def _trainer(model, collator, tmp_path, name, ref_model=None, **args):
    from datasets import Dataset
    from trl import DPOConfig

    from train_helpers import chat_tokenizer

    # fp32 throughout: DPOConfig's bf16=True default would autocast the reference model TRL prepares
    args = DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=len(PAIRS), max_steps=1,
                     learning_rate=1e-2, use_cpu=True, bf16=False, report_to=[], save_strategy="no", remove_unused_columns=False,
                     max_length=None, beta=2.0, loss_type=["sigmoid"], pad_to_multiple_of=None, **args)
    return _dpo_class()(model=model, args=args, train_dataset=Dataset.from_list(_rows()), data_collator=collator,
                        processing_class=chat_tokenizer(), ref_model=ref_model)


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    """(plain, packed): TRL's padded collator and SDPA vs packed pairs and the per-example reference attention."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tmp = tmp_path_factory.mktemp("dpofast")
    model = _policy()
    twin = copy.deepcopy(model)
    install_attention(twin, "reference")
    return (_trainer(model, DataCollatorForPreference(pad_token_id=0), tmp, "plain"),
            _trainer(twin, PackedPairCollator(), tmp, "packed"))


def _batches(trainers):
    plain, packed = trainers
    return plain.data_collator(_rows()), packed.data_collator(_rows())


def _segment_sums(per_token, cu):
    """Per-sequence sums of a packed row's per-token values: position t scores token t+1, so sequence
    [a, b) owns positions a .. b-2."""
    return torch.stack([per_token[0, a:b - 1].sum() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])


def _trl_padded_logps(model, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                use_cache=False, fused_lm_head=True)
    return out.log_probs.sum(dim=1)  # TRL's _compute_loss: [chosen..., rejected...]


def test_packed_per_sequence_logps_equal_trls_padded_ones(trainers):
    plain, packed = trainers
    pad_batch, pack_batch = _batches(trainers)
    with torch.no_grad():
        want = _trl_padded_logps(plain.model, pad_batch)
        out = forward_packed(packed.model, pack_batch)
    got = _segment_sums(out.log_probs, pack_batch["cu_seq_lens_q"])  # packed order c0 r0 c1 r1 c2 r2
    n = len(PAIRS)
    torch.testing.assert_close(got[0::2], want[:n], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1::2], want[n:], atol=1e-5, rtol=0)
    # laid out padded, every per-token field is TRL's, cell for cell
    labels = pad_batch["input_ids"].masked_fill(pad_batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        ref = plain.model(input_ids=pad_batch["input_ids"], attention_mask=pad_batch["attention_mask"], labels=labels,
                          use_cache=False, fused_lm_head=True)
    for field in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(padded(getattr(out, field), pack_batch["pair_index"], pack_batch["pair_mask"]),
                                   getattr(ref, field), atol=1e-5, rtol=0)
    assert torch.equal(padded(out.is_top1, pack_batch["pair_index"], pack_batch["pair_mask"]), ref.is_top1)


def _step(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    trainer._metrics["train"].clear()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this step runs outside
    loss = trainer.training_step(model, trainer._prepare_inputs(batch))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}, grads


def test_one_step_loss_metrics_and_grads_equal_trls(trainers):
    plain, packed = trainers
    pad_batch, pack_batch = _batches(trainers)
    loss_a, metrics_a, grads_a = _step(plain, pad_batch)
    loss_b, metrics_b, grads_b = _step(packed, pack_batch)
    assert abs(loss_a.item() - loss_b.item()) < 1e-5 and abs(loss_a.item() - 0.6931) > 1e-2  # not ln 2: rewards differ
    assert set(metrics_a) == set(metrics_b) >= {"rewards/accuracies", "rewards/margins", "rewards/chosen",
                                                 "rewards/rejected", "logps/chosen", "logps/rejected", "logits/chosen",
                                                 "logits/rejected", "entropy", "mean_token_accuracy", "num_tokens"}
    for k in metrics_a:
        assert metrics_b[k] == pytest.approx(metrics_a[k], abs=1e-5), k
    assert metrics_a["rewards/margins"] != 0.0  # a non-trivial reference comparison
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)


def test_reference_is_the_adapter_disabled_model_without_grad(trainers):
    plain, packed = trainers
    pad_batch, pack_batch = _batches(trainers)
    packed.model.train()
    chosen, rejected = packed.packed_reference_logps(pack_batch)
    assert not chosen.requires_grad and not rejected.requires_grad
    with torch.no_grad(), plain.model.disable_adapter():
        base = _trl_padded_logps(plain.model, pad_batch)
    with torch.no_grad():
        policy = _trl_padded_logps(plain.model, pad_batch)
    n = len(PAIRS)
    torch.testing.assert_close(chosen, base[:n], atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, base[n:], atol=1e-5, rtol=0)
    assert (policy - base).abs().max() > 1e-2  # the adapter matters: this is not the policy again
    assert list(packed.model.peft_config) == ["default"]  # TRL's "ref" adapter copy was removed


def test_fused_lora_linears_give_the_same_step_and_reference(trainers, tmp_path, monkeypatch):
    """The CUDA plan fuses the LoRA linears (model/fast/lora.py) and checkpoints every layer with our
    reentrant checkpointing (model/fast/recompute.py): the policy step and the adapter-off reference
    through them equal TRL's padded path on PEFT's own layers without checkpointing."""
    from llamaft.model.fast import recompute
    from llamaft.model.fast.install import decoder_layers
    from llamaft.model.fast.lora import fuse_lora

    plain = trainers[0]
    twin = _policy()  # the same seed: the fixture's model before any step
    install_attention(twin, "reference")
    assert fuse_lora(twin) == 2 * 3  # q, v and gate of both layers
    recomputed = []
    real = recompute._Checkpoint.backward
    def spy(ctx, grad):  # noqa: E306 - counts the layers re-run in the backward
        recomputed.append(1)
        return real(ctx, grad)
    monkeypatch.setattr(recompute._Checkpoint, "backward", staticmethod(spy))  # undone whatever fails below
    assert recompute.install(decoder_layers(twin), offload=False) == 2
    fused = _trainer(twin, PackedPairCollator(), tmp_path, "fused")
    pad_batch, pack_batch = plain.data_collator(_rows()), fused.data_collator(_rows())
    fresh = _trainer(_policy(), plain.data_collator, tmp_path, "fresh")  # `plain` may have stepped already
    with torch.no_grad(), fresh.model.disable_adapter():
        base = _trl_padded_logps(fresh.model, pad_batch)
    fused.model.train()
    chosen, rejected = fused.packed_reference_logps(pack_batch)
    torch.testing.assert_close(torch.cat([chosen, rejected]), base, atol=1e-5, rtol=0)
    loss_a, metrics_a, grads_a = _step(fresh, pad_batch)
    loss_b, metrics_b, grads_b = _step(fused, pack_batch)
    assert len(recomputed) == 2  # both layers were checkpointed and re-run
    assert abs(loss_a.item() - loss_b.item()) < 1e-5 and metrics_b["rewards/margins"] == pytest.approx(
        metrics_a["rewards/margins"], abs=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)


def test_full_finetuning_against_a_frozen_reference_model(tmp_path):
    """No adapter: the reference is a second model (dpo.reference=auto for full, or a path); it reads the
    packed rows with the policy's kernel and gives TRL's padded numbers."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    def frozen(seed):
        return _llama(seed).requires_grad_(False).eval()

    plain = _trainer(_llama(0), DataCollatorForPreference(pad_token_id=0), tmp_path, "plain", ref_model=frozen(1))
    policy = _llama(0)
    install_attention(policy, "reference")
    packed = _trainer(policy, PackedPairCollator(), tmp_path, "packed", ref_model=frozen(1))
    assert packed.ref_model.config._attn_implementation == "llamaft_ref"
    pad_batch, pack_batch = plain.data_collator(_rows()), packed.data_collator(_rows())
    loss_a, metrics_a, grads_a = _step(plain, pad_batch)
    loss_b, metrics_b, grads_b = _step(packed, pack_batch)
    assert abs(loss_a.item() - loss_b.item()) < 1e-5 and metrics_a["rewards/margins"] != 0.0
    for k in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/rejected"):
        assert metrics_b[k] == pytest.approx(metrics_a[k], abs=1e-5), k
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)


def test_what_the_packed_path_cannot_honour_is_refused(trainers, tmp_path):
    with pytest.raises(ValueError, match="ld_alpha"):  # TRL weights the reference's tokens only on padded pairs
        _trainer(_policy(), PackedPairCollator(), tmp_path, "ld", ld_alpha=0.5)
    _, packed = trainers
    _, batch = _batches(trainers)
    with pytest.raises(ValueError, match="not logits"), torch.no_grad():  # compute_metrics: TRL asks for logits
        packed.compute_loss(packed.model, packed._prepare_inputs(batch), return_outputs=True)


class _Shapes(torch.utils._python_dispatch.TorchDispatchMode):
    """The shape of every tensor an op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_no_full_vocabulary_logits(trainers, monkeypatch):
    """TRL's head in vocabulary chunks of 16 columns: no op ever makes a tensor VOCAB wide."""
    import trl.trainer.utils as trl_utils

    _, packed = trainers
    _, batch = _batches(trainers)
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 16)
    batch = packed._prepare_inputs(batch)
    assert batch["input_ids"].shape[1] != VOCAB
    probe = _Shapes()
    with probe:
        _step(packed, batch)
    assert probe.shapes and not [s for s in probe.shapes if VOCAB in s]
    plain_logits = _Shapes()  # the probe does see logits when a forward makes them
    with plain_logits, torch.no_grad():
        packed.model(**{k: batch[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q", "max_length_q")})
    assert (1, batch["input_ids"].shape[1], VOCAB) in plain_logits.shapes


def test_recipe_packs_dpo_pairs_on_cpu_when_asked(tmp_path, monkeypatch):
    """fast.preference_packing=on through `llamaft train` on a CPU: packed batches, the plan's lines in
    summary.json, the same first-step loss and metrics as the padded run."""
    import llamaft.train.preference_fast as fast
    from llamaft.train.recipe import train
    from preference_helpers import preference_config, preference_project

    model_dir = preference_project(tmp_path)
    calls, real = [], fast.forward_packed
    monkeypatch.setattr(fast, "forward_packed", lambda model, batch: calls.append(batch["input_ids"].shape) or real(model, batch))

    def run(name, packing):
        cfg = preference_config(model_dir, tmp_path / name, max_steps=2, eval_every=0, save_every=0)
        cfg = cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"preference_packing": packing})})
        out = train(cfg)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return json.loads((out / "summary.json").read_text()), [r for r in rows if "train/loss" in r]

    summary, packed = run("packed", "on")
    # (2 training steps + the final evaluation's 2 batches) x (reference, policy), one packed row each
    assert len(calls) == 8 and all(shape[0] == 1 for shape in calls)
    plain_summary, plain = run("plain", "auto")  # auto on a CPU: padded pairs
    assert len(calls) == 8
    assert summary["fast_path"][0].startswith("fast path for train.objective=dpo: chosen/rejected pairs packed")
    assert "per-example reference attention" in summary["fast_path"][0]
    assert [r["step"] for r in packed] == [1, 2]
    for key in ("train/loss", "train/preference_accuracy", "train/reward_margin", "train/logps_chosen"):
        assert packed[0][key] == pytest.approx(plain[0][key], abs=1e-5), key
    assert plain_summary["fast_path"][0].startswith("fast path off for train.objective=dpo: pairs padded")
    for key in ("loss", "preference_accuracy", "reward_margin", "logps_rejected"):  # the evaluation ran packed too
        assert summary["eval"]["val"][key] == pytest.approx(plain_summary["eval"]["val"][key], abs=1e-4), key


def test_trl_internals_the_override_relies_on():
    """TRL's _compute_loss asks its model for the fused head's fields and reads a precomputed reference
    from the batch: what PackedPairsDPO hands it (a clear failure here if TRL changes them)."""
    import inspect

    from trl import DPOTrainer

    src = inspect.getsource(DPOTrainer._compute_loss)
    for needle in ("model(**model_kwargs, labels=labels, fused_lm_head=True)", "if self.precompute_ref_logps:",
                   'inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]', 'inputs["completion_mask"]',
                   "outputs.log_probs[:, -seq_len:]", "outputs.entropy", "outputs.mean_logits", "outputs.is_top1"):
        assert needle in src, needle
    # a stacked run's padded reference (padded_reference_logps) is TRL's reference forward with our adapters:
    # TRL's own picks "ref" or every adapter off
    src = inspect.getsource(DPOTrainer.compute_ref_log_probs)
    for needle in ('labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)',
                   "model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs",
                   "ref_per_token_logps[:, -shift_completion_mask.size(1) :]", "ref_per_token_logps.sum(dim=1)",
                   'use_adapter(\n                unwrapped_model, adapter_name="ref" if "ref" in unwrapped_model.peft_config else None'):
        assert needle in src, needle


def test_fused_lora_reference_is_the_ref_adapter_when_continuing_one(tmp_path):
    """model.from_run: continue keeps TRL's "ref" copy of the adapter: the packed reference runs it
    (not the adapter off), and the fused LoRA linears (fused for "default") fall back to PEFT's for it."""
    from datasets import Dataset
    from trl import DPOConfig

    from llamaft.model.fast.lora import fuse_lora
    from train_helpers import chat_tokenizer

    twin = _policy()
    install_attention(twin, "reference")
    assert fuse_lora(twin) == 2 * 3
    args = DPOConfig(output_dir=str(tmp_path / "c"), per_device_train_batch_size=len(PAIRS), max_steps=1, use_cpu=True,
                     bf16=False, report_to=[], save_strategy="no", remove_unused_columns=False, max_length=None,
                     beta=2.0, loss_type=["sigmoid"], pad_to_multiple_of=None)
    trainer = _dpo_class()(model=twin, args=args, train_dataset=Dataset.from_list(_rows()), data_collator=PackedPairCollator(),
                           processing_class=chat_tokenizer(), keep_ref_adapter=True)
    assert list(trainer.model.peft_config) == ["default", "ref"]
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    plain = _trainer(_policy(), DataCollatorForPreference(pad_token_id=0), tmp_path, "p")  # the adapter as it was
    pad_batch = plain.data_collator(_rows())
    with torch.no_grad():
        want = _trl_padded_logps(plain.model, pad_batch)  # what "ref" must give
        for model in (twin, plain.model):
            for name, p in model.named_parameters():
                if ".default." in name and "lora_B" in name:
                    p.add_(0.5)  # the policy moved on (as training does); "ref" did not
        moved = _trl_padded_logps(plain.model, pad_batch)
    chosen, rejected = trainer.packed_reference_logps(trainer.data_collator(_rows()))
    torch.testing.assert_close(torch.cat([chosen, rejected]), want, atol=1e-5, rtol=0)
    assert (moved - want).abs().max() > 1e-2 and trainer.model.active_adapter == "default"


def test_a_stacked_policys_reference_is_its_frozen_adapter_alone(tmp_path):
    """model.from_run: stack: a new adapter on a frozen one (here _policy's, not zero). The reference of
    padded batches (ours, not TRL's every-adapter-off) and packed ones is the frozen adapter alone, and
    TRL's set-up (its "ref" copy, the bf16 cast of a quantized model's trainable adapters) leaves the
    frozen adapter as it was: fp32, not trainable."""
    from peft import get_peft_model_state_dict
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from llamaft.config import LoraConfig, ModelConfig
    from llamaft.model.adapters import FROZEN, apply_adapters

    sft = _policy()
    sft.save_pretrained(tmp_path / "sft")
    saved = get_peft_model_state_dict(sft)

    def stacked():
        base = _llama()
        base.is_loaded_in_4bit = True  # what TRL reads: QLoRA's trainable adapters go bf16
        return apply_adapters(base, ModelConfig(name="x"), LoraConfig(r=2, target_modules=["q_proj", "k_proj"]),
                              frozen=tmp_path / "sft")

    policy, twin = stacked(), stacked()
    install_attention(twin, "reference")
    pad = _trainer(policy, DataCollatorForPreference(pad_token_id=0), tmp_path, "pad")
    pack = _trainer(twin, PackedPairCollator(), tmp_path, "pack")
    plain = _trainer(sft, DataCollatorForPreference(pad_token_id=0), tmp_path, "sft")  # the frozen adapter alone
    pad_batch = pad.data_collator(_rows())
    with torch.no_grad():
        want = _trl_padded_logps(plain.model, pad_batch)
        for model in (policy, twin):
            frozen = get_peft_model_state_dict(model, adapter_name=FROZEN)
            assert all(torch.equal(frozen[k], v) and frozen[k].dtype == torch.float32 for k, v in saved.items())
            assert model.active_adapters == ["default", FROZEN]
            assert {n for n, p in model.named_parameters() if p.requires_grad} == {
                n for n, _ in model.named_parameters() if ".default." in n}
            for name, p in model.named_parameters():
                if ".default." in name and "lora_B" in name:
                    p.add_(0.5)  # the new adapter trained: the policy is no longer the reference
        assert (_trl_padded_logps(policy, pad_batch) - want).abs().max() > 1e-2
    torch.testing.assert_close(torch.cat(pad.padded_reference_logps(pad_batch)), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(pack.packed_reference_logps(pack.data_collator(_rows()))), want, atol=1e-5, rtol=0)
    assert policy.active_adapters == twin.active_adapters == ["default", FROZEN]  # both on again for the policy
