"""A Hugging Face byte-level BPE tokenizer (tokenizer.json) as GGUF vocabulary metadata.

llama.cpp does not run tokenizer.json's pre-tokenizer; it picks one of its own built-in splitting rules by
the name in `tokenizer.ggml.pre`. llama.cpp's reference converter chooses that name by hashing the
tokenization of a probe text and refuses tokenizers it has not seen. Here the name is chosen from the rule
itself: tokenizer.json's `pre_tokenizer` is reduced to a canonical description (the Split regex, the
ByteLevel regex flag, the Digits step) and looked up in a table of the rules llama.cpp implements. A rule
not in the table is refused with the rule in the message, rather than silently tokenizing differently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

# The regexes below are copied character for character from tokenizer.json files of each family.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# canonical pre-tokenizer description → llama.cpp `tokenizer.ggml.pre` name with the same splitting rule
PRE_TOKENIZERS: Mapping[tuple[str, ...], str] = {
    (f"split:{_QWEN2_SPLIT}", "bytelevel"): "qwen2",
    (f"split:{_LLAMA3_SPLIT}", "bytelevel"): "llama-bpe",
    (f"split:{_QWEN35_SPLIT}", "bytelevel"): "qwen35",
    ("bytelevel+gpt2-regex",): "gpt-2",
    ("digits:individual", "bytelevel+gpt2-regex"): "smollm",
}


class TokenizerError(ValueError):
    """tokenizer.json is missing or describes a tokenizer llama.cpp cannot reproduce."""


@dataclass(frozen=True)
class GgufVocab:
    """Everything `tokenizer.ggml.*` needs, in token-id order."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # gguf.TokenType values
    pre: str  # llama.cpp pre-tokenizer name


def describe_pre_tokenizer(pre_tokenizer: Mapping[str, Any] | None) -> tuple[str, ...]:
    """tokenizer.json's pre_tokenizer as a tuple of canonical steps (see PRE_TOKENIZERS)."""
    if pre_tokenizer is None:
        return ()
    if pre_tokenizer.get("type") == "Sequence":
        return tuple(step for item in pre_tokenizer.get("pretokenizers", []) for step in describe_pre_tokenizer(item))
    kind = pre_tokenizer.get("type")
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        regex = pattern.get("Regex") if isinstance(pattern, Mapping) else None
        behavior = pre_tokenizer.get("behavior")
        if regex is None or behavior != "Isolated" or pre_tokenizer.get("invert"):
            return (f"split(unsupported):{json.dumps(pre_tokenizer, sort_keys=True)}",)
        return (f"split:{regex}",)
    if kind == "ByteLevel":
        if pre_tokenizer.get("add_prefix_space"):
            return ("bytelevel+prefix-space",)
        return ("bytelevel+gpt2-regex",) if pre_tokenizer.get("use_regex", True) else ("bytelevel",)
    if kind == "Digits":
        return ("digits:individual" if pre_tokenizer.get("individual_digits") else "digits:grouped",)
    return (f"{kind}:{json.dumps(pre_tokenizer, sort_keys=True)}",)


def llama_cpp_pre_name(pre_tokenizer: Mapping[str, Any] | None) -> str:
    description = describe_pre_tokenizer(pre_tokenizer)
    name = PRE_TOKENIZERS.get(description)
    if name is None:
        raise TokenizerError(
            "llama.cpp has no pre-tokenizer with this splitting rule: "
            + " + ".join(description or ("none",))
            + f" (known: {', '.join(sorted(PRE_TOKENIZERS.values()))})"
        )
    return name


def read_tokenizer_json(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "tokenizer.json"
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path} is missing (only tokenizer.json tokenizers are supported)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} is not a JSON object")
    return data


def build_vocab(tokenizer: Mapping[str, Any], n_vocab: int) -> GgufVocab:
    """Tokens and their types, padded to the model's `n_vocab` embedding rows with unused placeholders."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"tokenizer model {model.get('type')!r} is not supported (byte-level BPE only)")
    if model.get("byte_fallback"):
        raise TokenizerError("a BPE tokenizer with byte_fallback is SentencePiece-style, not byte-level BPE")
    pre = llama_cpp_pre_name(tokenizer.get("pre_tokenizer"))
    by_id: dict[int, tuple[str, gguf.TokenType]] = {
        token_id: (text, gguf.TokenType.NORMAL) for text, token_id in model.get("vocab", {}).items()
    }
    for added in tokenizer.get("added_tokens", []):
        # Special added tokens are control tokens (never produced from text unless asked for); the others
        # (e.g. Qwen3's <think>) are user-defined: matched as whole strings in text, rendered as is.
        token_type = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (str(added["content"]), token_type)
    if not by_id:
        raise TokenizerError("tokenizer.json has an empty vocabulary")
    largest = max(by_id)
    if largest >= n_vocab:
        raise TokenizerError(f"token id {largest} does not fit the model's {n_vocab} embedding rows (vocab_size)")
    tokens: list[str] = []
    types: list[int] = []
    for token_id in range(n_vocab):
        text, token_type = by_id.get(token_id, (f"[PAD{token_id}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(token_type))
    return GgufVocab(tokens=tuple(tokens), token_types=tuple(types), pre=pre)


def add_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, n_vocab: int, chat_template: str | None = None) -> GgufVocab:
    """Write tokenizer.ggml.* (tokens, types, merges, special ids) and the chat template; return the vocab."""
    vocab = build_vocab(read_tokenizer_json(hf_dir), n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    # gguf's SpecialVocab reads merges (both tokenizer.json formats), bos/eos/pad ids, add_bos/add_eos and
    # the chat template (tokenizer_config.json, chat_template.jinja or chat_template.json).
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise TokenizerError(f"{hf_dir / 'tokenizer.json'} has no BPE merges")
    if chat_template is not None:
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
    return vocab
