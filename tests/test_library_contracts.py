"""Library contracts: every private name or call shape of a dependency that llamaft relies on.

A new transformers / peft / llama-cpp-python release that renames one of these fails here, with the
contract in the test's name, instead of showing up as wrong gradients or a half-written checkpoint
in a user's run (transformers 5.24 renamed the decoder layer's `past_key_values` to `cache`, and the
only symptom was wrong LoRA gradients under our checkpointing). Each test says where we rely on it.
The tested version range is in README.md ("Dependencies"); `constraints.txt` pins what CI last passed.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch


# -- transformers ---------------------------------------------------------------------------------

def test_transformers_decoder_layer_takes_a_kv_cache_keyword_we_clear():
    """model/fast/recompute.py drops the KV cache by keyword name before the layer body runs twice
    (forward, recompute); an unknown new name would let the recompute read a cache its own forward
    filled, and the gradients would be silently wrong."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from llamaft.model.fast.recompute import CACHE_KWARGS, without_kv_cache

    params = inspect.signature(LlamaDecoderLayer.forward).parameters
    assert any(name in params for name in CACHE_KWARGS), sorted(params)
    assert "use_cache" in params
    cleared = without_kv_cache({"cache": object(), "past_key_values": object(), "use_cache": True, "x": 1})
    assert cleared == {"cache": None, "past_key_values": None, "use_cache": False, "x": 1}
    assert without_kv_cache({"x": 1}) == {"x": 1}


def test_transformers_trainer_saves_checkpoints_under_get_output_dir():
    """train/checkpoint.py (atomic checkpoints) overrides `Trainer._save_checkpoint(model, trial)` and
    redirects `Trainer._get_output_dir(trial)` to a staging directory while HF saves; that works only
    while `_save_checkpoint` asks `_get_output_dir` for the parent of checkpoint-N."""
    from transformers import Trainer

    save = inspect.signature(Trainer._save_checkpoint).parameters
    assert list(save)[:3] == ["self", "model", "trial"], list(save)
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    assert "self._get_output_dir(" in inspect.getsource(Trainer._save_checkpoint)


