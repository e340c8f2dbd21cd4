"""Generation scoring (eval's library side, below train): prompt -> generate -> score one set.

Training's evaluation callback (train/callbacks.py) and `llamaft eval` (eval/evaluate.py) both call
`generation_metrics`; nothing here knows about the Trainer or the command line.

    metrics, rows = generation_metrics(model, tokenizer, rules, conversations, cfg.eval.generation["qa"], cfg.eval)
    metrics["exact_match"], metrics["stops_on_eos"], metrics["prompts_truncated"]
    rows[0]  # {"where", "prompt", "reference", "prediction", "scores", "stopped", "n_tokens", ...}

Rules (each one is something a user can check in predictions.jsonl):
- prompt = the conversation up to (not including) its *last* assistant turn, rendered by
  `llamaft.data.chat.prompt_ids` (ends with the assistant header); reference = that turn's content.
- A prompt longer than `eval.max_prompt_tokens` keeps its last tokens (the question sits at the end;
  the leading BOS is kept) and is counted in `prompts_truncated` and flagged on its row: never silent.
- Generation is batched with left padding and the model's stop ids (`llamaft.model.generate.generate_batch`),
  greedy unless `temperature > 0`.
- With more rows than `max_samples`, a fixed seeded sample is used, the same rows at every
  evaluation, so the curves over steps compare like with like.
"""

from __future__ import annotations

import random
from typing import Callable

from ..config import GenerationEvalConfig
from ..data.chat import prompt_ids, tool_kwargs
from ..errors import LlamaftError
from ..model.generate import GenParams, generate_batch
from .metrics import check_metrics, compute_metrics, generation_stats

SAMPLE_SEED = 0


