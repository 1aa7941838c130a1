"""Tiny random Hugging Face checkpoints (transformers + tokenizers) and logits from both implementations.

The checkpoints are what `save_pretrained` writes for the real architectures, with a small byte-level BPE
tokenizer trained here (Qwen2's splitting rule, ChatML specials). Weights are random, adjusted where
tiny random models mislead a comparison (see the facts file):
- MoE routers are scaled up so the chosen experts are never near-ties that rounding could flip, and the
  output head too, so that the top-1 token at every position wins by a clear margin;
- Qwen3-Next's decay (A_log, dt_bias) is slowed so the recurrent state carries across the whole prompt
  instead of being forgotten after a token;
- norm weights get noise so a missing or doubled +1 shift changes the logits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
from bindings.protocol import BatchEntry
from convert.tokenizer import _QWEN2_SPLIT

VOCAB_SIZE = 320
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT = "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?\nYes!"
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we're testing 123 tokenizers!",
    "Hello, world! Isn't it a nice day? Yes, it is.\nNew lines\n\n  and   spaces\tand tabs.",
    "Qwen3-Next mixes Gated DeltaNet layers with gated attention; experts are routed per token.",
]
_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # 256-wide so that K-quants apply to its matrices without fallbacks (the quantize tests reuse it)
    "qwen3next": (
        "Qwen3NextConfig",
        {
            **_COMMON,
            "hidden_size": 256,
            "head_dim": 64,
            "intermediate_size": 512,
            "num_hidden_layers": 4,  # linear, linear, linear, full attention
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 64,
            "linear_value_head_dim": 64,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 256,
            "shared_expert_intermediate_size": 256,
        },
    ),
    "qwen3moe": (
        "Qwen3MoeConfig",
        {
            **_COMMON,
            "hidden_size": 64,
            "head_dim": 16,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
        },
    ),
    "qwen3": (
        "Qwen3Config",
        {
            **_COMMON,
            "hidden_size": 64,
            "head_dim": 16,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "tie_word_embeddings": True,
        },
    ),
    "llama": ("LlamaConfig", {**_COMMON, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}),
}


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 1,  # room for <think> below
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer.add_tokens(["<think>"])  # a non-special added token, like Qwen3's
    return tokenizer


def write_tokenizer(directory: Path, tokenizer: Tokenizer) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def build_model(arch: str, seed: int = 0) -> Any:
    config_class, fields = CONFIGS[arch]
    config = getattr(transformers, config_class)(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("A_log"):
                parameter.fill_(float(np.log(0.05)))  # decay exp(-0.05 * softplus(a - 2)) ≈ 0.99 per token
            elif name.endswith("dt_bias"):
                parameter.fill_(-2.0)
            elif name.endswith("norm.weight"):
                centre = 0.0 if arch == "qwen3next" and "linear_attn" not in name else 1.0
                parameter.normal_(centre, 0.1)
            elif name.endswith("mlp.gate.weight"):
                parameter.mul_(20.0)
            elif name == "lm_head.weight":
                parameter.mul_(10.0)  # spreads the logits: no near-tie for the top-1 comparison
    return model


def write_checkpoint(arch: str, directory: Path, tokenizer: Tokenizer, *, dtype: torch.dtype = torch.float32) -> Any:
    """Save a tiny `arch` checkpoint with the tokenizer into `directory`; return the (f32) model."""
    directory.mkdir(parents=True, exist_ok=True)
    model = build_model(arch)
    model.to(dtype).save_pretrained(directory)
    write_tokenizer(directory, tokenizer)
    return model.to(torch.float32)


def reference_logits(model: Any, token_ids: Sequence[int]) -> npt.NDArray[np.float32]:
    with torch.no_grad():
        logits = model(torch.tensor([list(token_ids)])).logits[0]
    return np.asarray(logits.float().numpy(), dtype=np.float32)


def llama_cpp_logits(gguf_path: Path, token_ids: Sequence[int]) -> npt.NDArray[np.float32]:
    """llama.cpp's logits after each token, one token per decode (so the recurrent state carries them)."""
    config = LlamaBackendConfig(
        n_slots=1, n_ctx_per_slot=256, n_batch=64, n_ubatch=64, type_k="f32", type_v="f32", flash_attn="off"
    )
    backend = LlamaBackend(gguf_path, config)
    try:
        rows = []
        for position, token in enumerate(token_ids):
            backend.decode([BatchEntry(slot=0, tokens=(token,), start_pos=position, logits_last=True)])
            rows.append(backend.logits(0))
        return np.stack(rows)
    finally:
        backend.close()


def relative_error(actual: npt.NDArray[np.float32], expected: npt.NDArray[np.float32]) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def top1_margins(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    ordered = np.sort(logits, axis=-1)
    return ordered[:, -1] - ordered[:, -2]


def greedy_generate(gguf_path: Path, prompt_ids: Sequence[int], n_tokens: int) -> tuple[list[int], Any]:
    """Prefill the prompt in one decode, then generate greedily through llama.cpp's sampler chain.

    Returns the generated tokens and the logits after the prompt."""
    from bindings.protocol import SamplingParams

    backend = LlamaBackend(gguf_path, LlamaBackendConfig(n_slots=1, n_ctx_per_slot=256, n_batch=64, n_ubatch=64))
    params = SamplingParams(temperature=0.0)
    try:
        backend.new_sampler(0, params)
        backend.decode([BatchEntry(slot=0, tokens=tuple(prompt_ids), start_pos=0, logits_last=True)])
        prompt_logits = backend.logits(len(prompt_ids) - 1)
        generated: list[int] = []
        position = len(prompt_ids)
        for _ in range(n_tokens):
            token = backend.sample(0, 0 if generated else len(prompt_ids) - 1, params).token
            generated.append(token)
            backend.decode([BatchEntry(slot=0, tokens=(token,), start_pos=position, logits_last=True)])
            position += 1
        return generated, prompt_logits
    finally:
        backend.close()
