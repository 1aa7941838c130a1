"""`python -m convert gguf`: tiny transformers checkpoints converted and checked against transformers itself.

The acceptance check: llama.cpp's logits on the GGUF (f32 weights, f32 KV cache, flash attention off)
against transformers' logits on the checkpoint, token by token. Tolerance: relative error
‖llama − transformers‖ / ‖transformers‖ below 1e-5 (measured 1.7e-6 for qwen3next, 2.4e-7 to 3e-7 for
the others), and the same top-1 token at every position. A real mapping bug (a missing norm shift, a
wrong q/k/v/z split, a swapped expert projection) gives errors of order 1; f16 weights alone give ~5e-4
(2e-3 for qwen3next).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
import pytest
from hf_case import HfCase
from safetensors.numpy import load_file, save_file
from tiny_hf import (
    CHAT_TEMPLATE,
    PROMPT,
    llama_cpp_logits,
    reference_logits,
    relative_error,
    top1_margins,
    write_checkpoint,
)

from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
from convert.hf_to_gguf import ConversionError, convert_checkpoint
from convert.tokenizer import PRE_TOKENIZERS, TokenizerError, describe_pre_tokenizer, llama_cpp_pre_name

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _values(tensor: gguf.ReaderTensor) -> npt.NDArray[np.float32]:
    """A tensor's values in numpy (row-major, outermost first) order, as f32."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    data = tensor.data
    if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
        return (np.asarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.asarray(data, dtype=np.float32).reshape(shape)


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    value = reader.fields[key]
    return value.contents()


def _hf(case: HfCase) -> dict[str, npt.NDArray[np.float32]]:
    return {k: v.astype(np.float32) for k, v in load_file(case.hf_dir / "model.safetensors").items()}


# ---------------------------------------------------------------- the acceptance check


@pytest.mark.parametrize("arch", ["qwen3next", "qwen3moe", "qwen3", "llama"])
def test_llama_cpp_logits_match_transformers(arch: str, hf_case: Callable[[str], HfCase], hf_tokenizer: Any) -> None:
    case = hf_case(arch)
    token_ids = hf_tokenizer.encode(PROMPT).ids
    expected = reference_logits(case.model, token_ids)
    # The top-1 comparison means something only if no position is a near-tie.
    assert top1_margins(expected).min() > 1e-3

    actual = llama_cpp_logits(case.gguf_f32, token_ids)

    assert actual.shape == expected.shape == (len(token_ids), 320)
    np.testing.assert_array_equal(actual.argmax(axis=-1), expected.argmax(axis=-1))
    assert relative_error(actual, expected) < TOLERANCE


# ---------------------------------------------------------------- tokenizer and metadata


def test_tokenizer_and_chat_template_survive_the_conversion(
    hf_case: Callable[[str], HfCase], hf_tokenizer: Any
) -> None:
    case = hf_case("qwen3next")
    reader = gguf.GGUFReader(case.gguf_f32)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert _field(reader, "tokenizer.ggml.padding_token_id") == 0
    types = _field(reader, "tokenizer.ggml.token_type")
    think = hf_tokenizer.token_to_id("<think>")
    assert [types[i] for i in (0, 1, 2, think)] == [3, 3, 3, 4]  # control x3, user-defined
    assert case.summary.tokenizer_pre == "qwen2"

    texts = [PROMPT, "  leading spaces and 42 numbers\n\n\ttabs", "naïve café — ünïcödé ✓", "<think>hmm</think>"]
    backend = LlamaBackend(case.gguf_f32, LlamaBackendConfig(n_slots=1, n_ctx_per_slot=256))
    try:
        for text in texts:
            assert backend.tokenize(text, add_special=True, parse_special=True) == hf_tokenizer.encode(text).ids
        chat = "<|im_start|>user\nHi<|im_end|>\n"
        assert backend.tokenize(chat, add_special=False, parse_special=True) == hf_tokenizer.encode(chat).ids
        assert b"".join(backend.piece(t) for t in hf_tokenizer.encode(texts[2]).ids) == texts[2].encode()
    finally:
        backend.close()


def test_qwen3next_tensors_follow_llama_cpp_layout(hf_case: Callable[[str], HfCase]) -> None:
    case = hf_case("qwen3next")
    hf = _hf(case)
    out = _tensors(case.gguf_f32)
    reader = gguf.GGUFReader(case.gguf_f32)
    assert _field(reader, "general.architecture") == "qwen3next"
    assert _field(reader, "qwen3next.full_attention_interval") == 4
    assert _field(reader, "qwen3next.rope.dimension_count") == 16  # head_dim 64 x partial_rotary_factor 0.25
    assert [_field(reader, f"qwen3next.ssm.{k}") for k in ("conv_kernel", "state_size", "group_count")] == [4, 64, 2]
    assert [_field(reader, f"qwen3next.ssm.{k}") for k in ("time_step_rank", "inner_size")] == [4, 256]
    assert _field(reader, "qwen3next.expert_shared_feed_forward_length") == 256

    prefix = "model.layers.0."
    np.testing.assert_array_equal(_values(out["blk.0.ssm_a"]), -np.exp(hf[prefix + "linear_attn.A_log"]))
    np.testing.assert_array_equal(_values(out["blk.0.ssm_dt.bias"]), hf[prefix + "linear_attn.dt_bias"])
    np.testing.assert_array_equal(_values(out["blk.0.attn_norm.weight"]), hf[prefix + "input_layernorm.weight"] + 1)
    np.testing.assert_array_equal(
        _values(out["blk.3.attn_q_norm.weight"]), hf["model.layers.3.self_attn.q_norm.weight"] + 1
    )
    np.testing.assert_array_equal(_values(out["blk.0.ssm_norm.weight"]), hf[prefix + "linear_attn.norm.weight"])
    np.testing.assert_array_equal(
        _values(out["blk.0.ssm_conv1d.weight"]), hf[prefix + "linear_attn.conv1d.weight"][:, 0]
    )
    assert _values(out["blk.0.ffn_gate_inp_shexp.weight"]).shape == (256,)

    # in_proj_qkvz: per key-head group [q 64 | k 64 | v 128 | z 128] -> attn_qkv [all q | all k | all v], attn_gate
    qkvz = hf[prefix + "linear_attn.in_proj_qkvz.weight"].reshape(2, 384, 256)
    q, k, v, z = qkvz[:, :64], qkvz[:, 64:128], qkvz[:, 128:256], qkvz[:, 256:]
    expected_qkv = np.concatenate([q.reshape(-1, 256), k.reshape(-1, 256), v.reshape(-1, 256)])
    np.testing.assert_array_equal(_values(out["blk.0.attn_qkv.weight"]), expected_qkv)
    np.testing.assert_array_equal(_values(out["blk.0.attn_gate.weight"]), z.reshape(-1, 256))

    stacked = _values(out["blk.2.ffn_down_exps.weight"])
    assert stacked.shape == (8, 256, 256)
    np.testing.assert_array_equal(stacked[5], hf["model.layers.2.mlp.experts.5.down_proj.weight"])
    assert "blk.3.attn_qkv.weight" not in out and "blk.3.attn_q.weight" in out  # layer 3 is full attention
    assert case.summary.skipped == ()


def test_bf16_checkpoint_to_bf16_gguf_keeps_vectors_router_and_conv_in_f32(tmp_path: Path, hf_tokenizer: Any) -> None:
    import torch

    model = write_checkpoint("qwen3next", tmp_path / "bf16", hf_tokenizer, dtype=torch.bfloat16)
    summary = convert_checkpoint(tmp_path / "bf16", tmp_path / "out.gguf", out_type="bf16")
    out = _tensors(tmp_path / "out.gguf")

    f32, bf16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16
    assert out["blk.0.attn_qkv.weight"].tensor_type == bf16
    assert out["blk.1.ffn_up_exps.weight"].tensor_type == bf16
    assert out["token_embd.weight"].tensor_type == bf16
    for name in ("blk.0.ffn_gate_inp.weight", "blk.0.ssm_conv1d.weight", "blk.0.ssm_a", "blk.0.attn_norm.weight"):
        assert out[name].tensor_type == f32, name
    assert summary.n_tensors == len(out)
    # bf16 -> f32 -> bf16 is exact: the GGUF holds the checkpoint's very values
    embedding = _values(out["token_embd.weight"])
    source = model.model.embed_tokens.weight.detach().numpy()  # the bf16 values, widened back to f32
    assert embedding.shape == source.shape
    np.testing.assert_array_equal(embedding, source)


def test_fused_expert_tensors_convert_like_per_expert_ones(hf_case: Callable[[str], HfCase], tmp_path: Path) -> None:
    case = hf_case("qwen3moe")
    fused_dir = tmp_path / "fused"
    shutil.copytree(case.hf_dir, fused_dir)
    tensors = load_file(case.hf_dir / "model.safetensors")
    for layer in range(2):
        experts = [f"model.layers.{layer}.mlp.experts.{e}" for e in range(8)]
        gate = np.stack([tensors.pop(f"{e}.gate_proj.weight") for e in experts])
        up = np.stack([tensors.pop(f"{e}.up_proj.weight") for e in experts])
        down = np.stack([tensors.pop(f"{e}.down_proj.weight") for e in experts])
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = down
    save_file(tensors, fused_dir / "model.safetensors")

    convert_checkpoint(fused_dir, tmp_path / "fused.gguf", out_type="f32")

    per_expert, fused = _tensors(case.gguf_f32), _tensors(tmp_path / "fused.gguf")
    assert sorted(per_expert) == sorted(fused)
    for name in ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
        np.testing.assert_array_equal(_values(fused[name]), _values(per_expert[name]))


# ---------------------------------------------------------------- the multi-token-prediction head

# What llama.cpp's qwen3next loader reads for the MTP block (src/models/qwen3next.cpp, load_block_mtp): the
# trunk's full-attention block names plus the nextn projections, in block num_hidden_layers.
MTP_BLOCK_TENSORS = sorted(
    [
        *(f"blk.4.{name}.weight" for name in ("attn_norm", "post_attention_norm", "attn_q", "attn_k", "attn_v")),
        *(f"blk.4.{name}.weight" for name in ("attn_output", "attn_q_norm", "attn_k_norm", "ffn_gate_inp")),
        *(f"blk.4.ffn_{name}_exps.weight" for name in ("gate", "up", "down")),
        *(f"blk.4.ffn_{name}_shexp.weight" for name in ("gate", "up", "down", "gate_inp")),
        *(f"blk.4.nextn.{name}.weight" for name in ("eh_proj", "enorm", "hnorm", "shared_head_norm")),
    ]
)


def test_qwen3next_mtp_head_is_written_the_way_llama_cpp_loads_it(hf_case: Callable[..., HfCase]) -> None:
    case, plain = hf_case("qwen3next", mtp=True), hf_case("qwen3next")
    mtp = {k: v.numpy() for k, v in case.model.mtp_weights.items()}
    out = _tensors(case.gguf_f32)
    reader = gguf.GGUFReader(case.gguf_f32)
    assert case.summary.n_mtp_layers == 1 and case.summary.skipped == ()
    assert _field(reader, "qwen3next.block_count") == 5  # 4 trunk layers + the MTP block
    assert _field(reader, "qwen3next.nextn_predict_layers") == 1
    assert sorted(set(out) - set(_tensors(plain.gguf_f32))) == MTP_BLOCK_TENSORS

    assert tuple(int(n) for n in out["blk.4.nextn.eh_proj.weight"].shape) == (512, 256)  # ggml {2 n_embd, n_embd}
    np.testing.assert_array_equal(_values(out["blk.4.nextn.eh_proj.weight"]), mtp["mtp.fc.weight"])
    for hf_name, gguf_name in [
        ("pre_fc_norm_embedding", "enorm"),
        ("pre_fc_norm_hidden", "hnorm"),
        ("norm", "shared_head_norm"),
    ]:
        np.testing.assert_array_equal(_values(out[f"blk.4.nextn.{gguf_name}.weight"]), mtp[f"mtp.{hf_name}.weight"] + 1)
    layer = "mtp.layers.0."
    np.testing.assert_array_equal(_values(out["blk.4.attn_norm.weight"]), mtp[layer + "input_layernorm.weight"] + 1)
    np.testing.assert_array_equal(_values(out["blk.4.attn_q.weight"]), mtp[layer + "self_attn.q_proj.weight"])
    np.testing.assert_array_equal(
        _values(out["blk.4.ffn_gate_inp_shexp.weight"]), mtp[layer + "mlp.shared_expert_gate.weight"].ravel()
    )
    np.testing.assert_array_equal(
        _values(out["blk.4.ffn_down_exps.weight"])[5], mtp[layer + "mlp.experts.5.down_proj.weight"]
    )


def test_llama_cpp_mtp_logits_match_the_transformers_reference(
    hf_case: Callable[..., HfCase], hf_tokenizer: Any
) -> None:
    """The converted head, run by llama.cpp's MTP context, predicts what the same weights predict when run
    with transformers' modules (tiny_hf.reference_mtp_logits): the conversion keeps the head's meaning."""
    from tiny_hf import reference_mtp_logits

    from bindings.mtp import MtpDrafter, SimpleTarget, free_model, load_model
    from bindings.protocol import BatchEntry

    case = hf_case("qwen3next", mtp=True)
    token_ids = hf_tokenizer.encode(PROMPT).ids
    expected = reference_mtp_logits(case.model, token_ids)
    assert top1_margins(expected).min() > 1e-3

    model = load_model(case.gguf_f32, load_mtp=True)
    target = SimpleTarget(model)
    drafter = MtpDrafter(model, target.ctx, mtp_loaded=True, exact=True)
    try:
        target.decode(token_ids, 0)
        actual = drafter.observe_with_logits([BatchEntry(0, tuple(token_ids), 0, True)])
    finally:
        drafter.close()
        target.close()
        free_model(model)

    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < TOLERANCE
    assert (actual.argmax(-1) == expected.argmax(-1)).all()


def test_no_mtp_leaves_the_head_out(hf_case: Callable[..., HfCase], tmp_path: Path) -> None:
    case, plain = hf_case("qwen3next", mtp=True), hf_case("qwen3next")
    summary = convert_checkpoint(case.hf_dir, tmp_path / "out.gguf", out_type="f32", mtp=False)

    assert summary.n_mtp_layers == 0
    assert summary.skipped == tuple(sorted(case.model.mtp_weights))
    assert sorted(_tensors(tmp_path / "out.gguf")) == sorted(_tensors(plain.gguf_f32))
    reader = gguf.GGUFReader(tmp_path / "out.gguf")
    assert _field(reader, "qwen3next.block_count") == 4
    assert "qwen3next.nextn_predict_layers" not in reader.fields


def test_an_incomplete_mtp_head_is_refused_unless_left_out(hf_case: Callable[..., HfCase], tmp_path: Path) -> None:
    case = hf_case("qwen3next")
    with_mtp = tmp_path / "with-mtp"
    shutil.copytree(case.hf_dir, with_mtp)
    save_file({"mtp.fc.weight": np.zeros((256, 512), np.float32)}, with_mtp / "model-mtp.safetensors")

    with pytest.raises(ConversionError, match=r"MTP head is incomplete .*--no-mtp"):
        convert_checkpoint(with_mtp, tmp_path / "out.gguf", out_type="f32")
    _assert_nothing_written(tmp_path / "out.gguf")

    summary = convert_checkpoint(with_mtp, tmp_path / "out.gguf", out_type="f32", mtp=False)
    assert summary.skipped == ("mtp.fc.weight",)
    assert summary.n_tensors == case.summary.n_tensors


# ---------------------------------------------------------------- pre-tokenizer rules


def test_pre_tokenizer_is_chosen_from_the_splitting_rule() -> None:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert llama_cpp_pre_name(byte_level) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert llama_cpp_pre_name(smollm) == "smollm"
    llama3_regex = next(step for steps, name in PRE_TOKENIZERS.items() if name == "llama-bpe" for step in steps)
    llama3 = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": llama3_regex.removeprefix("split:")}, "behavior": "Isolated"},
            {**byte_level, "use_regex": False},
        ],
    }
    assert llama_cpp_pre_name(llama3) == "llama-bpe"
    assert describe_pre_tokenizer({"type": "Metaspace", "replacement": "▁"})[0].startswith("Metaspace:")
    with pytest.raises(TokenizerError, match=r"no pre-tokenizer with this splitting rule: split:\\d\+ \+ bytelevel"):
        llama_cpp_pre_name(
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": r"\d+"}, "behavior": "Isolated"},
                    {**byte_level, "use_regex": False},
                ],
            }
        )


