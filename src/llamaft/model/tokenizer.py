"""Tokenizer resolution and the per-family token rules (pad, EOS, stop ids, chat template).

    tok, rules = load_tokenizer(cfg.model, cfg.data)
    python -c "from llamaft.model.tokenizer import llama3_tokenizer; print(len(llama3_tokenizer('3.1')))"

Sources, in priority: `model.tokenizer: llama3 | llama3.1` (Meta's offline tiktoken file, converted once
and cached), a hub id / directory in `model.tokenizer`, else the model itself (hub id, HF dir, GGUF).
Templates, in priority: `data.chat_template` file > the tokenizer's own > ours (llama families).
The pad token is never an EOS/stop id: a model that learns "pad = EOS" never learns to stop.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..assets import cache_dir, llama3_tokenizer_file
from ..errors import ConfigError, LlamaftError
from .source import check_source, model_source

BOS, EOT, EOM, END = "<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"
LLAMA_VOCAB = 128256
_BUILD_VERSION = "1"  # bump when the conversion changes, so old caches are not reused


@dataclass
class TokenRules:
    family: str  # "llama3.1" | "llama3" | "other"
    instruct: bool  # render with a chat template (else plain text + EOS)
    pad_id: int  # never an EOS/stop id
    eos_id: int  # appended to plain text (base models)
    stop_ids: list[int]  # every id generation stops on (3.1 Instruct: 128001, 128008, 128009)
    turn_end_ids: list[int]  # ids that close an assistant turn (<|eot_id|>, <|eom_id|>, <|im_end|>)
    chat_template: str | None
    template_kwargs: dict  # extra Jinja variables (e.g. date_string for 3.1)
    added_tokens: list[str] = field(default_factory=list)  # new tokens: the caller must resize embeddings


# ---------------------------------------------------------------------------------------------
# Meta's offline tokenizer


def special_token_names(version: str) -> list[str]:
    """Names of ids 128000..128255 as in the HF repos of Meta-Llama-3 / Llama-3.1 (same ids either way)."""
    if version == "3.1":
        named = {0: BOS, 1: END, 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>",
                 7: "<|end_header_id|>", 8: EOM, 9: EOT, 10: "<|python_tag|>"}
    elif version == "3":
        named = {0: BOS, 1: END, 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: EOT}
    else:
        raise ConfigError(f"model.tokenizer: unknown Llama version '{version}' (use llama3 or llama3.1)")
    names, n = [], 0
    for i in range(256):
        if i in named:
            names.append(named[i])
        else:
            names.append(f"<|reserved_special_token_{n}|>")
            n += 1
    return names


def template_text(name: str) -> str:
    """A chat template shipped with llamaft: 'llama3' or 'llama3.1'."""
    return resources.files("llamaft.templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8").strip()


def llama3_tokenizer(version: str = "3.1"):
    """The exact Llama 3 / 3.1 fast tokenizer (128,256 ids) from Meta's `tokenizer.model`, offline.

    Converted once with transformers' TikTokenConverter (same regex and byte-level BPE as tiktoken)
    and cached under `cache_dir()`; later calls load the cached directory (~1 s).
    """
    import copy

    from transformers import PreTrainedTokenizerFast

    if version in _LOADED:  # loading 128k ids takes seconds; a copy keeps callers' changes apart
        return copy.deepcopy(_LOADED[version])
    src = llama3_tokenizer_file()
    # The shipped template is part of the key: a changed template must never be served from an old cache.
    key = f"{src.stat().st_size}:{src.stat().st_mtime_ns}:{_BUILD_VERSION}:{template_text('llama3' if version == '3' else 'llama3.1')}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = cache_dir() / "tokenizers" / f"llama{version}-{digest}"
    if not (target / "tokenizer.json").is_file():
        _build_llama3(str(src), version, target)
    tok = PreTrainedTokenizerFast.from_pretrained(str(target))
    tok.padding_side = "right"
    _LOADED[version] = tok
    return copy.deepcopy(tok)


_LOADED: dict = {}


def _build_llama3(src: str, version: str, target: Path) -> None:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=src, extra_special_tokens=special_token_names(version)).converted()
    # Like Meta's HF repos: every encode with special tokens starts with <|begin_of_text|>.
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 128000)]
        ),
    ])
    pad = "<|finetune_right_pad_id|>" if version == "3.1" else "<|reserved_special_token_2|>"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=END, pad_token=pad,
        model_max_length=131072 if version == "3.1" else 8192, padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = template_text(f"llama{version}")
    # Atomic: a crash or a parallel build never leaves a half-written cache entry.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    tok.save_pretrained(str(tmp))
    try:
        os.rename(tmp, target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Family detection and rules


def _id(tok, text: str) -> int | None:
    i = tok.convert_tokens_to_ids(text)
    return None if i is None or i == tok.unk_token_id and text != tok.unk_token else i


def detect_family(tokenizer, model_config=None) -> str:
    """'llama3.1' | 'llama3' | 'other' from the vocabulary (and the HF model config, if given)."""
    if _id(tokenizer, "<|finetune_right_pad_id|>") == 128004 or _id(tokenizer, EOM) == 128008:
        return "llama3.1"
    if _id(tokenizer, EOT) == 128009 and _id(tokenizer, "<|start_header_id|>") == 128006 and len(tokenizer) >= LLAMA_VOCAB:
        rope = getattr(model_config, "rope_scaling", None) or getattr(model_config, "rope_parameters", None) or {}
        if (rope or {}).get("rope_type") == "llama3" or getattr(model_config, "max_position_embeddings", 0) == 131072:
            return "llama3.1"
        return "llama3"
    return "other"


def _special_ids(tok) -> dict[int, str]:
    return {i: t.content for i, t in tok.added_tokens_decoder.items() if t.special}


def template_turn_end(tokenizer, template: str, kwargs: dict | None = None) -> int | None:
    """The first special token a template writes after an assistant message's content (e.g. <|im_end|>)."""
    sentinel = "XyzzyAnswer"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": sentinel}]
    try:
        text = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, **(kwargs or {}))
    except Exception:  # a template that cannot render this: no end-of-turn known
        return None
    after = text[text.rfind(sentinel) + len(sentinel):]
    special = _special_ids(tokenizer)
    for i in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if i in special:
            return i
    return None


