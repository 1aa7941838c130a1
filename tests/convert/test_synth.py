"""The tiny random-weight GGUF generator (convert/synth.py): files, metadata and tensors as llama.cpp expects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
from bindings.probe import decode_steps
from bindings.protocol import BatchEntry, CacheOp
from convert.synth import (
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    SUPPORTED_ARCHS,
    SUPPORTED_DTYPES,
    synthetic_dims,
    write_synthetic_model,
)

F32 = gguf.GGMLQuantizationType.F32


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def _tensors(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {tensor.name: tensor for tensor in reader.tensors}


def _ne(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """ggml's ne (innermost dimension first), as llama.cpp's create_tensor checks it."""
    return tuple(int(n) for n in tensor.shape)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_same_arguments_write_identical_bytes(tmp_path: Path, arch: str) -> None:
    first = write_synthetic_model(arch, tmp_path / "a.gguf", dtype="q4_0", seed=7)
    second = write_synthetic_model(arch, tmp_path / "b.gguf", dtype="q4_0", seed=7)
    other_seed = write_synthetic_model(arch, tmp_path / "c.gguf", dtype="q4_0", seed=8)

    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other_seed.read_bytes()
    assert first.stat().st_size < 4 * 1024 * 1024


def test_write_leaves_only_the_final_file(tmp_path: Path) -> None:
    out = write_synthetic_model("qwen3moe", tmp_path / "nested" / "model.gguf")

    assert out == tmp_path / "nested" / "model.gguf"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous contents")

    def fail_midway(self: gguf.GGUFWriter, *args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_model("llama", out)

    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "gpt2"}, "unknown architecture 'gpt2'"),
        ({"arch": "llama", "dtype": "q4_k"}, "unknown dtype 'q4_k'"),
        ({"arch": "qwen3next", "n_layers": 3}, "qwen3next needs n_layers >= 4"),
        ({"arch": "llama", "n_layers": 0}, "n_layers must be at least 1"),
        ({"arch": "qwen3", "legacy_ssm_in": True}, "qwen3next only"),
        ({"arch": "qwen3moe", "mtp": True}, "MTP head is written for qwen3next only"),
    ],
)
def test_bad_arguments_are_refused_before_writing(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    arch = kwargs.pop("arch")
    with pytest.raises(ValueError, match=message):
        write_synthetic_model(arch, tmp_path / "model.gguf", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_qwen3next_is_the_real_hybrid(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_synthetic_model("qwen3next", tmp_path / "m.gguf"))
    tensors = _tensors(reader)
    dims = synthetic_dims("qwen3next")

    assert _field(reader, "general.architecture") == "qwen3next"
    assert _field(reader, "qwen3next.block_count") == 4
    assert _field(reader, "qwen3next.full_attention_interval") == 4
    assert dims.recurrent_layers == (0, 1, 2)
    assert dims.attention_layers == (3,)
    assert _field(reader, "qwen3next.ssm.conv_kernel") == 4
    assert _field(reader, "qwen3next.ssm.state_size") == 32
    assert _field(reader, "qwen3next.ssm.group_count") == 2
    assert _field(reader, "qwen3next.ssm.time_step_rank") == 4
    assert _field(reader, "qwen3next.ssm.inner_size") == 128
    assert _field(reader, "qwen3next.attention.key_length") == 32
    assert _field(reader, "qwen3next.rope.dimension_count") == 8

    n_embd = 64
    for layer in (0, 1, 2):  # Gated DeltaNet: conv_dim = 2 * key_dim (2 heads x 32) + value_dim (4 x 32)
        blk = f"blk.{layer}"
        assert _ne(tensors[f"{blk}.attn_qkv.weight"]) == (n_embd, 256)
        assert _ne(tensors[f"{blk}.attn_gate.weight"]) == (n_embd, 128)
        assert _ne(tensors[f"{blk}.ssm_conv1d.weight"]) == (4, 256)
        assert _ne(tensors[f"{blk}.ssm_ba.weight"]) == (n_embd, 8)
        assert _ne(tensors[f"{blk}.ssm_norm.weight"]) == (32,)
        assert _ne(tensors[f"{blk}.ssm_out.weight"]) == (128, n_embd)
        assert f"{blk}.attn_q.weight" not in tensors
    # full gated attention: attn_q carries query and gate (2 x 4 heads x 32)
    assert _ne(tensors["blk.3.attn_q.weight"]) == (n_embd, 256)
    assert _ne(tensors["blk.3.attn_k.weight"]) == (n_embd, 64)
    assert _ne(tensors["blk.3.attn_output.weight"]) == (128, n_embd)
    assert "blk.3.ssm_a" not in tensors
    for layer in range(4):  # every layer: routed experts stacked, plus a gated shared expert
        blk = f"blk.{layer}"
        assert _ne(tensors[f"{blk}.ffn_gate_inp.weight"]) == (n_embd, 8)
        assert _ne(tensors[f"{blk}.ffn_gate_exps.weight"]) == (n_embd, 32, 8)
        assert _ne(tensors[f"{blk}.ffn_up_exps.weight"]) == (n_embd, 32, 8)
        assert _ne(tensors[f"{blk}.ffn_down_exps.weight"]) == (32, n_embd, 8)
        assert _ne(tensors[f"{blk}.ffn_gate_inp_shexp.weight"]) == (n_embd,)
        assert _ne(tensors[f"{blk}.ffn_down_shexp.weight"]) == (64, n_embd)
        assert f"{blk}.post_attention_norm.weight" in tensors


def test_qwen3next_decay_keeps_the_recurrent_state(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_synthetic_model("qwen3next", tmp_path / "m.gguf"))
    tensors = _tensors(reader)
    ssm_a = np.asarray(tensors["blk.0.ssm_a"].data)
    dt_bias = np.asarray(tensors["blk.0.ssm_dt.bias"].data)

    # Per-token retention exp(softplus(dt_bias) * ssm_a) at a neutral input: slow, not near zero.
    retention = np.exp(np.log1p(np.exp(dt_bias)) * ssm_a)
    assert retention.min() > 0.85
    assert retention.max() < 1.0


def test_qwen3next_legacy_layout_fuses_the_input_projection(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_synthetic_model("qwen3next", tmp_path / "m.gguf", legacy_ssm_in=True))
    tensors = _tensors(reader)

    assert _ne(tensors["blk.0.ssm_in.weight"]) == (64, 2 * 64 + 2 * 128)
    assert "blk.0.attn_qkv.weight" not in tensors
    assert "blk.0.attn_gate.weight" not in tensors


def test_routers_separate_the_experts(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_synthetic_model("qwen3moe", tmp_path / "m.gguf"))
    router = np.asarray(_tensors(reader)["blk.0.ffn_gate_inp.weight"].data)  # (n_expert, n_embd)
    hidden = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)  # RMS-normed scale

    logits = np.sort(hidden @ router.T, axis=1)
    top_k_margin = logits[:, -2] - logits[:, -3]  # what decides whether the 2nd expert is chosen
    assert np.median(top_k_margin) > 1.0


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen3", "llama"])
def test_attention_architectures(tmp_path: Path, arch: str) -> None:
    reader = gguf.GGUFReader(write_synthetic_model(arch, tmp_path / "m.gguf"))
    tensors = _tensors(reader)
    dims = synthetic_dims(arch)

    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.block_count") == dims.n_layers == 2
    assert _field(reader, f"{arch}.attention.head_count") == 4
    assert _field(reader, f"{arch}.attention.head_count_kv") == 2
    assert _field(reader, f"{arch}.context_length") == 4096
    n_q = dims.n_head * dims.head_dim
    assert _ne(tensors["blk.1.attn_q.weight"]) == (64, n_q)
    assert _ne(tensors["blk.1.attn_output.weight"]) == (n_q, 64)
    assert not any(name.startswith("blk.1.ssm") for name in tensors)
    if arch == "qwen3moe":
        assert _field(reader, "qwen3moe.expert_count") == 8
        assert _field(reader, "qwen3moe.expert_used_count") == 2
        assert _ne(tensors["blk.1.ffn_gate_exps.weight"]) == (64, 32, 8)
        assert _ne(tensors["blk.1.ffn_down_exps.weight"]) == (32, 64, 8)
        assert "blk.1.ffn_up.weight" not in tensors
    else:
        assert f"{arch}.expert_count" not in reader.fields
        assert _ne(tensors["blk.1.ffn_up.weight"]) == (64, 128)
        assert _ne(tensors["blk.1.ffn_down.weight"]) == (128, 64)
    assert ("blk.1.attn_q_norm.weight" in tensors) == (arch != "llama")


def test_qwen3next_mtp_head_is_laid_out_as_llama_cpp_loads_it(tmp_path: Path) -> None:
    path = write_synthetic_model("qwen3next", tmp_path / "mtp.gguf", mtp=True)
    assert write_synthetic_model("qwen3next", tmp_path / "again.gguf", mtp=True).read_bytes() == path.read_bytes()
    reader = gguf.GGUFReader(path)
    tensors = _tensors(reader)
    plain = _tensors(gguf.GGUFReader(write_synthetic_model("qwen3next", tmp_path / "plain.gguf")))

    assert _field(reader, "qwen3next.block_count") == 5
    assert _field(reader, "qwen3next.nextn_predict_layers") == 1
    added = {name for name in tensors if name not in plain}
    nextn = {f"blk.4.nextn.{n}.weight" for n in ("eh_proj", "enorm", "hnorm", "shared_head_norm")}
    # The MTP block is the trunk's full-attention block (layer 3) under the next index, plus the projections.
    assert added == {name.replace("blk.3.", "blk.4.") for name in plain if name.startswith("blk.3.")} | nextn
    assert _ne(tensors["blk.4.nextn.eh_proj.weight"]) == (128, 64)  # {2 * n_embd, n_embd}
    assert _ne(tensors["blk.4.attn_q.weight"]) == _ne(tensors["blk.3.attn_q.weight"])
    eh_proj = np.asarray(tensors["blk.4.nextn.eh_proj.weight"].data).reshape(64, 128)
    np.testing.assert_array_equal(eh_proj[:, :64], np.eye(64))  # the token's embedding passes through
    assert 0 < np.abs(eh_proj[:, 64:]).max() < 0.3  # the target's state counts, a little
    np.testing.assert_array_equal(
        tensors["blk.4.nextn.shared_head_norm.weight"].data, tensors["output_norm.weight"].data
    )
    # The trunk's residual writers are damped (a nearly bigram model the head can predict), the rest is as is.
    damped = np.abs(tensors["blk.0.ssm_out.weight"].data).mean() / np.abs(plain["blk.0.ssm_out.weight"].data).mean()
    assert damped == pytest.approx(0.15, rel=1e-3)
    np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"].data, plain["blk.0.attn_qkv.weight"].data)


def test_n_layers_adds_layers_without_changing_the_others(tmp_path: Path) -> None:
    reader_4 = gguf.GGUFReader(write_synthetic_model("qwen3next", tmp_path / "4.gguf"))
    reader_8 = gguf.GGUFReader(write_synthetic_model("qwen3next", tmp_path / "8.gguf", n_layers=8))
    tensors_4, tensors_8 = _tensors(reader_4), _tensors(reader_8)

    assert _field(reader_8, "qwen3next.block_count") == 8
    assert synthetic_dims("qwen3next", 8).attention_layers == (3, 7)
    assert "blk.7.attn_q.weight" in tensors_8
    assert "blk.6.attn_qkv.weight" in tensors_8
    assert np.array_equal(tensors_4["blk.2.ffn_up_exps.weight"].data, tensors_8["blk.2.ffn_up_exps.weight"].data)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_dtype_applies_to_weight_matrices_only(tmp_path: Path, dtype: str) -> None:
    reader = gguf.GGUFReader(write_synthetic_model("qwen3next", tmp_path / "m.gguf", dtype=dtype))
    tensors = _tensors(reader)
    weight_type = gguf.GGMLQuantizationType[dtype.upper()]
    kept_f32 = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")

    for name, tensor in tensors.items():
        if name.endswith(kept_f32) or len(tensor.shape) == 1:
            assert tensor.tensor_type == F32, name
        else:
            assert tensor.tensor_type == weight_type, name
    assert tensors["blk.0.ffn_down_exps.weight"].tensor_type == weight_type
    assert tensors["token_embd.weight"].tensor_type == weight_type


def test_tokenizer_is_byte_level_bpe_with_chatml(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_synthetic_model("llama", tmp_path / "m.gguf"))
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    merges: list[str] = _field(reader, "tokenizer.ggml.merges")

    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert 256 + len(SPECIAL_TOKENS) < len(tokens) <= 1024
    assert len(set(tokens)) == len(tokens)
    assert tokens[-3:] == list(SPECIAL_TOKENS)
    assert token_types[-3:] == [gguf.TokenType.CONTROL] * 3
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokens.index("<|im_end|>")
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template") == CHATML_TEMPLATE
    assert _field(reader, "llama.vocab_size") == len(tokens)
    assert _ne(_tensors(reader)["token_embd.weight"]) == (64, len(tokens))
    # every merge joins two known tokens into a known token, and common English merges are there
    vocabulary = set(tokens)
    for merge in merges:
        left, right = merge.split(" ")
        assert {left, right, left + right} <= vocabulary, merge
    assert {"Ġthe", "Ġand", "ing"} <= vocabulary


def test_chat_template_renders_chatml_with_generation_prompt() -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment().from_string(CHATML_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

    assert template.render(messages=messages, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.render(messages=messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


# --- the models run in llama.cpp (through the engine's backend) ---------------------------------------

PROMPTS = (
    "Hello, world! How are you today?",
    "The king had three daughters and a golden ball.",
    "Ünïcödé café — 日本語のテキスト 🙂 and more",
)
N_STEPS = 4  # one-token decode steps after the prefill


def _open(model_path: Path) -> LlamaBackend:
    config = LlamaBackendConfig(n_slots=4, n_ctx_per_slot=256, n_batch=256, n_ubatch=256, n_threads=2)
    return LlamaBackend(model_path, config)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _batched_and_alone(model_path: Path) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Three prompts decoded together in slots 0-2, then each alone in slot 3, fed the same tokens."""
    backend = _open(model_path)
    try:
        prompts = [backend.tokenize(text, add_special=True, parse_special=False) for text in PROMPTS]
        batched, fed = decode_steps(backend, prompts, slots=(0, 1, 2), continuations=None, n_steps=N_STEPS)
        alone = []
        for index, prompt in enumerate(prompts):
            backend.apply([CacheOp("clear", slot=slot) for slot in range(4)])
            logits, _ = decode_steps(backend, [prompt], slots=(3,), continuations=[fed[index]], n_steps=N_STEPS)
            alone.append(logits[0])
    finally:
        backend.close()
    return batched, alone


