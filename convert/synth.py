"""Tiny random-weight GGUF models of the real architectures, for tests (`python -m convert synth`).

Each file has the tensor names, shapes and metadata llama.cpp expects for its architecture, a small
byte-level BPE tokenizer (so real text tokenizes and detokenizes), and a ChatML chat template, in
0.1-1.8 MB. Weights are random but chosen so the models are useful in tests:

- qwen3next is the real hybrid: Gated DeltaNet (linear attention) layers with full gated-attention layers
  every `full_attention_interval`-th layer, routed experts stacked per layer plus a gated shared expert.
  Its decay (`ssm_a`, `ssm_dt.bias`) is set so the recurrent state fades slowly: with the reference
  initialisation the state is forgotten almost at once, and a test of state save/restore would then
  pass without the state mattering.
- Router weights are scaled up so the router logits of different experts are well apart: near-ties flip
  the chosen expert under rounding, and batched vs single-sequence results would then differ for a
  reason that is not the engine's fault.
- qwen3next with `mtp=True` (`--mtp`) gets Qwen3-Next's multi-token-prediction head the way llama.cpp
  loads it (see docs/mtp.md): one extra block `blk.{n_layers}` (a full-attention + MoE block like the
  trunk's) with `nextn.eh_proj`, `nextn.enorm`, `nextn.hnorm`, `nextn.shared_head_norm`, block_count
  counting it and `qwen3next.nextn_predict_layers = 1`. Random MTP weights would guess the next-but-one
  token about 1 time in n_vocab, and a speculative-decoding test would then never see an accepted draft:
  so the head is built to be a good guesser of this model. The trunk's layers are damped (see
  `_MTP_TRUNK_DAMPING`), making the model nearly a bigram model (next token ≈ f(current token)), and the
  MTP block passes the embedding of its input token straight through (eh_proj = [I | 0], small block
  outputs), so it predicts f(token) too: most drafts are accepted, some are not.

The same arguments always write the same bytes (the random stream of each tensor is seeded from the
seed and the tensor's name), and a file appears under its final name only once it is complete.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

SUPPORTED_ARCHS: tuple[str, ...] = ("qwen3next", "qwen3moe", "qwen3", "llama")

# dtype name → (type of the quantizable weight matrices, general.file_type written)
_DTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
SUPPORTED_DTYPES: tuple[str, ...] = tuple(_DTYPES)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

# Qwen-style ChatML. The "\n" inside the Jinja string literals are Jinja escapes, hence the raw string.
CHATML_TEMPLATE = (
    r"{%- for message in messages %}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}"
    r"{{- '<|im_start|>assistant\n' }}"
    r"{%- endif %}"
)

# Text the tokenizer's merges are learned from: ordinary English, so English prompts compress a bit.
_MERGE_CORPUS = """\
The quick brown fox jumps over the lazy dog. This is a small model that is used in the tests of the
server, and it should behave like a real model: it reads text, it writes text, and the text that it
writes depends on the text that it reads. When the engine runs many requests at the same time, each
request must get the same answer that it would get if it were alone. That is the whole point of these
tests, and there is nothing more to them than that.
Hello, world! How are you today? I am fine, thank you. What is the weather like where you are? It is
raining here, and the wind is cold, but the sun will come out in the afternoon. Would you like to go
for a walk in the park with me and the children? We could have lunch at the little restaurant near
the river, where they make the best soup in the town. Then we could visit the museum of history and
look at the old maps of the country. There are many interesting things to see and to learn there.
The assistant answers the question of the user. The user asks a question about the system, and the
assistant gives a short answer with a number in it: one, two, three, four, five, six, seven, eight,
nine, ten. Please write a story about a dragon who lives in a mountain and reads books all day long.
Once upon a time there was a king who had three daughters. The youngest was the most beautiful of
them all, and the king loved her more than anything else in the world. Every morning she went down
to the garden to play with her golden ball, and every evening she came back to the castle to sing.
"""

# GPT-2-style pre-tokenization, close to Qwen2's split rule for the ASCII training text above.
_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\r\n\w]?[A-Za-z]+|\d| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+")
# Merges stop when no pair occurs twice (166 for this corpus: 425 tokens in all); the cap bounds the vocabulary.
_MAX_MERGES = 512


@dataclass(frozen=True)
class SynthDims:
    """The hyperparameters of one synthetic model (what its GGUF metadata says)."""

    arch: str
    n_layers: int
    head_dim: int
    rope_dim: int
    rope_freq_base: float
    rms_eps: float = 1e-6
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128  # dense FFN width (qwen3, llama); written but unused by the MoE architectures
    context_length: int = 4096
    n_expert: int = 0  # 0 for dense models
    n_expert_used: int = 0
    n_ff_exp: int = 0  # width of one routed expert
    n_ff_shexp: int = 0  # width of the shared expert (qwen3next only)
    # Gated DeltaNet (qwen3next only)
    full_attention_interval: int = 0
    ssm_conv_kernel: int = 0
    ssm_state_size: int = 0  # head dim of keys and of values
    ssm_group_count: int = 0  # key heads
    ssm_time_step_rank: int = 0  # value heads
    n_mtp_layers: int = 0  # multi-token-prediction blocks after the trunk (qwen3next only: 0 or 1)

    @property
    def n_blocks(self) -> int:
        """GGUF block_count: the trunk's layers and the MTP blocks that follow them."""
        return self.n_layers + self.n_mtp_layers

    @property
    def ssm_inner_size(self) -> int:
        return self.ssm_state_size * self.ssm_time_step_rank

    def is_recurrent(self, layer: int) -> bool:
        """Whether `layer` is a Gated DeltaNet layer (llama.cpp's rule for full_attention_interval)."""
        return self.full_attention_interval > 0 and (layer + 1) % self.full_attention_interval != 0

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(layer for layer in range(self.n_layers) if not self.is_recurrent(layer))

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return tuple(layer for layer in range(self.n_layers) if self.is_recurrent(layer))


