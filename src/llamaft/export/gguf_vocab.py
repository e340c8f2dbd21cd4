"""An HF byte-level BPE tokenizer directory -> the tokenizer metadata llama.cpp reads from a GGUF.

    vocab = read_vocab("merged/", vocab_size=128256); add_vocab(writer, vocab)

What llama.cpp needs (and what breaks when it is wrong):
- `tokenizer.ggml.model = gpt2` + every token string in id order + the BPE merges;
- `tokenizer.ggml.pre`: the pre-tokenizer regex set llama.cpp applies before BPE. It is recognised
  the way llama.cpp's convert_hf_to_gguf.py does it: hash the ids of a fixed probe text. A wrong
  value silently changes how digits, spaces and punctuation split, so an unknown hash is an error;
- token types: special (added) tokens are CONTROL, so `<|eot_id|>` in text is one id and is hidden
  when decoding; ids without a token are UNUSED;
- BOS/EOS/EOT/EOM/pad ids, add_bos (Llama 3 prepends <|begin_of_text|>, SmolLM2 does not), the chat
  template. llama.cpp stops on EOS/EOT/EOM and on tokens it recognises by text (<|eot_id|>,
  <|im_end|>, <|end_of_text|>, ...); a stop id it would not stop on is reported by `unstoppable`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LlamaftError

log = logging.getLogger(__name__)

# llama.cpp's probe text for the pre-tokenizer (conversion/base.py: get_vocab_base_pre).
_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256(str(ids of _PROBE)) -> llama.cpp pre-tokenizer name, for the Llama-architecture BPE
# tokenizers we support. Values are from llama.cpp's table (same hashes, same names).
_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3 / 3.1 / 3.2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# Token texts llama.cpp treats as end-of-generation by name (llama-vocab.cpp); other stop ids are
# only honoured when they are the EOS/EOT/EOM id.
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
              "<|end_of_text|>", "<EOT>", "</s>", "<eos>"}
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")

NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4  # gguf.TokenType values


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]  # "bos" | "eos" | "eot" | "eom" | "pad" | "unk" -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    stop_ids: list[int]  # generation_config.json eos_token_id (all stop ids), else [eos]
    unstoppable: list[int] = field(default_factory=list)  # stop ids llama.cpp would not stop on


def _stop_ids(model_dir: Path) -> list[int]:
    p = model_dir / "generation_config.json"
    if not p.is_file():
        return []
    v = json.loads(p.read_text(encoding="utf-8")).get("eos_token_id")
    return [int(x) for x in (v if isinstance(v, list) else [v])] if v is not None else []


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer (LlamaftError when unknown)."""
    digest = hashlib.sha256(str(tokenizer.encode(_PROBE)).encode()).hexdigest()
    pre = _PRE_BY_HASH.get(digest)
    if pre is None:
        raise LlamaftError(
            f"GGUF export: this tokenizer's pre-tokenizer is not one llamaft knows (probe sha256 {digest[:16]}…); "
            "llama.cpp would split text differently from transformers. Supported: Llama 3/3.1/3.2 (llama-bpe), "
            "SmolLM/SmolLM2, GPT-2; convert others with llama.cpp's convert_hf_to_gguf.py"
        )
    return pre


def _merges(model_dir: Path) -> list[str]:
    # gguf's SpecialVocab reads both merge formats of tokenizer.json and encodes spaces inside
    # merge parts the way llama.cpp expects.
    import gguf

    merges = gguf.SpecialVocab(model_dir, load_merges=True).merges
    if not merges:
        raise LlamaftError(f"GGUF export: {model_dir}/tokenizer.json has no BPE merges")
    return list(merges)