def test_transformers_training_loop_hooks_used_by_the_nonfinite_guard_and_resume():
    """train/checkpoint.py + train/nonfinite.py:
    - the guard's `on_pre_optimizer_step` fires after clipping and right before `optimizer.step()`;
    - `training_step(model, inputs, num_items_in_batch)` returns the loss HF accumulates;
    - `log(logs, start_time)` and the running-loss tensor `Trainer._tr_loss` (zeroed after a NaN was
      logged, since HF resets it with `tr_loss -= tr_loss`, which keeps NaN);
    - `_run_epoch(...)`, overridden so that a run resumed at its last step trains no extra step;
    - `set_initial_training_values(args, dataloader)` returns a tuple ending with max_steps;
    - `logging_nan_inf_filter` exists (we switch it off so logged losses are true)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    loop = inspect.getsource(Trainer._run_epoch)
    hook, step = loop.index("on_pre_optimizer_step("), loop.index("self.optimizer.step()")
    assert loop.index("_clip_grad_norm(") < hook < step
    assert "self._tr_loss" in loop and "tr_loss -= tr_loss" in inspect.getsource(Trainer._maybe_log_save_evaluate)
    assert list(inspect.signature(Trainer.training_step).parameters)[:4] == ["self", "model", "inputs", "num_items_in_batch"]
    assert list(inspect.signature(Trainer.log).parameters)[:3] == ["self", "logs", "start_time"]
    assert hasattr(TrainerCallback, "on_pre_optimizer_step")
    returned = inspect.getsource(Trainer.set_initial_training_values).rsplit("return", 1)[1]
    assert re.fullmatch(r"\s*\(?[\w\s,]*\bmax_steps,?\s*\)?\s*", returned), returned
    assert "logging_nan_inf_filter" in inspect.signature(TrainingArguments).parameters


def test_transformers_and_accelerate_pieces_the_optimizer_in_backward_relies_on():
    """train/in_backward.py + train/checkpoint.py + train/nonfinite.py (optimizer in backward):
    - `Trainer.get_decay_parameter_names(model)` reads nothing from the Trainer (we call it with
      self=None, before a Trainer exists, so both optimizers group parameters alike);
    - `training_step` calls `compute_loss` before `accelerator.backward` (the loss is checked there,
      before the backward updates the weights);
    - `_get_grad_norm(model, grad_norm=None)` is where the logged norm comes from (ours: the hooks');
    - callbacks get the optimizer as the keyword `optimizer` (the guard finds the hooks' norm there);
    - accelerate's wrapper forwards `param_groups` (the LR scheduler's writes reach the inner
      optimizers) and `state_dict` / `load_state_dict` (optimizer.pt round-trips);
    - resume loads optimizer.pt with `weights_only=True` (our state dict holds tensors, numbers, strings)."""
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import Trainer
    from transformers.trainer_callback import CallbackHandler

    decay = inspect.getsource(Trainer.get_decay_parameter_names)
    assert "self." not in decay.split('"""')[-1], decay
    assert list(inspect.signature(Trainer.get_decay_parameter_names).parameters) == ["self", "model"]
    step = inspect.getsource(Trainer.training_step)
    assert step.index("self.compute_loss(") < step.index("self.accelerator.backward(")
    assert list(inspect.signature(Trainer._get_grad_norm).parameters) == ["self", "model", "grad_norm"]
    assert "self._get_grad_norm(" in inspect.getsource(Trainer._run_epoch)
    assert "optimizer=self.optimizer" in inspect.getsource(CallbackHandler.call_event)
    for name in ("param_groups", "state_dict", "load_state_dict"):
        assert "self.optimizer." + name in inspect.getsource(getattr(AcceleratedOptimizer, name).fget
                                                              if name == "param_groups" else getattr(AcceleratedOptimizer, name))
    assert "weights_only=True" in inspect.getsource(Trainer._load_optimizer_and_scheduler)


def test_transformers_checkpoint_rotation_helpers():
    """train/checkpoint.py rotates published checkpoints by step with HF's own helper."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    assert PREFIX_CHECKPOINT_DIR == "checkpoint"
    params = inspect.signature(rotate_checkpoints).parameters
    assert {"output_dir", "save_total_limit", "use_mtime"} <= set(params), list(params)


def test_transformers_and_accelerate_ddp_behaviour_the_batch_split_relies_on(tmp_path):
    """train/distributed.py gives each of N processes gradient_accumulation / N micro-batches and expects
    N processes to train what one trains: that holds while (1) accelerate's data loader shards the one
    seeded shuffle into micro-batches handed out round-robin (seedable sampler on by default, batches
    not split), (2) HF normalises each loss by the label tokens of every process's micro-batches of the
    step (average_tokens_across_devices) and scales it by the process count against DDP's averaging,
    (3) every rank writes its own rng_state_<rank>.pth and rank 0 the rest (checkpoint.py publishes)."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import AcceleratorConfig

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.average_tokens_across_devices is True
    assert AcceleratorConfig().use_seedable_sampler is True and AcceleratorConfig().split_batches is False
    assert "loss *= loss_scale" in inspect.getsource(Trainer.compute_loss)
    assert "self.accelerator.gather(num_items_in_batch" in inspect.getsource(Trainer._get_num_items_in_batch)
    assert 'f"rng_state_{self.args.process_index}.pth"' in inspect.getsource(Trainer._save_rng_state)
    assert "if self.args.should_save:" in inspect.getsource(Trainer._save_checkpoint)


def test_torch_launcher_reports_failures_per_rank():
    """train/launch.py runs torch.distributed.run's `parse_args` + `run` in-process and reads the exit
    code from `ChildFailedError.failures` (rank -> ProcessFailure with exitcode, timestamp, pid) and a
    signal from `SignalException.sigval`; workers start in sessions of their own (a terminal's Ctrl-C
    reaches the launcher only, which passes it on)."""
    import dataclasses

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler
    from torch.distributed.run import parse_args, run

    assert callable(run)
    args = parse_args(["--standalone", "--nproc-per-node=2", "--module", "llamaft", "train", "x.yaml"])
    assert (args.standalone, args.nproc_per_node, args.module, args.training_script) == (True, "2", True, "llamaft")
    assert {"exitcode", "timestamp", "pid"} <= {f.name for f in dataclasses.fields(ProcessFailure)}
    assert "failures" in inspect.signature(ChildFailedError.__init__).parameters
    assert "sigval" in inspect.signature(SignalException.__init__).parameters
    assert 'kwargs["start_new_session"] = True' in inspect.getsource(subprocess_handler.SubprocessHandler._popen)


def test_transformers_attention_and_mask_registries():
    """model/fast/attention.py registers our kernels by name and falls back to HF's SDPA pieces."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert callable(AttentionInterface.register) and callable(AttentionMaskInterface.register)
    assert "attention_mask" in inspect.signature(sdpa_mask).parameters
    assert list(inspect.signature(sdpa_attention_forward).parameters)[:4] == ["module", "query", "key", "value"]


def test_transformers_helpers_used_by_tokenizer_and_merge():
    """model/tokenizer.py builds Meta's tokenizer with `TikTokenConverter(vocab_file=...,
    extra_special_tokens=...).converted()` (its default `pattern` is Llama 3's split regex); export/merge.py parses `--max-shard-size` with `convert_file_size_to_int`."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.utils.hub import convert_file_size_to_int

    params = inspect.signature(TikTokenConverter.__init__).parameters
    assert {"vocab_file", "pattern", "extra_special_tokens"} <= set(params), list(params)
    assert hasattr(TikTokenConverter, "converted")
    assert convert_file_size_to_int("5GB") == 5 * 10**9


def test_transformers_log_events_share_one_dict_and_the_progress_bar_classes():
    """train/progress.py adds tokens/s, step time and memory to a train log event inside its `on_log`,
    so that the callbacks after it (metrics.jsonl, TensorBoard) write them: that needs `Trainer.log` to
    hand its `logs` dict to `on_log` and every callback to get that same dict, in list order. It also
    removes HF's own output by class: ProgressCallback, PrinterCallback and
    `transformers.trainer.DEFAULT_PROGRESS_CALLBACK` (the notebook bar in Jupyter)."""
    from types import SimpleNamespace

    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState
    from transformers import trainer as hf_trainer
    from transformers.trainer_callback import CallbackHandler, PrinterCallback, ProgressCallback

    seen = []

    class Add(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs["tokens_per_s"] = 5.0

    class Read(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    handler = CallbackHandler([Add(), Read()], None, None, None, None)
    handler.on_log(SimpleNamespace(), TrainerState(), TrainerControl(), {"loss": 1.0})
    assert seen == [{"loss": 1.0, "tokens_per_s": 5.0}]
    assert re.search(r"callback_handler\.on_log\(\s*self\.args, self\.state, self\.control, logs\)",
                     inspect.getsource(Trainer.log))
    assert issubclass(hf_trainer.DEFAULT_PROGRESS_CALLBACK, TrainerCallback)
    assert {ProgressCallback, PrinterCallback} <= {v for v in vars(hf_trainer).values() if isinstance(v, type)}


# -- peft -----------------------------------------------------------------------------------------

def test_peft_lora_linear_attributes_read_by_the_fused_path():
    """model/fast/lora.py patches `peft.tuners.lora.Linear.forward` and reads these attributes; a
    rename would make every layer silently ineligible (or, worse, read a stale field)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    assert isinstance(layer.base_layer, torch.nn.Linear)
    for name in ("lora_A", "lora_B", "lora_dropout", "scaling"):
        assert "default" in getattr(layer, name), name
    assert isinstance(layer.use_dora, dict) and isinstance(getattr(layer, "lora_variant", {}), dict)
    assert list(layer.active_adapters) == ["default"]
    assert layer.disable_adapters is False and layer.merged is False


def test_peft_lora_class_for_bitsandbytes_4bit_bases():
    """QLoRA layers are `peft.tuners.lora.bnb.Linear4bit`, not `lora.Linear` (fuse_lora matches both)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the gpu extra) is not installed")
    from peft.tuners.lora.bnb import Linear4bit

    assert "base_layer" in inspect.signature(Linear4bit.__init__).parameters


def test_bitsandbytes_adamw_takes_state_bits_and_paging_per_optimizer():
    """train/in_backward.py builds one `bnb.optim.AdamW(params, lr, betas, eps, optim_bits, is_paged)`
    per parameter (8-bit states, 32 for embeddings, never paged) and loads it back through
    `load_state_dict`, which replaces the group dicts (we put the scheduler's dicts back)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the gpu extra) is not installed")

    params = inspect.signature(bnb.optim.AdamW.__init__).parameters
    assert {"lr", "betas", "eps", "weight_decay", "optim_bits", "is_paged"} <= set(params)
    assert "param_groups" in inspect.getsource(bnb.optim.optimizer.Optimizer8bit.load_state_dict)


# -- llama-cpp-python -----------------------------------------------------------------------------

def test_llama_cpp_vocab_handle_for_stop_tokens():
    """export/gguf_check.py and chat/gguf_backend.py read `Llama._model.vocab` (the binding has no
    public is-end-of-generation call) and pass it to `llama_vocab_is_eog` / `llama_vocab_get_text`."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the gguf-check extra) is not installed")
    from llama_cpp._internals import LlamaModel

    assert re.search(r"self\._model\s*=", inspect.getsource(llama_cpp.Llama.__init__))
    assert re.search(r"self\.vocab\s*=", inspect.getsource(LlamaModel.__init__))
    assert callable(llama_cpp.llama_vocab_is_eog) and callable(llama_cpp.llama_vocab_get_text)


# -- huggingface_hub ------------------------------------------------------------------------------

def test_huggingface_hub_calls_used_to_resolve_model_names(tmp_path, monkeypatch):
    """model/source.py: `model_info(..., timeout=)` answers once (no retries), `try_to_load_from_cache`
    returns a str only for a cached file, and `except RepositoryNotFoundError` must come after
    `except GatedRepoError` (a gated repo is a subclass)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    assert "timeout" in inspect.signature(HfApi.model_info).parameters
    assert issubclass(GatedRepoError, RepositoryNotFoundError)
    assert issubclass(RepositoryNotFoundError, HfHubHTTPError) and issubclass(RevisionNotFoundError, HfHubHTTPError)
    assert hasattr(constants, "HF_HUB_OFFLINE")
    with pytest.raises(HFValidationError):
        validate_repo_id("not/a/repo/id")
    # an empty cache: no str for a file that was never downloaded
    assert not isinstance(try_to_load_from_cache("org/model", "config.json", cache_dir=str(tmp_path)), str)
    snap = tmp_path / "models--org--model" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("abc")
    assert try_to_load_from_cache("org/model", "config.json", cache_dir=str(tmp_path)) == str(snap / "config.json")


def test_huggingface_hub_upload_calls_and_errors_used_by_export():
    """export/cli.py: offline check, upload calls and the refusal reason (`server_message`); the HTTP
    client whose transport errors we catch (huggingface_hub 2.x: httpx2) is one of those we look for."""
    import sys

    import huggingface_hub
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled  # noqa: F401

    from llamaft.export.cli import _transport_errors

    assert callable(getattr(constants, "is_offline_mode", None)) or hasattr(constants, "HF_HUB_OFFLINE")
    assert {"path_in_repo", "path_or_fileobj"} <= set(inspect.signature(CommitOperationAdd).parameters)
    assert {"repo_id", "private", "exist_ok"} <= set(inspect.signature(HfApi.create_repo).parameters)
    assert {"folder_path", "repo_id", "commit_message"} <= set(inspect.signature(HfApi.upload_folder).parameters)
    assert {"repo_id", "operations", "commit_message"} <= set(inspect.signature(HfApi.create_commit).parameters)
    assert "server_message" in inspect.getsource(HfHubHTTPError.__init__)
    clients = [m for m in ("httpx2", "httpx", "requests") if m in sys.modules]
    assert clients, f"huggingface_hub {huggingface_hub.__version__} imported none of httpx2/httpx/requests"
    assert _transport_errors(), "no transport error class found for the hub's HTTP client"


def test_safetensors_io_errors_carry_the_os_error_number(tmp_path):
    """paths.write_errors reads the errno from safetensors' Rust I/O message `(os error N)` (a full
    disk raises SafetensorError, not OSError)."""
    from safetensors.torch import save_file

    from llamaft.paths import as_os_error

    target = tmp_path / "missing-dir" / "x.safetensors"
    with pytest.raises(Exception) as info:
        save_file({"x": torch.zeros(2)}, str(target))
    assert not isinstance(info.value, OSError)  # its own type: only the message carries the errno
    err = as_os_error(info.value)
    assert isinstance(err, OSError) and err.errno == 2, (type(info.value), str(info.value))