@pytest.fixture(scope="module")
def q8_0_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("synth-q8_0")
    return {arch: write_synthetic_model(arch, directory / f"{arch}.gguf", dtype="q8_0") for arch in SUPPORTED_ARCHS}


@pytest.mark.slow
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_q8_0_batched_decode_equals_each_sequence_alone(q8_0_models: dict[str, Path], arch: str) -> None:
    batched, alone = _batched_and_alone(q8_0_models[arch])

    for batched_steps, alone_steps in zip(batched, alone, strict=True):
        assert len(batched_steps) == N_STEPS + 1
        for batched_logits, alone_logits in zip(batched_steps, alone_steps, strict=True):
            assert np.isfinite(batched_logits).all()
            assert batched_logits.std() > 0.5  # a real distribution, not a flat one
            assert np.array_equal(batched_logits, alone_logits)
    # the three prompts lead to different next-token distributions
    assert not np.allclose(batched[0][0], batched[1][0])


@pytest.mark.slow
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_f32_batched_decode_matches_each_sequence_alone(tmp_path: Path, arch: str) -> None:
    # f32/f16 matmuls and attention on the CPU can round differently with a different number of rows in a
    # batch (up to ~1e-4 relative measured here); the quantized activations of q8_0 hide that, f32 does not.
    batched, alone = _batched_and_alone(write_synthetic_model(arch, tmp_path / "m.gguf"))

    for batched_steps, alone_steps in zip(batched, alone, strict=True):
        for batched_logits, alone_logits in zip(batched_steps, alone_steps, strict=True):
            assert np.isfinite(batched_logits).all()
            assert _relative_error(batched_logits, alone_logits) < 1e-3
            assert int(np.argmax(batched_logits)) == int(np.argmax(alone_logits))