def read_vocab(model_dir: str | Path, vocab_size: int, tokenizer=None) -> GGUFVocab:
    """Token list, types, merges, pre-tokenizer, special ids and template of an HF model directory."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    _check_bpe(model_dir)
    tok = tokenizer or AutoTokenizer.from_pretrained(str(model_dir))
    pre = pre_tokenizer(tok)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise LlamaftError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} rows")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = _token_table(tok, by_id, vocab_size)
    stops = _stop_ids(model_dir)
    special = _special_ids(tok, vocab, by_id, stops, model_dir)
    probe = tok("a").input_ids  # what transformers adds around text decides what llama.cpp adds
    add_bos = bool(probe) and "bos" in special and probe[0] == special["bos"]
    add_eos = bool(probe) and probe[-1] == special["eos"] and len(probe) > 1
    added = tok.added_tokens_decoder
    for i, t in enumerate(types):  # a special id must be CONTROL or llama.cpp tokenizes its text
        if i in special.values() and t == NORMAL and i in added:
            types[i] = CONTROL
    stop_ids = stops or [special["eos"]]
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    return GGUFVocab(tokens, types, _merges(model_dir), pre, special, add_bos, add_eos, template, stop_ids,
                     _unstoppable(stop_ids, special, by_id))


def _check_bpe(model_dir: Path) -> None:
    """The directory has a fast byte-level BPE tokenizer (tokenizer.json), the only kind supported."""
    if not (model_dir / "tokenizer.json").is_file():
        raise LlamaftError(
            f"GGUF export: {model_dir} has no tokenizer.json (a fast byte-level BPE tokenizer is needed; "
            "SentencePiece tokenizers such as Llama 2 / Mistral are not supported)"
        )
    model = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE":
        raise LlamaftError(f"GGUF export: {model_dir}/tokenizer.json is a {model.get('type')} tokenizer; only byte-level BPE is supported")


def _token_table(tok, by_id: dict[int, str], vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text and type, in id order (ids without a token are UNUSED placeholders)."""
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows without a token (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            # llama.cpp matches added tokens in raw text, so store them as they appear in text.
            text = added[i].content
            tokens.append(text)
            types.append(CONTROL if added[i].special or (text.startswith("<|") and text.endswith("|>")) else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    return tokens, types


def _special_ids(tok, vocab: dict[str, int], by_id: dict[int, str], stops: list[int], model_dir: Path) -> dict[str, int]:
    """bos / eos / eot / eom / pad / unk ids as llama.cpp should see them."""
    added = tok.added_tokens_decoder

    def tid(text: str) -> int | None:
        i = vocab.get(text)
        return i if i is not None and i in added else None

    special: dict[str, int] = {}
    if tok.bos_token_id is not None:
        special["bos"] = tok.bos_token_id
    eos = tok.eos_token_id
    # A merged dir's generation_config lists the real stop ids; a tokenizer eos outside them (or
    # equal to bos: SmolLM2's GGUF-derived tokenizer) is broken metadata, so take a stop id instead.
    if eos is None or eos == tok.bos_token_id or (stops and eos not in stops):
        turn = [i for i in stops if by_id.get(i) in _EOT_TEXTS]
        eos = (turn or stops or [None])[0]
    if eos is None:
        raise LlamaftError(f"GGUF export: {model_dir} has no EOS token (tokenizer or generation_config.json)")
    special["eos"] = eos
    for name, texts in (("eot", _EOT_TEXTS), ("eom", ("<|eom_id|>",))):
        ids = [tid(t) for t in texts if tid(t) is not None]
        if ids:
            special[name] = ids[0]
    if tok.pad_token_id is not None:
        special["pad"] = tok.pad_token_id
    if tok.unk_token_id is not None:
        special["unk"] = tok.unk_token_id
    return special


def _unstoppable(stop_ids: list[int], special: dict[str, int], by_id: dict[int, str]) -> list[int]:
    """Stop ids llama.cpp would generate past: not its EOS/EOT/EOM id and not a known end-token text."""
    honoured = {special.get("eos"), special.get("eot"), special.get("eom")}
    unstoppable = [i for i in stop_ids if i not in honoured and by_id.get(i) not in _EOG_TEXTS]
    if unstoppable:
        log.warning("llama.cpp will not stop on token ids %s (not EOS/EOT/EOM and not a known end token)", unstoppable)
    return unstoppable


def add_vocab(writer, vocab: GGUFVocab) -> None:
    """Write the tokenizer keys into a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for name, tid in vocab.special.items():
        getattr(writer, f"add_{name}_token_id")(tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
