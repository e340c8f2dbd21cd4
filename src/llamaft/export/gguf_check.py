"""Self-check of an exported GGUF: load it in llama.cpp (llama-cpp-python) and compare with transformers.

    report = check_gguf("demo.f16.gguf", "runs/demo/merged", [[{"role": "user", "content": "Hi"}]])
    print(report.verdict())

What is compared, and why:
- tokenization: llama.cpp's tokenizer (built from the GGUF vocab/merges/pre-tokenizer) against the
  HF tokenizer on varied text, special tokens in text, and the rendered chat template;
- generation: llama.cpp generates greedily from the same prompt ids; HF scores that very sequence in
  one forward pass. HF's argmax equals llama.cpp's token at every position <=> the two greedy
  generations are identical (f16/bf16 must be), and the share of equal positions is the top-1
  agreement (the number to quote for q8_0/q4_0, where small rounding may flip near-ties);
- stopping: every stop id of generation_config.json is end-of-generation in llama.cpp, and a prompt
  that ends its answer within `n_tokens` ends on such an id in both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LlamaftError

# Texts that exercise the pre-tokenizer (digit groups, whitespace runs, contractions, scripts).
PARITY_TEXTS = [
    "Hello world! How are you today?",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(3, 33))",
    "1 22 333 4444 55555 666666 3.14159 1,000,000 2024-07-26",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "   leading spaces\n\n\n   and    runs \t\t tabs",
    "Ünïcödé — “quotes” naïve café 日本語のテキスト 中文 Русский текст 🦙🚀😶‍🌫️",
    "",
]


def _specials_in_text(tok) -> list[str]:
    names = [t for t in ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>", "<|im_end|>",
                         "<|eom_id|>", "<|python_tag|>") if t in tok.get_vocab()]
    if not names:
        return []
    return [f"a{names[0]}b", " ".join(names) + " done", f"{names[-1]}\n{names[0]}user\nhello"]


@dataclass
class PromptCheck:
    prompt_tokens: int
    gguf_tokens: list[int]  # llama.cpp greedy continuation (ends with the stop id if it stopped)
    hf_top1: list[int]  # HF argmax at each of those positions (same prefix)
    max_logit_diff: float
    margins: list[float] = field(default_factory=list)  # HF logit of its top-1 minus that of llama.cpp's token

    @property
    def agree(self) -> int:
        return sum(a == b for a, b in zip(self.gguf_tokens, self.hf_top1))

    @property
    def equal(self) -> bool:
        return self.gguf_tokens == self.hf_top1


@dataclass
class GGUFReport:
    gguf_path: str
    file_type: str
    tokenization_total: int = 0
    tokenization_mismatches: list[dict] = field(default_factory=list)
    prompts: list[PromptCheck] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    not_eog: list[int] = field(default_factory=list)  # stop ids llama.cpp would not stop on
    stopped: int = 0  # prompts whose llama.cpp generation ended on a stop id
    stop_disagree: int = 0  # ... where HF did not pick that stop id at the same position

    @property
    def greedy_equal(self) -> bool:
        return bool(self.prompts) and all(p.equal for p in self.prompts)

    @property
    def top1_agreement(self) -> float:
        n = sum(len(p.gguf_tokens) for p in self.prompts)
        return sum(p.agree for p in self.prompts) / n if n else 0.0

    @property
    def max_logit_diff(self) -> float:
        return max((p.max_logit_diff for p in self.prompts), default=0.0)

    @property
    def near_tie_flips(self) -> int:
        """Disagreements where HF itself scores both tokens within the measured numeric noise: a
        16-bit rounding of activations can legitimately flip such a tie (common in random models)."""
        tol = 2 * self.max_logit_diff
        return sum(m <= tol for p in self.prompts for m in p.margins if m > 0)

    @property
    def real_flips(self) -> int:
        return sum(1 for p in self.prompts for m in p.margins if m > 0) - self.near_tie_flips

    @property
    def exact_expected(self) -> bool:
        return self.file_type in ("F32", "F16", "BF16")

    @property
    def passed(self) -> bool:
        # exact types: no flip beyond numeric noise (and noise must stay rare: a real bug flips most tokens)
        if self.exact_expected:
            gen_ok = self.real_flips == 0 and self.top1_agreement >= 0.95
        elif self.file_type in ("Q8_0", "Q6_K"):
            gen_ok = self.top1_agreement >= 0.9  # real SmolLM2-135M q8_0: 96.4%
        else:  # 4/5-bit: the agreement is reported, not judged (SmolLM2-135M q4_0: 67%; larger models do better)
            gen_ok = True
        return gen_ok and not self.tokenization_mismatches and not self.not_eog and not self.stop_disagree

    def verdict(self) -> str:
        n = sum(len(p.gguf_tokens) for p in self.prompts)
        parts = [
            f"tokenizer {self.tokenization_total - len(self.tokenization_mismatches)}/{self.tokenization_total} texts equal",
            f"greedy {'identical' if self.greedy_equal else 'differs'} over {n} tokens in {len(self.prompts)} prompts "
            f"(top-1 agreement {self.top1_agreement:.1%}, {self.near_tie_flips} near-tie flips, {self.real_flips} other, "
            f"max |logit diff| {self.max_logit_diff:.3g})",
            f"stops on {self.stop_ids}" + (f" EXCEPT {self.not_eog}" if self.not_eog else "")
            + f", {self.stopped}/{len(self.prompts)} answers ended on a stop token",
        ]
        return f"{'PASS' if self.passed else 'FAIL'} {Path(self.gguf_path).name} [{self.file_type}]: " + "; ".join(parts)


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def open_gguf(path, n_ctx: int = 2048, logits_all: bool = False):
    """A llama_cpp.Llama for `path` (CPU, quiet); LlamaftError when the binding is missing."""
    try:
        import llama_cpp
    except ImportError:
        raise LlamaftError(
            "llama.cpp's Python binding is not installed: run scripts/build_llama_cpp_wheel.sh "
            "(or `pip install llama-cpp-python`), or skip the check with --no-check"
        ) from None
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                           n_threads=os.cpu_count() or 1, n_gpu_layers=0)


def _prompt_ids(tok, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tok(prompt).input_ids
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _tokenization(llm, tok, report: GGUFReport, chat_texts: list[str]) -> None:
    cases = [(t, True) for t in PARITY_TEXTS + _specials_in_text(tok)] + [(t, False) for t in chat_texts]
    for text, add_special in cases:
        hf = tok(text, add_special_tokens=add_special).input_ids
        cpp = llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)
        report.tokenization_total += 1
        if hf != cpp:
            report.tokenization_mismatches.append({"text": text[:80], "hf": hf[:20], "llama.cpp": cpp[:20]})


DEFAULT_QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.",
                     "Explain in two sentences what a GGUF file is."]


def check_gguf(gguf_path, hf_model_dir, prompts=None, n_tokens: int = 32, *, hf_model=None, tokenizer=None) -> GGUFReport:
    """Compare a GGUF in llama.cpp with the HF model directory it came from (see module docstring).

    prompts: plain strings (encoded with the tokenizer's specials) or message lists (chat template);
    default: three chat questions (chat models) plus one plain-text prompt.
    """
    import llama_cpp

    tok, model, stops = _hf_side(Path(hf_model_dir), hf_model, tokenizer)
    report = GGUFReport(str(gguf_path), _file_type(gguf_path), stop_ids=stops)
    prompts = _default_prompts(tok) if prompts is None else prompts
    ids_list = [_prompt_ids(tok, p) for p in prompts]
    llm = open_gguf(gguf_path, n_ctx=max(512, max((len(i) for i in ids_list), default=0) + n_tokens + 8), logits_all=True)
    try:
        vocab = llm._model.vocab  # the binding has no public is-EOG call
        report.not_eog = [s for s in stops if not llama_cpp.llama_vocab_is_eog(vocab, s)]
        chat_texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts if not isinstance(p, str)]
        _tokenization(llm, tok, report, chat_texts)
        for ids in ids_list:
            check = _greedy_check(llm, model, ids, n_tokens, lambda t: llama_cpp.llama_vocab_is_eog(vocab, t))
            report.prompts.append(check)
            gen, top1 = check.gguf_tokens, check.hf_top1
            if gen and gen[-1] in stops:
                report.stopped += 1
                report.stop_disagree += int(top1[-1] != gen[-1])
    finally:
        llm.close()
    return report


def _hf_side(hf_model_dir: Path, hf_model=None, tokenizer=None):
    """(tokenizer, fp32 model, stop ids) of the HF model directory; the stop ids from its
    generation_config.json, else the tokenizer's EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = tokenizer or AutoTokenizer.from_pretrained(str(hf_model_dir))
    model = hf_model or AutoModelForCausalLM.from_pretrained(str(hf_model_dir), dtype=torch.float32).eval()
    try:
        stops = GenerationConfig.from_pretrained(str(hf_model_dir)).eos_token_id
    except OSError:
        stops = tok.eos_token_id
    stops = [int(s) for s in (stops if isinstance(stops, (list, tuple)) else [stops]) if s is not None]
    return tok, model, stops


def _file_type(gguf_path) -> str:
    """general.file_type as llamaft names it: F32, F16, BF16, Q8_0, Q4_K_M, ..."""
    import gguf

    from ..assets import gguf_reader

    reader = gguf_reader(str(gguf_path))  # the whole vocabulary is parsed to reach one field: the fast view
    ftype = gguf.LlamaFileType(int(reader.fields["general.file_type"].contents())).name.removeprefix("MOSTLY_")
    return "F32" if ftype == "ALL_F32" else ftype


def _default_prompts(tok) -> list:
    chat = isinstance(getattr(tok, "chat_template", None), str)
    return ([[{"role": "user", "content": q}] for q in DEFAULT_QUESTIONS] if chat else []) + ["The llama is an animal that"]


def _greedy_check(llm, model, ids: list[int], n_tokens: int, is_eog) -> PromptCheck:
    """llama.cpp generates greedily from `ids` (until an end-of-generation id or n_tokens); HF scores
    that very sequence in one forward pass; their top-1 tokens and logits are compared."""
    import torch

    llm.reset()
    llm.eval(ids)
    gen = []
    for _ in range(n_tokens):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        gen.append(t)
        if is_eog(t):
            break
        llm.eval([t])
    start = len(ids) - 1
    cpp_logits = np.array(llm.scores[start:start + len(gen)], dtype=np.float32)
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids + gen[:-1]])).logits[0, start:].float().numpy()
    top1 = [int(i) for i in hf_logits.argmax(-1)]
    diff = float(np.abs(hf_logits - cpp_logits).max()) if len(gen) else 0.0
    margins = [float(row[a] - row[b]) for row, a, b in zip(hf_logits, top1, gen)]
    return PromptCheck(len(ids), gen, top1, diff, margins)