def _default_dims(arch: str) -> SynthDims:
    if arch == "qwen3next":
        # Qwen3-Next-80B-A3B in miniature: head_dim != n_embd / n_head, a quarter of each head rotated,
        # twice as many value heads as key heads in the Gated DeltaNet, full attention in one layer of four.
        return SynthDims(
            arch=arch,
            n_layers=4,
            head_dim=32,
            rope_dim=8,
            rope_freq_base=10_000_000.0,
            n_expert=8,
            n_expert_used=2,
            n_ff_exp=32,
            n_ff_shexp=64,
            full_attention_interval=4,
            ssm_conv_kernel=4,
            ssm_state_size=32,
            ssm_group_count=2,
            ssm_time_step_rank=4,
        )
    if arch == "qwen3moe":
        return SynthDims(
            arch=arch,
            n_layers=2,
            head_dim=32,
            rope_dim=32,
            rope_freq_base=1_000_000.0,
            n_expert=8,
            n_expert_used=2,
            n_ff_exp=32,
        )
    if arch == "qwen3":
        return SynthDims(arch=arch, n_layers=2, head_dim=32, rope_dim=32, rope_freq_base=1_000_000.0)
    # llama requires head_dim == n_embd / n_head == rope_dim.
    return SynthDims(arch=arch, n_layers=2, head_dim=16, rope_dim=16, rope_freq_base=10_000.0, rms_eps=1e-5)


def synthetic_dims(arch: str, n_layers: int | None = None, *, mtp: bool = False) -> SynthDims:
    """The hyperparameters `write_synthetic_model` uses for `arch` (ValueError for what it cannot write)."""
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(SUPPORTED_ARCHS)}")
    if mtp and arch != "qwen3next":
        raise ValueError(f"an MTP head is written for qwen3next only, not {arch}")
    dims = replace(_default_dims(arch), n_mtp_layers=1 if mtp else 0)
    if n_layers is None:
        return dims
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1, got {n_layers}")
    if arch == "qwen3next" and n_layers < dims.full_attention_interval:
        # llama.cpp aborts on a qwen3next model without an attention layer.
        raise ValueError(
            f"qwen3next needs n_layers >= {dims.full_attention_interval} (full attention every "
            f"{dims.full_attention_interval}th layer; at least one attention layer), got {n_layers}"
        )
    return replace(dims, n_layers=n_layers)


