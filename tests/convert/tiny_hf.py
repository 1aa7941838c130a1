"""Tiny random Hugging Face checkpoints (transformers + tokenizers) and logits from both implementations.

The checkpoints are what `save_pretrained` writes for the real architectures, with a small byte-level BPE
tokenizer trained here (Qwen2's splitting rule, ChatML specials). Weights are random, adjusted where
tiny random models mislead a comparison (see the facts file):
- MoE routers are scaled up so the chosen experts are never near-ties that rounding could flip, and the
  output head too, so that the top-1 token at every position wins by a clear margin;
- Qwen3-Next's decay (A_log, dt_bias) is slowed so the recurrent state carries across the whole prompt
  instead of being forgotten after a token;
- norm weights get noise so a missing or doubled +1 shift changes the logits.

transformers' Qwen3-Next ignores the checkpoint's multi-token-prediction head (`mtp.*`), so `write_checkpoint`
adds one itself with `mtp=True`, under the names of the released checkpoint, and `reference_mtp_logits`
computes what the head predicts with transformers' own decoder layer and norm (the inference recipe of
vLLM's qwen3_next_mtp and of llama.cpp: fc(concat(norm_e(embed(token at p)), norm_h(target state at p - 1)))
→ one decoder layer → norm → the shared LM head).
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
from safetensors.torch import save_file
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


def write_checkpoint(
    arch: str, directory: Path, tokenizer: Tokenizer, *, dtype: torch.dtype = torch.float32, mtp: bool = False
) -> Any:
    """Save a tiny `arch` checkpoint with the tokenizer into `directory`; return the (f32) model.

    mtp (qwen3next): add an MTP head in model-mtp.safetensors; `model.mtp_weights` holds it (f32)."""
    directory.mkdir(parents=True, exist_ok=True)
    model = build_model(arch)
    model.to(dtype).save_pretrained(directory)
    write_tokenizer(directory, tokenizer)
    model = model.to(torch.float32)
    if mtp:
        weights = mtp_weights(model)
        save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, str(directory / "model-mtp.safetensors"))
        model.mtp_weights = {k: v.to(dtype).float() for k, v in weights.items()}
    return model


MTP_LAYER_SOURCE = 3  # the tiny qwen3next's full-attention layer: the MTP layer has its structure


def mtp_weights(model: Any, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random MTP head weights named as in Qwen/Qwen3-Next-80B-A3B-*: a full-attention MoE decoder layer
    (`mtp.layers.0.*`, shaped like the trunk's layer 3 but with its own values) and the head's projections."""
    generator = torch.Generator().manual_seed(seed)
    n_embd = int(model.config.hidden_size)
    weights: dict[str, torch.Tensor] = {}
    for name, value in model.model.layers[MTP_LAYER_SOURCE].state_dict().items():
        noise = torch.randn(value.shape, generator=generator)
        spread = value.float().std() if value.numel() > 1 else torch.tensor(0.1)
        weights[f"mtp.layers.0.{name}"] = value.float() + noise * spread  # same scale, different values
    # The released checkpoint stores the MTP layer's experts one by one (newer transformers fuse them).
    gate_up = weights.pop("mtp.layers.0.mlp.experts.gate_up_proj")
    down = weights.pop("mtp.layers.0.mlp.experts.down_proj")
    n_ff = gate_up.shape[1] // 2
    for expert in range(gate_up.shape[0]):
        prefix = f"mtp.layers.0.mlp.experts.{expert}."
        weights[prefix + "gate_proj.weight"] = gate_up[expert, :n_ff].clone()
        weights[prefix + "up_proj.weight"] = gate_up[expert, n_ff:].clone()
        weights[prefix + "down_proj.weight"] = down[expert].clone()
    weights["mtp.fc.weight"] = torch.randn((n_embd, 2 * n_embd), generator=generator) / float(np.sqrt(2 * n_embd))
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        weights[f"mtp.{name}.weight"] = torch.randn(n_embd, generator=generator) * 0.1  # offsets from 1
    return weights


def reference_mtp_logits(model: Any, token_ids: Sequence[int]) -> npt.NDArray[np.float32]:
    """The MTP head's logits at every position p of `token_ids` (a prediction of token p + 2), fed the
    token at p and the target's final-norm state at p - 1 (zeros at p = 0, as llama.cpp starts)."""
    import copy

    from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

    weights = model.mtp_weights
    config = model.config
    ids = torch.tensor([list(token_ids)])
    n = len(token_ids)

    def norm(name: str) -> Any:
        module = qwen3_next.Qwen3NextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        module.weight.data.copy_(weights[f"mtp.{name}.weight"])
        return module

    layer = copy.deepcopy(model.model.layers[MTP_LAYER_SOURCE])
    prefix = "mtp.layers.0."
    state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix) and ".experts." not in k}
    n_expert = int(config.num_experts)
    experts = [f"{prefix}mlp.experts.{i}." for i in range(n_expert)]
    state["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([weights[e + "gate_proj.weight"], weights[e + "up_proj.weight"]]) for e in experts]
    )
    state["mlp.experts.down_proj"] = torch.stack([weights[e + "down_proj.weight"] for e in experts])
    layer.load_state_dict(state)
    with torch.no_grad():
        states = model.model(ids).last_hidden_state[0]  # after the final norm
        before = torch.cat([torch.zeros_like(states[:1]), states[:-1]])
        embedded = model.model.embed_tokens(ids)[0]
        joined = torch.cat([norm("pre_fc_norm_embedding")(embedded), norm("pre_fc_norm_hidden")(before)], dim=-1)
        hidden = (joined @ weights["mtp.fc.weight"].T)[None]
        positions = torch.arange(n)[None]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        hidden = layer(
            hidden,
            position_embeddings=model.model.rotary_emb(hidden, positions),
            attention_mask=causal,
            position_ids=positions,
        )
        logits = model.lm_head(norm("norm")(hidden))[0]
    return np.asarray(logits.float().numpy(), dtype=np.float32)


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