# ---------------------------------------------------------------- failures


def _small_checkpoint(tmp_path: Path, hf_case: Callable[[str], HfCase]) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(hf_case("llama").hf_dir, target)
    return target


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert list(out.parent.glob(f".{out.name}.*")) == []


def test_refusals_name_the_problem_and_write_nothing(tmp_path: Path, hf_case: Callable[[str], HfCase]) -> None:
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()

    with pytest.raises(ConversionError, match=r"config\.json is missing"):
        convert_checkpoint(tmp_path, out)

    ckpt = _small_checkpoint(tmp_path, hf_case)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match=r"architectures \['GPT2LMHeadModel'\] are not supported"):
        convert_checkpoint(ckpt, out)
    (ckpt / "config.json").write_text(json.dumps(config))

    extra = load_file(ckpt / "model.safetensors")
    extra["model.layers.0.self_attn.mystery.weight"] = np.zeros((2, 2), np.float32)
    save_file(extra, ckpt / "model.safetensors")
    with pytest.raises(ConversionError, match=r"no llama GGUF tensor for 1 .*self_attn\.mystery\.weight"):
        convert_checkpoint(ckpt, out)
    _assert_nothing_written(out)


def test_a_truncated_checkpoint_fails_without_leaving_a_file(tmp_path: Path, hf_case: Callable[[str], HfCase]) -> None:
    ckpt = _small_checkpoint(tmp_path, hf_case)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "model.gguf"

    with pytest.raises((ConversionError, ValueError, OSError)):
        convert_checkpoint(ckpt, out, out_type="f32")

    _assert_nothing_written(out)