@pytest.mark.slow
def test_qwen3next_restored_state_continues_like_a_full_decode(tiny_qwen3next_gguf: Path) -> None:
    backend = _open(tiny_qwen3next_gguf)
    try:
        assert backend.info.architecture == "qwen3next"
        assert backend.info.supports_partial_removal is False  # llama.cpp sees the hybrid memory
        tokens = backend.tokenize(PROMPTS[1] + " " + PROMPTS[0], add_special=True, parse_special=False)
        n_prefix = len(tokens) // 2
        prefix, suffix = tuple(tokens[:n_prefix]), tuple(tokens[n_prefix:])

        backend.decode([BatchEntry(1, tuple(tokens), 0, True)])
        full = backend.logits(len(tokens) - 1)

        backend.decode([BatchEntry(0, prefix, 0, False)])
        backend.apply([CacheOp("save", slot=0)])
        backend.decode([BatchEntry(0, (5, 6, 7), n_prefix, False)])  # move the state on past the snapshot
        backend.apply([CacheOp("restore", slot=0)])
        backend.decode([BatchEntry(0, suffix, n_prefix, True)])
        restored = backend.logits(len(suffix) - 1)

        backend.apply([CacheOp("clear", slot=2)])
        backend.decode([BatchEntry(2, suffix, n_prefix, True)])
        without_prefix = backend.logits(len(suffix) - 1)
    finally:
        backend.close()

    assert _relative_error(restored, full) < 1e-5
    assert int(np.argmax(restored)) == int(np.argmax(full))
    # the prefix's state really matters to the suffix's logits (the decay is slow)
    assert _relative_error(without_prefix, full) > 0.1