def write_synthetic_model(
    arch: str,
    out: Path,
    *,
    dtype: str = "f32",
    seed: int = 0,
    n_layers: int | None = None,
    legacy_ssm_in: bool = False,
    mtp: bool = False,
) -> Path:
    """Write a tiny random-weight GGUF of `arch` to `out` (atomically) and return `out`.

    dtype: type of the weight matrices ("f32", "f16", "q8_0", "q4_0"); norms, routers, the conv kernel
    and the decay vectors stay f32, as llama.cpp's converter keeps them.
    legacy_ssm_in (qwen3next): write each Gated DeltaNet input projection as one fused `ssm_in` tensor,
    the layout of GGUFs converted before llama.cpp split it into `attn_qkv` + `attn_gate`.
    mtp (qwen3next): add a multi-token-prediction head that guesses well (see the module docstring).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(SUPPORTED_DTYPES)}")
    if legacy_ssm_in and arch != "qwen3next":
        raise ValueError("legacy_ssm_in applies to qwen3next only")
    dims = synthetic_dims(arch, n_layers, mtp=mtp)
    weight_type, file_type = _DTYPES[dtype]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A unique name beside the target (same file system, so the rename is atomic), created with the
    # process's normal permissions (mkstemp's 0600 would carry over to the final file).
    tmp_path = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    vocab = _vocab()
    writer = gguf.GGUFWriter(tmp_path, arch)
    try:
        _add_metadata(writer, dims, file_type, vocab.n_tokens)
        _add_tokenizer(writer, vocab)
        for tensor in _tensors(dims, vocab.n_tokens, legacy_ssm_in):
            _add_tensor(writer, tensor, seed, weight_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp_path, out)
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise
    return out


# --- metadata --------------------------------------------------------------------------------------------


def _add_metadata(writer: gguf.GGUFWriter, dims: SynthDims, file_type: gguf.LlamaFileType, n_vocab: int) -> None:
    writer.add_name(f"synthetic-{dims.arch}")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(dims.context_length)
    writer.add_embedding_length(dims.n_embd)
    writer.add_block_count(dims.n_blocks)
    if dims.n_mtp_layers:
        writer.add_nextn_predict_layers(dims.n_mtp_layers)
    writer.add_feed_forward_length(dims.n_ff)
    writer.add_head_count(dims.n_head)
    writer.add_head_count_kv(dims.n_head_kv)
    writer.add_rope_freq_base(dims.rope_freq_base)
    writer.add_rope_dimension_count(dims.rope_dim)
    writer.add_layer_norm_rms_eps(dims.rms_eps)
    if dims.arch != "llama":
        writer.add_key_length(dims.head_dim)
        writer.add_value_length(dims.head_dim)
    else:
        writer.add_vocab_size(n_vocab)
    if dims.n_expert:
        writer.add_expert_count(dims.n_expert)
        writer.add_expert_used_count(dims.n_expert_used)
        writer.add_expert_feed_forward_length(dims.n_ff_exp)
    if dims.n_ff_shexp:
        writer.add_expert_shared_feed_forward_length(dims.n_ff_shexp)
    if dims.arch == "qwen3next":
        writer.add_ssm_conv_kernel(dims.ssm_conv_kernel)
        writer.add_ssm_state_size(dims.ssm_state_size)
        writer.add_ssm_group_count(dims.ssm_group_count)
        writer.add_ssm_time_step_rank(dims.ssm_time_step_rank)
        writer.add_ssm_inner_size(dims.ssm_inner_size)
        writer.add_full_attention_interval(dims.full_attention_interval)


# --- tokenizer -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Vocab:
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def token_id(self, text: str) -> int:
        return self.tokens.index(text)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, the alphabet of byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    n_shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + n_shifted)
            n_shifted += 1
    return mapping


def _learn_merges(corpus: str, n_merges: int, byte_chars: dict[int, str]) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    word_counts = Counter(
        tuple(byte_chars[byte] for byte in piece.encode("utf-8")) for piece in _PRETOKENIZE.findall(corpus)
    )
    words = dict(word_counts)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best_pair, best_count = min(pair_counts.items(), key=lambda item: (-item[1], item[0]))
        if best_count < 2:
            break
        merges.append(best_pair)
        words = {_merge_pair(symbols, best_pair): count for symbols, count in words.items()}
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def _vocab() -> _Vocab:
    byte_chars = _byte_to_unicode()
    tokens = [byte_chars[byte] for byte in range(256)]
    known = set(tokens)
    merges = _learn_merges(_MERGE_CORPUS, _MAX_MERGES, byte_chars)
    for left, right in merges:
        if left + right not in known:  # two different merges may spell the same token
            known.add(left + right)
            tokens.append(left + right)
    token_types = [gguf.TokenType.NORMAL] * len(tokens)
    tokens.extend(SPECIAL_TOKENS)
    token_types.extend([gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS))
    return _Vocab(
        tokens=tuple(tokens),
        token_types=tuple(int(token_type) for token_type in token_types),
        merges=tuple(f"{left} {right}" for left, right in merges),
    )


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: _Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")  # Qwen2's split rule, which llama.cpp knows by this name
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    writer.add_token_merges(list(vocab.merges))
    writer.add_bos_token_id(vocab.token_id(ENDOFTEXT))
    writer.add_eos_token_id(vocab.token_id(IM_END))
    writer.add_pad_token_id(vocab.token_id(ENDOFTEXT))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


# --- tensors ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorSpec:
    """One tensor: GGUF name, numpy shape (ggml's ne reversed), how to fill it, and whether it stays f32."""

    name: str
    shape: tuple[int, ...]
    # "matrix": normal(0, scale / sqrt(fan_in)); "norm": 1 + normal(0, 0.1); "values": given;
    # "passthrough" (n, 2n): [identity | normal(0, scale / sqrt(n))]
    kind: str
    scale: float = 1.0
    keep_f32: bool = False
    values: tuple[float, ...] = ()
    stream: str = ""  # the name whose random stream fills it (default: its own name)


def _matrix(name: str, shape: tuple[int, ...], scale: float = 1.0, keep_f32: bool = False) -> _TensorSpec:
    return _TensorSpec(name=name, shape=shape, kind="matrix", scale=scale, keep_f32=keep_f32)


def _norm(name: str, size: int) -> _TensorSpec:
    return _TensorSpec(name=name, shape=(size,), kind="norm", keep_f32=True)


def _tensors(dims: SynthDims, n_vocab: int, legacy_ssm_in: bool) -> Iterator[_TensorSpec]:
    # Embeddings with unit variance per element; the output head scaled so logits spread over a few
    # units (a sharp enough distribution for greedy decoding to depend on the prompt).
    yield _TensorSpec(name="token_embd.weight", shape=(n_vocab, dims.n_embd), kind="matrix", scale=8.0)
    yield _norm("output_norm.weight", dims.n_embd)
    yield _matrix("output.weight", (n_vocab, dims.n_embd), scale=2.5)
    for layer in range(dims.n_layers):
        yield from _damped(dims, _layer_tensors(dims, layer, legacy_ssm_in))
    for layer in range(dims.n_layers, dims.n_blocks):
        yield from _mtp_tensors(dims, layer)


# With an MTP head, the trunk's layer outputs are scaled by this (see the module docstring): small enough
# that the embedding dominates the residual stream, large enough that the context still changes some
# predictions (so some drafts are rejected).
_MTP_TRUNK_DAMPING = 0.15
# What writes into the residual stream: a layer's output projections.
_RESIDUAL_WRITERS = ("attn_output.weight", "ssm_out.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight")


def _damped(dims: SynthDims, specs: Iterator[_TensorSpec]) -> Iterator[_TensorSpec]:
    for spec in specs:
        if dims.n_mtp_layers and spec.name.endswith(_RESIDUAL_WRITERS):
            spec = replace(spec, scale=spec.scale * _MTP_TRUNK_DAMPING)
        yield spec


def _mtp_tensors(dims: SynthDims, layer: int) -> Iterator[_TensorSpec]:
    """One MTP block as llama.cpp's qwen3next loader reads it: a trunk-like full-attention MoE block plus the
    nextn projections. eh_proj maps concat(enorm(embedding), hnorm(hidden)) to the block's input; here it
    copies the embedding half and ignores the hidden half, and the block's own outputs are small, so the
    head predicts what the (nearly bigram) trunk predicts after its input token."""
    blk = f"blk.{layer}"
    yield _norm(f"{blk}.attn_norm.weight", dims.n_embd)
    yield _norm(f"{blk}.post_attention_norm.weight", dims.n_embd)
    yield from _damped(dims, _attention_tensors(dims, blk, query_gate=True))
    yield from _damped(dims, _moe_tensors(dims, blk))
    yield from _damped(dims, _shared_expert_tensors(dims, blk))
    # GGUF {2 * n_embd, n_embd}: numpy (n_embd, 2 * n_embd), input columns [embedding | hidden]. The
    # hidden half is small but not zero, so a head fed the wrong hidden state drafts differently.
    yield _TensorSpec(
        name=f"{blk}.nextn.eh_proj.weight", shape=(dims.n_embd, 2 * dims.n_embd), kind="passthrough", scale=0.3
    )
    yield _TensorSpec(
        name=f"{blk}.nextn.enorm.weight",
        shape=(dims.n_embd,),
        kind="values",
        keep_f32=True,
        values=(1.0,) * dims.n_embd,
    )
    yield _norm(f"{blk}.nextn.hnorm.weight", dims.n_embd)
    # The trunk's final norm, value for value (same random stream): the head's logits then match the trunk's.
    yield replace(_norm(f"{blk}.nextn.shared_head_norm.weight", dims.n_embd), stream="output_norm.weight")


def _layer_tensors(dims: SynthDims, layer: int, legacy_ssm_in: bool) -> Iterator[_TensorSpec]:
    blk = f"blk.{layer}"
    yield _norm(f"{blk}.attn_norm.weight", dims.n_embd)
    if dims.arch == "qwen3next":
        # qwen3next normalizes after attention with `post_attention_norm` instead of `ffn_norm`.
        yield _norm(f"{blk}.post_attention_norm.weight", dims.n_embd)
        if dims.is_recurrent(layer):
            yield from _gated_deltanet_tensors(dims, blk, legacy_ssm_in)
        else:
            yield from _attention_tensors(dims, blk, query_gate=True)
        yield from _moe_tensors(dims, blk)
        yield from _shared_expert_tensors(dims, blk)
        return
    yield from _attention_tensors(dims, blk, query_gate=False)
    yield _norm(f"{blk}.ffn_norm.weight", dims.n_embd)
    if dims.n_expert:
        yield from _moe_tensors(dims, blk)
    else:
        yield _matrix(f"{blk}.ffn_gate.weight", (dims.n_ff, dims.n_embd))
        yield _matrix(f"{blk}.ffn_up.weight", (dims.n_ff, dims.n_embd))
        yield _matrix(f"{blk}.ffn_down.weight", (dims.n_embd, dims.n_ff))


def _attention_tensors(dims: SynthDims, blk: str, query_gate: bool) -> Iterator[_TensorSpec]:
    n_q = dims.n_head * dims.head_dim
    n_kv = dims.n_head_kv * dims.head_dim
    # Qwen3-Next's gated attention: attn_q yields the query and an output gate per head (twice as wide).
    yield _matrix(f"{blk}.attn_q.weight", (2 * n_q if query_gate else n_q, dims.n_embd))
    yield _matrix(f"{blk}.attn_k.weight", (n_kv, dims.n_embd))
    yield _matrix(f"{blk}.attn_v.weight", (n_kv, dims.n_embd))
    yield _matrix(f"{blk}.attn_output.weight", (dims.n_embd, n_q))
    if dims.arch != "llama":
        yield _norm(f"{blk}.attn_q_norm.weight", dims.head_dim)
        yield _norm(f"{blk}.attn_k_norm.weight", dims.head_dim)


def _gated_deltanet_tensors(dims: SynthDims, blk: str, legacy_ssm_in: bool) -> Iterator[_TensorSpec]:
    key_dim = dims.ssm_state_size * dims.ssm_group_count
    value_dim = dims.ssm_inner_size
    conv_dim = 2 * key_dim + value_dim
    n_v_heads = dims.ssm_time_step_rank
    if legacy_ssm_in:
        yield _matrix(f"{blk}.ssm_in.weight", (2 * key_dim + 2 * value_dim, dims.n_embd))
    else:
        yield _matrix(f"{blk}.attn_qkv.weight", (conv_dim, dims.n_embd))
        yield _matrix(f"{blk}.attn_gate.weight", (value_dim, dims.n_embd))
    yield _matrix(f"{blk}.ssm_conv1d.weight", (conv_dim, dims.ssm_conv_kernel), keep_f32=True)
    # Slow decay: the state is multiplied by exp(softplus(alpha + dt_bias) * ssm_a) per token. With
    # dt_bias 0, alpha ≈ N(0, 0.5²) (the small ssm_ba below) and ssm_a in [-0.15, -0.03], a head keeps
    # 86-98% of its state per token instead of forgetting it at once.
    decay_rates = np.linspace(0.03, 0.15, n_v_heads)
    yield _TensorSpec(
        name=f"{blk}.ssm_a",
        shape=(n_v_heads,),
        kind="values",
        keep_f32=True,
        values=tuple(float(-rate) for rate in decay_rates),
    )
    yield _TensorSpec(
        name=f"{blk}.ssm_dt.bias", shape=(n_v_heads,), kind="values", keep_f32=True, values=(0.0,) * n_v_heads
    )
    yield _matrix(f"{blk}.ssm_ba.weight", (2 * n_v_heads, dims.n_embd), scale=0.5)
    yield _norm(f"{blk}.ssm_norm.weight", dims.ssm_state_size)
    yield _matrix(f"{blk}.ssm_out.weight", (dims.n_embd, value_dim))


def _moe_tensors(dims: SynthDims, blk: str) -> Iterator[_TensorSpec]:
    # Router scaled up: logits with a standard deviation of ~8, so the top experts win by clear margins.
    yield _matrix(f"{blk}.ffn_gate_inp.weight", (dims.n_expert, dims.n_embd), scale=8.0, keep_f32=True)
    yield _matrix(f"{blk}.ffn_gate_exps.weight", (dims.n_expert, dims.n_ff_exp, dims.n_embd))
    yield _matrix(f"{blk}.ffn_up_exps.weight", (dims.n_expert, dims.n_ff_exp, dims.n_embd))
    yield _matrix(f"{blk}.ffn_down_exps.weight", (dims.n_expert, dims.n_embd, dims.n_ff_exp))


def _shared_expert_tensors(dims: SynthDims, blk: str) -> Iterator[_TensorSpec]:
    # One sigmoid gate value per token (a 1-row matrix llama.cpp stores as a vector).
    yield _matrix(f"{blk}.ffn_gate_inp_shexp.weight", (dims.n_embd,), keep_f32=True)
    yield _matrix(f"{blk}.ffn_gate_shexp.weight", (dims.n_ff_shexp, dims.n_embd))
    yield _matrix(f"{blk}.ffn_up_shexp.weight", (dims.n_ff_shexp, dims.n_embd))
    yield _matrix(f"{blk}.ffn_down_shexp.weight", (dims.n_embd, dims.n_ff_shexp))


def _tensor_values(spec: _TensorSpec, seed: int) -> npt.NDArray[np.float32]:
    # Each tensor's stream depends only on the seed and its name: adding layers changes no other tensor.
    rng = np.random.default_rng([seed, zlib.crc32((spec.stream or spec.name).encode("utf-8"))])
    if spec.kind == "values":
        return np.asarray(spec.values, dtype=np.float32).reshape(spec.shape)
    noise = rng.standard_normal(spec.shape, dtype=np.float32)
    if spec.kind == "passthrough":
        n = spec.shape[0]
        mixed = np.concatenate(
            [np.eye(n, dtype=np.float32), noise[:, n:] * np.float32(spec.scale / np.sqrt(n))], axis=1
        )
        return mixed.astype(np.float32)
    if spec.kind == "norm":
        return (1.0 + 0.1 * noise).astype(np.float32)
    fan_in = spec.shape[-1]
    return (noise * np.float32(spec.scale / np.sqrt(fan_in))).astype(np.float32)


def _add_tensor(writer: gguf.GGUFWriter, spec: _TensorSpec, seed: int, weight_type: gguf.GGMLQuantizationType) -> None:
    values = _tensor_values(spec, seed)
    if spec.keep_f32 or len(spec.shape) < 2 or weight_type == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(spec.name, values)
    elif weight_type == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(spec.name, values.astype(np.float16))
    else:
        writer.add_tensor(spec.name, gguf.quants.quantize(values, weight_type), raw_dtype=weight_type)
