"""llamaft/console.py: the libraries' noise policy and the console that never cuts or wraps a log line."""

import io
import warnings

import pytest

from llamaft.console import WIDE, make_console, quiet_libraries


def test_a_console_that_is_not_a_terminal_keeps_long_titles_and_paths_whole():
    out = io.StringIO()
    console = make_console(out)
    title = "1/4 fine-tune (LoRA) on runs/demo: " + "a title long enough to be cut at eighty columns " * 2
    assert len(title) >= 120
    path = "/a/very/long/run/directory/" + "x" * 150 + "/config.yaml"
    console.rule(title)
    console.print(f"continue with: llamaft train {path} train.resume=true")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert title in lines[0]  # rich cuts a title to the console width (80 by default for a file)
    assert lines[1] == f"continue with: llamaft train {path} train.resume=true"  # no newline inside the command
    assert console.width == WIDE


def test_a_terminal_console_keeps_its_width_and_still_soft_wraps():
    console = make_console(io.StringIO(), force_terminal=True, width=100)
    assert console.is_terminal and console.width == 100 and console.soft_wrap


def _hf_deprecations() -> None:
    """The real calls behind the FutureWarnings training used to print: peft asks the model
    `is_gradient_checkpointing`; llamaft builds TrainingArguments with `gradient_checkpointing`."""
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1))
    assert model.is_gradient_checkpointing is False
    TrainingArguments(output_dir="unused", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                      use_cpu=True, report_to="none")


def _messages(record) -> list[str]:
    return [str(w.message) for w in record]


def test_quiet_libraries_drops_the_checkpointing_rename_warnings_and_nothing_else():
    with warnings.catch_warnings(record=True) as before:
        warnings.simplefilter("always")
        _hf_deprecations()
    renamed = [m for m in _messages(before) if "gradient_checkpointing" in m and "deprecated" in m]
    assert len(renamed) == 3, _messages(before)  # the control: without the policy they do show

    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        quiet_libraries()
        quiet_libraries()  # idempotent
        _hf_deprecations()
        # the same category and wording from anywhere else, and anything else from transformers, still show
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6. Use yours.", FutureWarning)
        warnings.warn_explicit("`tokenizer` is deprecated and will be removed in v6.", FutureWarning,
                               "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("data.system_prompt is ignored for plain-text rows", UserWarning,
                               "recipe.py", 1, module="llamaft.train.recipe")
    assert _messages(after) == ["`gradient_checkpointing` is deprecated and will be removed in v6. Use yours.",
                                "`tokenizer` is deprecated and will be removed in v6.",
                                "data.system_prompt is ignored for plain-text rows"]


def test_quiet_libraries_hides_transformers_bars_and_keeps_download_bars():
    import huggingface_hub.utils as hub
    import transformers.utils.logging as hf_logging

    hf_logging.enable_progress_bar()
    try:
        quiet_libraries()
        assert not hf_logging.is_progress_bar_enabled()  # "Loading weights", "Writing model shards"
        assert not hub.are_progress_bars_disabled()  # a first download must not look hung
    finally:
        hf_logging.enable_progress_bar()


@pytest.mark.parametrize("env, level", [(None, "WARNING"), ("info", "INFO")])
def test_quiet_libraries_sets_transformers_to_warnings_unless_the_user_chose(monkeypatch, env, level):
    import logging

    import transformers.utils.logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    if env:
        monkeypatch.setenv("TRANSFORMERS_VERBOSITY", env)
    else:
        monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    try:
        quiet_libraries()
        assert logging.getLevelName(hf_logging.get_verbosity()) == level
    finally:
        hf_logging.set_verbosity(before)