@pytest.mark.slow
def test_llama_cpp_reads_the_tokenizer(tiny_qwen3moe_gguf: Path) -> None:
    texts = [
        *PROMPTS,
        "tabs\tand\nnewlines\r\n  spaces  ",
        "Straße naïve Ελληνικά русский 中文 한국어 🚀🧪",
        "\x00\x7f",
    ]
    backend = _open(tiny_qwen3moe_gguf)
    try:
        for text in texts:
            tokens = backend.tokenize(text, add_special=True, parse_special=False)
            assert b"".join(backend.piece(token) for token in tokens) == text.encode("utf-8"), text
        english = backend.tokenize(PROMPTS[1], add_special=True, parse_special=False)
        chat = backend.tokenize("<|im_start|>user\nHi<|im_end|>\n", add_special=True, parse_special=True)
        info = backend.info
        end_token = chat[-2]
        assert len(english) < len(PROMPTS[1]) * 0.6  # the merges compress English text
        assert backend.token_text(chat[0]) == "<|im_start|>"
        assert backend.token_text(end_token) == "<|im_end|>"
        assert info.eos_token == end_token
        assert backend.is_eog(end_token)
        assert backend.piece(end_token) == b""  # control tokens render as nothing
        assert info.add_bos is False
        assert info.chat_template == CHATML_TEMPLATE
        assert info.n_vocab <= 1024
        assert info.n_ctx_train == 4096
    finally:
        backend.close()


@pytest.fixture(scope="module")
def qwen3moe_backend(tiny_qwen3moe_gguf: Path) -> Iterator[LlamaBackend]:
    backend = _open(tiny_qwen3moe_gguf)
    yield backend
    backend.close()


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80))
def test_any_unicode_text_round_trips_through_llama_cpp(qwen3moe_backend: LlamaBackend, text: str) -> None:
    tokens = qwen3moe_backend.tokenize(text, add_special=True, parse_special=False)

    assert b"".join(qwen3moe_backend.piece(token) for token in tokens) == text.encode("utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_greedy_continuations_depend_on_the_prompt(tmp_path: Path, arch: str) -> None:
    backend = _open(write_synthetic_model(arch, tmp_path / "m.gguf"))
    try:
        prompts = [backend.tokenize(text, add_special=True, parse_special=False) for text in PROMPTS]
        _, continuations = decode_steps(backend, prompts, slots=(0, 1, 2), continuations=None, n_steps=N_STEPS)
    finally:
        backend.close()

    assert len({tuple(tokens) for tokens in continuations}) == 3
    assert all(len(set(tokens)) > 1 for tokens in continuations)