def split_conversation(messages: list[dict], where: str = "row") -> tuple[list[dict], str]:
    """(prompt messages, reference): everything before the last assistant turn, and that turn's content."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            if i == 0:
                raise LlamaftError(f"{where}: the conversation starts with the assistant turn, so there is no prompt to generate from")
            return [dict(m) for m in messages[:i]], str(messages[i].get("content") or "")
    raise LlamaftError(f"{where}: no assistant turn, so no reference answer to score generation against "
                       "(generation metrics need qa / alpaca / messages rows, not plain text)")


def sample_rows(rows: list, max_samples: int | None, seed: int = SAMPLE_SEED) -> list:
    """All rows when few enough, else a fixed seeded sample kept in file order."""
    if max_samples is None or len(rows) <= max_samples:
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), max_samples))
    return [rows[i] for i in keep]


def truncate_left(ids: list[int], max_tokens: int, bos_id: int | None) -> tuple[list[int], bool]:
    """Keep the last `max_tokens` ids (keeping a leading BOS); returns (ids, was_cut)."""
    if len(ids) <= max_tokens:
        return list(ids), False
    if bos_id is not None and ids and ids[0] == bos_id and max_tokens > 1:
        return [bos_id] + list(ids[len(ids) - (max_tokens - 1):]), True
    return list(ids[len(ids) - max_tokens:]), True


def _generate(model, tokenizer, rules, prompts: list[list[int]], gen_cfg) -> list:
    params = GenParams(temperature=gen_cfg.temperature, max_new_tokens=gen_cfg.max_new_tokens)
    return generate_batch(model, tokenizer, rules, prompts, params, batch_size=gen_cfg.batch_size)


def _messages_of(conv, i: int) -> tuple[list[dict], str]:
    """Accept Conversation objects or {"messages": [...]} dicts."""
    if isinstance(conv, dict):
        return conv["messages"], conv.get("where", f"row {i + 1}")
    if getattr(conv, "text", None) is not None:
        raise LlamaftError(f"{conv.where}: plain-text rows have no reference answer; generation metrics need qa / alpaca / messages rows")
    return conv.messages, conv.where


def build_prompts(conversations: list, tokenizer, rules, max_prompt_tokens: int) -> list[dict]:
    """One dict per conversation: where, prompt (messages), reference, ids, prompt_tokens, prompt_truncated."""
    out = []
    bos = getattr(tokenizer, "bos_token_id", None)
    for i, conv in enumerate(conversations):
        messages, where = _messages_of(conv, i)
        prompt, reference = split_conversation(messages, where)
        # rendered by the one module that knows templates; tool definitions exactly as in training
        ids = list(prompt_ids(prompt, tokenizer, rules, tool_kwargs(conv)))
        cut, truncated = truncate_left(ids, max_prompt_tokens, bos)
        out.append({"where": where, "prompt": prompt, "reference": reference, "ids": cut,
                    "prompt_tokens": len(ids), "prompt_truncated": truncated})
    return out


def generation_metrics(model, tokenizer, rules, conversations: list, gen_cfg, eval_cfg, *,
                       max_samples: int | None = -1, generate: Callable | None = None) -> tuple[dict, list[dict]]:
    """Generate for (a fixed sample of) the conversations and score the replies.

    max_samples: -1 = gen_cfg.max_samples (training-time evaluation), None = every row (`llamaft eval`).
    generate: stand-in for generate_batch (tests); same signature as `_generate`.
    Returns (metrics, rows): metrics holds the configured metrics plus stops_on_eos, mean_new_tokens,
    samples and prompts_truncated; rows are what predictions.jsonl shows.
    """
    limit = gen_cfg.max_samples if max_samples == -1 else max_samples
    chosen = sample_rows(list(conversations), limit)
    if not chosen:
        raise LlamaftError("generation metrics: no rows to evaluate")
    prompts = build_prompts(chosen, tokenizer, rules, eval_cfg.max_prompt_tokens)
    results = (generate or _generate)(model, tokenizer, rules, [p["ids"] for p in prompts], gen_cfg)
    predictions = [r.text for r in results]
    references = [p["reference"] for p in prompts]
    metrics, per_row = compute_metrics(gen_cfg.metrics, predictions, references, gen_cfg.labels)
    metrics.update(generation_stats([r.stopped for r in results], [r.n_tokens for r in results]))
    metrics["samples"] = len(prompts)
    metrics["prompts_truncated"] = sum(p["prompt_truncated"] for p in prompts)
    rows = []
    for p, r, scores in zip(prompts, results, per_row):
        rows.append({
            "where": p["where"], "prompt": p["prompt"], "reference": p["reference"], "prediction": r.text,
            "scores": scores, "stopped": bool(r.stopped), "n_tokens": int(r.n_tokens),
            "prompt_tokens": p["prompt_tokens"], "prompt_truncated": p["prompt_truncated"],
        })
    return metrics, rows


# ---------------------------------------------------------------------------------------------
# Which generation settings apply to a set


def gen_config_for(eval_cfg, set_name: str, default: bool = False):
    """The set's GenerationEvalConfig: its own entry, else '*', else None (or defaults when `default`)."""
    gen = eval_cfg.generation
    if set_name in gen:
        return gen[set_name]
    if "*" in gen:
        return gen["*"]
    return GenerationEvalConfig() if default else None


def check_generation_sets(eval_cfg, set_names: list[str]) -> dict:
    """{set: GenerationEvalConfig} for the sets that get generation metrics; bad names are user errors."""
    for name in eval_cfg.generation:
        if name != "*" and name not in set_names:
            raise LlamaftError(f"eval.generation.{name}: no validation set named '{name}' "
                               f"(sets: {', '.join(set_names) or 'none'}; use '*' for all)")
    plan = {}
    for name in set_names:
        gen = gen_config_for(eval_cfg, name)
        if gen is not None:
            try:
                check_metrics(gen.metrics, gen.labels)
            except LlamaftError as err:
                key = name if name in eval_cfg.generation else "*"
                raise LlamaftError(f"eval.generation.{key}.metrics: {err}") from None
            plan[name] = gen
    return plan