def _ids(v) -> list[int]:
    return [] if v is None else [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def _other_eos(tok, hf_config) -> int:
    # The id that ends a plain document. Chat models often set eos to their end-of-turn token
    # (SmolLM2: config eos = <|im_end|>; its GGUF even says <|im_start|>), but plain-text training
    # should end with the pre-training document separator, which the model already knows.
    for name in ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|end|>"):
        i = _id(tok, name)
        if i is not None and i in _special_ids(tok):
            return i
    if tok.eos_token_id is not None and tok.eos_token_id != tok.bos_token_id:
        return tok.eos_token_id
    ids = _ids(getattr(hf_config, "eos_token_id", None))
    if not ids:
        raise LlamaftError("the tokenizer has no EOS token; set one in the tokenizer files")
    return ids[0]


def _pick_pad(tok, family: str, forbidden: set[int], template: str | None, allow_add: bool) -> tuple[int, list[str]]:
    if family == "llama3.1":
        return 128004, []  # <|finetune_right_pad_id|>: Meta's own pad
    if family == "llama3":
        return 128004, []  # <|reserved_special_token_2|>: never used in training, never a stop id
    if tok.pad_token_id is not None and tok.pad_token_id not in forbidden:
        return tok.pad_token_id, []
    for i, text in sorted(_special_ids(tok).items()):
        if i in forbidden or i in (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id):
            continue
        if template and text in template:
            continue
        return i, []
    if not allow_add:
        raise LlamaftError(
            "the tokenizer has no unused special token to pad with (EOS must not be the pad); "
            "set `model.add_pad_token: true` to add <|pad|> (embeddings are resized and saved)"
        )
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok.convert_tokens_to_ids("<|pad|>"), ["<|pad|>"]


def make_rules(tokenizer, family: str, instruct: bool, template: str | None, *, hf_config=None,
               template_kwargs: dict | None = None, add_pad_token: bool = False) -> TokenRules:
    """Pad/EOS/stop/turn-end ids for a family; sets the tokenizer's pad token and right padding."""
    kwargs = dict(template_kwargs or {})
    if family in ("llama3", "llama3.1"):
        eos = 128001
        turn_end = ([128009, 128008] if family == "llama3.1" else [128009]) if instruct else [eos]
        stops = sorted({eos, *turn_end})
    else:
        eos = _other_eos(tokenizer, hf_config)
        turn_end = [eos]
        stops = {eos}
        if instruct:
            end = template_turn_end(tokenizer, template, kwargs) if template else None
            turn_end = [end] if end is not None else [eos]
            tok_eos = tokenizer.eos_token_id
            # A tokenizer whose eos equals its bos has broken metadata (SmolLM2's GGUF): ignore it.
            stops = set(turn_end) | set(_ids(getattr(hf_config, "eos_token_id", None)))
            if tok_eos is not None and tok_eos != tokenizer.bos_token_id:
                stops.add(tok_eos)
        stops = sorted(stops)
    if family == "other" and instruct and tokenizer.eos_token_id == tokenizer.bos_token_id and turn_end[0] != eos:
        # Broken metadata (SmolLM2's GGUF says eos = <|im_start|>): make plain `generate` stop at the turn end.
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(turn_end[0])
    pad, added = _pick_pad(tokenizer, family, set(stops) | {eos, *turn_end}, template, add_pad_token)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    tokenizer.padding_side = "right"
    if template is not None:
        tokenizer.chat_template = template
    return TokenRules(family, instruct, pad, eos, stops, turn_end, template if instruct else None, kwargs, added)


# ---------------------------------------------------------------------------------------------
# Loading and saving


def _hf_config(model_cfg):
    """The model's HF config (eos ids, rope type) if it can be read offline; None otherwise."""
    from transformers import AutoConfig

    name, gguf = model_source(model_cfg)
    try:
        return AutoConfig.from_pretrained(name, gguf_file=gguf, revision=model_cfg.revision,
                                          trust_remote_code=model_cfg.trust_remote_code)
    except Exception:
        return None


def _from_source(model_cfg):
    src = model_cfg.tokenizer
    if src in ("llama3", "llama3.1"):
        return llama3_tokenizer("3.1" if src == "llama3.1" else "3"), True
    from transformers import AutoTokenizer

    name, gguf = (src, None) if src else model_source(model_cfg)
    # A missing directory or an unreachable hub: one line now, not transformers' retries and repo-id errors.
    if src:
        check_source(src, "model.tokenizer", model_cfg.revision)
    else:
        check_source(model_cfg.name, "model.name", model_cfg.revision, model_cfg.gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - hub/IO errors of many kinds; the user fixes the name
        key = "model.tokenizer" if src else "model.name"
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LlamaftError(f"{key}: cannot load a tokenizer from '{name}' ({msg}); "
                           "offline Llama 3: set `model.tokenizer: llama3.1`") from None
    return tok, False


def load_tokenizer(model_cfg, data_cfg):
    """(tokenizer, rules) for a run: pad set (never EOS), right padding, chat template chosen."""
    template_file = getattr(data_cfg, "chat_template", None) if data_cfg is not None else None
    custom = None
    if template_file:
        p = Path(template_file)
        if not p.is_file():
            raise ConfigError(f"data.chat_template: file not found: {template_file}")
        custom = p.read_text(encoding="utf-8").strip()
        if not custom:
            raise ConfigError(f"data.chat_template: {template_file} is empty")
    tok, offline = _from_source(model_cfg)
    # The HF config only refines detection (rope type, eos ids); for Meta's offline file it is
    # read only from a local model directory, never looked up on the hub.
    local = Path(model_cfg.name).exists()
    hf_config = _hf_config(model_cfg) if (not offline or local) else None
    family = model_cfg.family if model_cfg.family != "auto" else detect_family(tok, hf_config)
    own = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    ours = template_text(family) if family in ("llama3", "llama3.1") else None
    if model_cfg.instruct is not None:
        instruct = model_cfg.instruct
    else:
        # An offline Meta tokenizer carries our template, so it counts as instruct unless told otherwise.
        instruct = bool(custom or own or (ours and "instruct" in model_cfg.name.lower()))
    template = custom or own or ours
    if instruct and template is None:
        raise ConfigError(f"model.instruct is true but '{model_cfg.name}' has no chat template; "
                          "set data.chat_template: path/to/template.jinja")
    kwargs = {}
    date = getattr(data_cfg, "date", None) if data_cfg is not None else None
    if date and family == "llama3.1":
        kwargs["date_string"] = date
    if instruct and family in ("llama3", "llama3.1") and tok.eos_token != EOT:
        tok.eos_token = EOT  # like Meta's Instruct repos, so plain `generate` stops at the turn end
    rules = make_rules(tok, family, instruct, template, hf_config=hf_config, template_kwargs=kwargs,
                       add_pad_token=model_cfg.add_pad_token)
    return tok, rules


def bake_template_kwargs(template: str, kwargs: dict) -> str:
    """The template with our Jinja variables (e.g. date_string) as defaults, so a saved tokenizer
    renders like training did under plain transformers; a caller's own value still wins."""
    import json as _json

    head = "".join(
        f"{{%- if {k} is not defined %}}{{%- set {k} = {_json.dumps(v)} %}}{{%- endif %}}"
        for k, v in sorted(kwargs.items()) if isinstance(v, str) and k.isidentifier()
    )
    return head + template


def save_tokenizer(tokenizer, rules: TokenRules, out_dir) -> None:
    """Tokenizer files (with the chat template) + generation_config.json listing every stop id."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rules.chat_template:
        tokenizer.chat_template = bake_template_kwargs(rules.chat_template, rules.template_kwargs)
    tokenizer.save_pretrained(str(out))
    gen = GenerationConfig.from_pretrained(str(out)) if (out / "generation_config.json").is_file() else GenerationConfig()
    gen.eos_token_id = list(rules.stop_ids)
    gen.pad_token_id = rules.pad_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    gen.save_pretrained(str(out))
