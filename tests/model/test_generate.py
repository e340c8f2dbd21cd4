"""The shared generation module on a tiny random Llama (CPU): exact token equality, stop handling, streaming."""

import pytest
import torch

from inference_helpers import tiny_model, tiny_rules, tiny_tokenizer
from llamaft.model.generate import GenParams, chat_prompt_ids, generate_batch, generation_config, stream_chat
from llamaft.errors import LlamaftError

GREEDY = GenParams(temperature=0, max_new_tokens=12)
TEXTS = ["hi", "hello there, how are you doing today?", "x", "a somewhat longer question about capitals"]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    return tiny_model(seed=3), tok, tiny_rules(tok)


@pytest.fixture(scope="module")
def free(setup):
    """Ground-truth greedy continuations (no stop ids) of every prompt."""
    model, tok, rules = setup
    return [_reference(model, p, GREEDY.max_new_tokens) for p in _prompts(tok, rules)]


def _prompts(tok, rules):
    return [chat_prompt_ids([{"role": "user", "content": t}], tok, rules) for t in TEXTS]


def _reference(model, ids, n):
    """Plain greedy loop without KV cache or padding: the ground truth for generate_batch."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def test_batched_greedy_equals_one_by_one(setup, free):
    model, tok, rules = setup
    prompts = _prompts(tok, rules)
    assert len({len(p) for p in prompts}) > 1  # different lengths: real left padding
    batched = generate_batch(model, tok, rules, prompts, GREEDY, batch_size=3)  # 2 batches, mixed
    single = [generate_batch(model, tok, rules, [p], GREEDY)[0] for p in prompts]
    for b, s, f in zip(batched, single, free):
        assert b.token_ids == s.token_ids and b.text == s.text and b.stopped == s.stopped
        if not s.stopped:
            assert s.token_ids == f and s.n_tokens == GREEDY.max_new_tokens


def test_stopped_flag_and_cut(setup, free):
    """Declare the token greedy produces at step 4 of one prompt a stop id: that prompt must stop
    right there (token not in the reply), others run to max_new_tokens or stop where it appears."""
    model, tok, rules = setup
    prompts = _prompts(tok, rules)
    stop_tok = free[0][4]
    k = free[0].index(stop_tok)
    stop_rules = tiny_rules(tok)
    stop_rules.stop_ids = sorted({*stop_rules.stop_ids, stop_tok})
    results = generate_batch(model, tok, stop_rules, prompts, GREEDY, batch_size=8)
    assert results[0].stopped and results[0].token_ids == free[0][:k] and results[0].n_tokens == k + 1
    assert stop_tok not in results[0].token_ids
    assert results[0].text == tok.decode(free[0][:k], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for r, f in zip(results[1:], free[1:]):
        if stop_tok in f:
            assert r.stopped and r.token_ids == f[: f.index(stop_tok)]
        else:
            assert not r.stopped and r.token_ids == f and r.n_tokens == GREEDY.max_new_tokens
    assert any(not r.stopped for r in results)  # both cases covered in one padded batch


def test_model_that_always_emits_eot_stops_immediately(setup):
    """Point <|eot_id|>'s lm_head row along the prompt's last hidden state: it then dominates the
    first step's logits (~100·|h| vs ~|h|), so the reply is empty and ends on a stop id."""
    _, tok, rules = setup
    model = tiny_model(seed=5)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    prompt = _prompts(tok, rules)[0]
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
        model.lm_head.weight[eot] = 100 * h / h.norm()
    [r] = generate_batch(model, tok, rules, [prompt], GREEDY)
    assert r.stopped and r.token_ids == [] and r.text == "" and r.n_tokens == 1
    assert "".join(stream_chat(model, tok, rules, [{"role": "user", "content": TEXTS[0]}], GREEDY)) == ""


def test_stream_concatenates_to_greedy_output(setup):
    model, tok, rules = setup
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": TEXTS[1]}]
    pieces = list(stream_chat(model, tok, rules, msgs, GREEDY))
    [full] = generate_batch(model, tok, rules, [msgs], GREEDY)  # message lists are rendered too
    assert "".join(pieces) == full.text and full.text
    assert all(pieces)


def test_stream_hides_stop_token_and_cancels(setup, free):
    model, tok, rules = setup
    free = free[1]
    stop_rules = tiny_rules(tok)
    stop_rules.stop_ids = sorted({*stop_rules.stop_ids, free[3]})  # a plain byte token as stop id
    k = free.index(free[3])
    text = "".join(stream_chat(model, tok, stop_rules, [{"role": "user", "content": TEXTS[1]}], GREEDY))
    assert text == tok.decode(free[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    # Closing the iterator early stops the background generation (no hang, no error).
    long = GenParams(temperature=0, max_new_tokens=200)
    it = stream_chat(model, tok, rules, [{"role": "user", "content": "x"}], long)
    next(it)
    it.close()


def test_sampling_params_and_validation(setup):
    model, tok, rules = setup
    cfg = generation_config(GenParams(temperature=0.8, top_p=0.5, top_k=7, repetition_penalty=1.1), rules)
    assert cfg.do_sample and cfg.temperature == 0.8 and cfg.top_p == 0.5 and cfg.top_k == 7
    assert cfg.eos_token_id == [257, 260] and cfg.pad_token_id == 261
    assert not generation_config(GREEDY, rules).do_sample
    torch.manual_seed(0)
    [r] = generate_batch(model, tok, rules, _prompts(tok, rules)[:1], GenParams(temperature=1.0, max_new_tokens=5))
    assert 1 <= r.n_tokens <= 5
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(top_k=-1)):
        with pytest.raises(LlamaftError):
            GenParams(**bad)
    with pytest.raises(LlamaftError, match="empty prompt"):
        generate_batch(model, tok, rules, [[]], GREEDY)
