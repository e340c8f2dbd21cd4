"""Shared fixtures (owned by the tokenizer/chat engineer; keep it small and reusable)."""

import os
import sys

import pytest

# No internet here: never let a test wait on the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def absl_handler_on_real_stderr():
    """rouge_score imports absl.logging, whose import-time (unattached) handler keeps whatever
    sys.stderr is then: inside a test, one of pytest's capture streams. Any later
    logging.config.dictConfig (uvicorn's, when a test starts a Gradio server) closes every live
    handler, and absl's close() closes its stream unless that is the current sys.stderr, so pytest's
    own capture file got closed: the server test failed, then "lost sys.stderr". Pointing the handler
    at the real stderr (which absl never closes; fd capture still sees it) keeps tests independent."""
    try:
        from absl import logging as absl_logging
    except ImportError:  # rouge-score (and with it absl) not installed
        return
    absl_logging.get_absl_handler().python_handler.setStream(sys.__stderr__)


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared CPU: extra threads only contend (use with pytest.mark.usefixtures)."""
    from train_helpers import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Llama 3.1 fast tokenizer (128,256 ids) built offline from Meta's file (cached on disk)."""
    from llamaft.model.tokenizer import llama3_tokenizer as build

    return build("3.1")


@pytest.fixture(scope="session")
def tiny_llama31_model():
    """A random 1-layer Llama with the Llama 3 vocabulary (128,256), nothing saved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
        pad_token_id=128004, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    return LlamaForCausalLM(cfg).eval()