def test_a_tokenizer_llama_cpp_cannot_reproduce_is_refused(tmp_path: Path, hf_case: Callable[[str], HfCase]) -> None:
    ckpt = _small_checkpoint(tmp_path, hf_case)
    tokenizer = json.loads((ckpt / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (ckpt / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = tmp_path / "model.gguf"

    with pytest.raises(ConversionError, match="no pre-tokenizer with this splitting rule: Whitespace"):
        convert_checkpoint(ckpt, out)
    _assert_nothing_written(out)

    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match=r"tokenizer\.json is missing"):
        convert_checkpoint(ckpt, out)


def test_cli_gguf_reports_in_one_line(tmp_path: Path, hf_case: Callable[[str], HfCase]) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "convert", "gguf", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    missing = run(str(tmp_path / "nope"), str(tmp_path / "x.gguf"))
    assert missing.returncode == 1
    assert (
        missing.stderr.count("\n") == 1 and missing.stderr.startswith("error: ") and "not a directory" in missing.stderr
    )

    done = run(str(hf_case("llama").hf_dir), str(tmp_path / "llama.gguf"), "--outtype", "f16")
    assert done.returncode == 0, done.stderr
    assert "llama, 21 tensors" in done.stdout

    mtp_dir = hf_case("qwen3next", mtp=True).hf_dir
    kept = run(str(mtp_dir), str(tmp_path / "mtp.gguf"), "--outtype", "f32")
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.rstrip().endswith("MTP layers 1")
    dropped = run(str(mtp_dir), str(tmp_path / "no-mtp.gguf"), "--outtype", "f32", "--no-mtp")
    assert dropped.returncode == 0, dropped.stderr
    assert "MTP" not in dropped.stdout
    assert not any(".nextn." in name for name in _tensors(tmp_path / "no-mtp.gguf"))
    assert _tensors(tmp_path / "llama.gguf")["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
