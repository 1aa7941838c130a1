"""LlamaBackend on real models: SmolLM2 (the embedded default) and a tiny synthetic qwen3next."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from bindings.grammar import schema_grammar
from bindings.llama_backend import LlamaBackend, LlamaBackendConfig, parse_memory_report
from bindings.protocol import BackendError, BatchEntry, CacheOp, DecodeError, SamplingParams
from registry.models import resolve_model

pytestmark = pytest.mark.slow

N_SLOTS = 4
N_CTX_PER_SLOT = 512  # a multiple of 256, so llama.cpp keeps it as asked
GREEDY = SamplingParams(temperature=0.0)
PROMPTS = (
    "The capital of France is",
    "Write a haiku about the sea:",
    "def fibonacci(n):",
)


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    return resolve_model("smollm2-135m-instruct").path


@pytest.fixture(scope="module")
def config() -> LlamaBackendConfig:
    # use_extra_bufts=False: batched and single-sequence results are compared (see llama-cpp-facts.md).
    return LlamaBackendConfig(n_slots=N_SLOTS, n_ctx_per_slot=N_CTX_PER_SLOT, n_batch=256, n_ubatch=256, n_threads=2)


@pytest.fixture(scope="module")
def backend(smollm2_path: Path, config: LlamaBackendConfig) -> Iterator[LlamaBackend]:
    loaded = LlamaBackend(smollm2_path, config, name="smollm2")
    yield loaded
    loaded.close()


@pytest.fixture
def clean(backend: LlamaBackend) -> LlamaBackend:
    backend.apply([CacheOp("clear", slot=slot) for slot in range(N_SLOTS)])
    return backend


def tokens_of(backend: LlamaBackend, text: str) -> tuple[int, ...]:
    return tuple(backend.tokenize(text, add_special=True, parse_special=False))


def prefill(backend: LlamaBackend, slot: int, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
    backend.decode([BatchEntry(slot, tuple(tokens), 0, True)])
    return backend.logits(len(tokens) - 1)


def step(backend: LlamaBackend, slot: int, token: int, pos: int) -> npt.NDArray[np.float32]:
    backend.decode([BatchEntry(slot, (token,), pos, True)])
    return backend.logits(0)


def greedy_run(
    backend: LlamaBackend, prompts: Sequence[tuple[int, ...]], slots: Sequence[int], n_steps: int
) -> tuple[list[list[int]], list[list[npt.NDArray[np.float32]]]]:
    """Prefill all prompts in one batch, then n_steps greedy steps with all slots in one batch each."""
    for sampler_id in slots:
        backend.new_sampler(sampler_id, GREEDY)
    generated: list[list[int]] = [[] for _ in slots]
    logits: list[list[npt.NDArray[np.float32]]] = [[] for _ in slots]
    entries = [BatchEntry(slot, prompt, 0, True) for slot, prompt in zip(slots, prompts, strict=True)]
    for _ in range(n_steps):
        backend.decode(entries)
        index = -1
        next_entries = []
        for position, entry in enumerate(entries):
            index += len(entry.tokens)
            logits[position].append(backend.logits(index))
            token = backend.sample(entry.slot, index, GREEDY).token
            generated[position].append(token)
            next_entries.append(BatchEntry(entry.slot, (token,), entry.start_pos + len(entry.tokens), True))
        entries = next_entries
    for sampler_id in slots:
        backend.free_sampler(sampler_id)
    return generated, logits


def test_info_reports_the_model_and_the_real_context(backend: LlamaBackend, smollm2_path: Path) -> None:
    info = backend.info
    assert info.name == "smollm2"
    assert info.architecture == "llama"
    assert info.n_vocab == 49152
    assert info.n_slots == N_SLOTS
    assert info.n_ctx_per_slot == N_CTX_PER_SLOT
    assert info.n_batch == 256
    assert info.supports_partial_removal is True
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template
    assert info.eos_token == 2 and backend.is_eog(2)
    assert info.n_params > 100_000_000
    assert 0.9 < info.size_bytes / smollm2_path.stat().st_size <= 1.0


def test_context_share_is_padded_to_256(smollm2_path: Path) -> None:
    padded = LlamaBackend(smollm2_path, LlamaBackendConfig(n_slots=2, n_ctx_per_slot=300, n_threads=2))
    try:
        assert padded.info.n_ctx_per_slot == 512
    finally:
        padded.close()


def test_tokenize_and_piece_round_trip_real_text(backend: LlamaBackend) -> None:
    text = "Hello, world! Ünïcödé — 日本語 and emoji 🦙\n\tindented code: x = 1"
    tokens = backend.tokenize(text, add_special=False, parse_special=False)
    assert len(tokens) > 10
    assert b"".join(backend.piece(token) for token in tokens) == text.encode()


def test_special_tokens(backend: LlamaBackend) -> None:
    parsed = backend.tokenize("<|im_start|>user", add_special=False, parse_special=True)
    literal = backend.tokenize("<|im_start|>user", add_special=False, parse_special=False)
    assert parsed[0] == 1 and len(literal) > len(parsed)
    assert backend.token_text(1) == "<|im_start|>"
    assert backend.piece(1) == b""  # control tokens render as nothing
    assert backend.is_eog(2) and not backend.is_eog(parsed[-1])
    with pytest.raises(BackendError, match="outside the vocabulary"):
        backend.piece(backend.info.n_vocab)


def test_batched_greedy_equals_each_alone(clean: LlamaBackend) -> None:
    backend = clean
    prompts = [tokens_of(backend, text) for text in PROMPTS]
    batched_tokens, batched_logits = greedy_run(backend, prompts, slots=(0, 1, 2), n_steps=6)
    for index, prompt in enumerate(prompts):
        backend.apply([CacheOp("clear", slot=slot) for slot in range(N_SLOTS)])
        alone_tokens, alone_logits = greedy_run(backend, [prompt], slots=(3,), n_steps=6)
        assert alone_tokens[0] == batched_tokens[index]
        # Exact: without extra buffer types llama.cpp computes each row the same way in any batch.
        for alone_step, batched_step in zip(alone_logits[0], batched_logits[index], strict=True):
            assert np.array_equal(alone_step, batched_step)
    assert len({tuple(tokens) for tokens in batched_tokens}) == 3  # different prompts, different answers


def test_save_restore_reproduces_next_token_logits(clean: LlamaBackend) -> None:
    backend = clean
    prompt = tokens_of(backend, PROMPTS[0])
    next_token = int(np.argmax(prefill(backend, 0, prompt)))
    backend.apply([CacheOp("save", slot=0)])
    reference = step(backend, 0, next_token, len(prompt))
    # Change the slot completely, then restore the snapshot and decode the same token again.
    backend.apply([CacheOp("clear", slot=0)])
    prefill(backend, 0, tokens_of(backend, PROMPTS[1]))
    backend.apply([CacheOp("restore", slot=0)])
    assert np.array_equal(step(backend, 0, next_token, len(prompt)), reference)


def test_state_size_is_what_a_stash_holds_and_grows_with_the_tokens(clean: LlamaBackend) -> None:
    backend = clean
    prompt = tokens_of(backend, PROMPTS[0])
    prefill(backend, 0, prompt[:4])
    small = backend.state_size(0)
    step(backend, 0, prompt[4], 4)
    one_more = backend.state_size(0)
    # SmolLM2: 30 layers of 3 KV heads x 64 values, K and V in f16, and a few bytes of cell metadata per token
    assert 30 * 2 * 3 * 64 * 2 <= one_more - small < 30 * 2 * 3 * 64 * 2 + 64
    backend.apply([CacheOp("stash", slot=0, entry=7, n_bytes=one_more), CacheOp("load", slot=1, entry=7)])
    assert backend.state_size(1) == one_more, "the loaded copy is the whole stashed state"
    backend.apply([CacheOp("drop", slot=0, entry=7), CacheOp("drop", slot=0, entry=7)])  # repeatable
    with pytest.raises(BackendError, match="nothing was saved under 7"):
        backend.apply([CacheOp("load", slot=1, entry=7)])


def test_restore_without_save_is_an_error(clean: LlamaBackend) -> None:
    with pytest.raises(BackendError, match="nothing was saved"):
        clean.apply([CacheOp("restore", slot=3)])


def test_copy_reproduces_next_token_logits(clean: LlamaBackend) -> None:
    backend = clean
    prompt = tokens_of(backend, PROMPTS[1])
    next_token = int(np.argmax(prefill(backend, 0, prompt)))
    prefill(backend, 2, tokens_of(backend, PROMPTS[2]))  # the destination had other content
    backend.apply([CacheOp("copy", slot=2, src=0)])
    copied = step(backend, 2, next_token, len(prompt))
    original = step(backend, 0, next_token, len(prompt))
    assert np.array_equal(copied, original)


def test_truncate_then_redecode_matches(clean: LlamaBackend) -> None:
    backend = clean
    prompt = tokens_of(backend, PROMPTS[2])
    next_token = int(np.argmax(prefill(backend, 1, prompt)))
    reference = step(backend, 1, next_token, len(prompt))
    extra = tokens_of(backend, " something else entirely")
    backend.decode([BatchEntry(1, extra, len(prompt) + 1, False)])
    backend.apply([CacheOp("truncate", slot=1, n_keep=len(prompt))])
    assert np.array_equal(step(backend, 1, next_token, len(prompt)), reference)


def test_logprobs_are_the_log_softmax_of_the_logits(clean: LlamaBackend) -> None:
    backend = clean
    params = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5)
    logits = prefill(backend, 0, tokens_of(backend, PROMPTS[0])).astype(np.float64)
    backend.new_sampler(7, params)
    sampled = backend.sample(7, len(tokens_of(backend, PROMPTS[0])) - 1, params)
    backend.free_sampler(7)
    log_softmax = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    assert sampled.logprob is not None
    assert sampled.logprob.token == sampled.token == int(np.argmax(logits))
    assert sampled.logprob.text == backend.piece(sampled.token)
    assert sampled.logprob.logprob == pytest.approx(log_softmax[sampled.token], abs=1e-5)
    top = sampled.logprob.top
    assert [entry.token for entry in top] == list(np.argsort(-logits, kind="stable")[:5])
    assert [entry.logprob for entry in top] == sorted((entry.logprob for entry in top), reverse=True)
    for entry in top:
        assert entry.logprob == pytest.approx(log_softmax[entry.token], abs=1e-5)


def test_seeded_sampling_repeats_and_bias_forces_a_token(clean: LlamaBackend) -> None:
    backend = clean
    prompt = tokens_of(backend, PROMPTS[1])
    prefill(backend, 0, prompt)
    seeded = SamplingParams(temperature=1.5, top_k=40, top_p=0.95, min_p=0.01, seed=1234, repeat_penalty=1.1)
    draws = []
    for sampler_id in (10, 11):
        backend.new_sampler(sampler_id, seeded)
        draws.append([backend.sample(sampler_id, len(prompt) - 1, seeded).token for _ in range(5)])
        backend.free_sampler(sampler_id)
    assert draws[0] == draws[1]
    forced = SamplingParams(temperature=0.0, logit_bias={1234: 100.0})
    backend.new_sampler(12, forced)
    assert backend.sample(12, len(prompt) - 1, forced).token == 1234
    backend.free_sampler(12)


def test_ignore_eos_never_samples_an_end_token(clean: LlamaBackend) -> None:
    backend = clean
    prompt = tokens_of(backend, PROMPTS[0])
    eos_bias = SamplingParams(temperature=0.0, logit_bias={2: 100.0})  # <|im_end|> would win
    ignoring = SamplingParams(temperature=0.0, logit_bias={2: 100.0}, ignore_eos=True)
    prefill(backend, 0, prompt)
    backend.new_sampler(20, eos_bias)
    backend.new_sampler(21, ignoring)
    assert backend.sample(20, len(prompt) - 1, eos_bias).token == 2
    assert not backend.is_eog(backend.sample(21, len(prompt) - 1, ignoring).token)
    backend.free_sampler(20)
    backend.free_sampler(21)


def test_failed_decode_raises_and_the_backend_keeps_working(clean: LlamaBackend) -> None:
    backend = clean
    prompt = tokens_of(backend, PROMPTS[0])
    reference = prefill(backend, 0, prompt)
    backend.apply([CacheOp("clear", slot=0)])
    bad_token = backend.info.n_vocab + 7
    with pytest.raises(DecodeError, match=r"-1 \(invalid input batch\).*invalid token"):
        backend.decode([BatchEntry(1, (5, bad_token), 0, True), BatchEntry(0, prompt, 0, True)])
    with pytest.raises(BackendError, match="no logits"):
        backend.logits(len(prompt) + 1)
    assert np.array_equal(prefill(backend, 0, prompt), reference)


def test_batch_checks(clean: LlamaBackend) -> None:
    backend = clean
    with pytest.raises(DecodeError, match="exceed n_batch"):
        backend.decode([BatchEntry(0, (5,) * 257, 0, True)])
    with pytest.raises(DecodeError, match="slot 4 is outside"):
        backend.decode([BatchEntry(N_SLOTS, (5,), 0, True)])
    with pytest.raises(DecodeError, match="at least one token"):
        backend.decode([])
    with pytest.raises(BackendError, match="unknown cache op"):
        backend.apply([CacheOp("shrink", slot=0)])


def test_memory_report_matches_the_model_and_the_context(
    backend: LlamaBackend, smollm2_path: Path, config: LlamaBackendConfig
) -> None:
    report = backend.memory_report()
    assert set(report.model_bytes) == {"CPU_Mapped"}
    assert 0.95 < report.model_bytes["CPU_Mapped"] / smollm2_path.stat().st_size <= 1.0
    # 30 layers x (K + V) x 3 KV heads x 64 dims x 2 bytes (f16) per cell, n_slots x 512 cells.
    assert report.kv_cache_bytes == {"CPU": 30 * 2 * 3 * 64 * 2 * N_SLOTS * N_CTX_PER_SLOT}
    assert report.recurrent_state_bytes == {}
    assert report.compute_bytes["CPU"] > 1024 * 1024
    assert report.total_bytes > report.model_bytes["CPU_Mapped"] + report.kv_cache_bytes["CPU"]


def test_parse_memory_report_sums_buffers_and_keeps_the_last_reservation() -> None:
    report = parse_memory_report(
        [
            "load_tensors:   CPU_Mapped model buffer size =   100.00 MiB",
            "load_tensors:        CUDA0 model buffer size =  2048.50 MiB",
            "load_tensors:   CPU_Mapped model buffer size =    50.00 MiB",
            "llama_kv_cache:      CUDA0 KV buffer size =    64.00 MiB",
            "llama_kv_cache:      CUDA0 KV buffer size =    16.00 MiB",
            "llama_memory_recurrent:        CPU RS buffer size =     3.25 MiB",
            "sched_reserve: reserving ...",
            "sched_reserve:      CUDA0 compute buffer size =   500.00 MiB",
            "sched_reserve: reserving ...",
            "sched_reserve:      CUDA0 compute buffer size =   300.00 MiB",
            "sched_reserve:  CUDA_Host compute buffer size =    12.00 MiB",
        ]
    )
    mib = 1024 * 1024
    assert report.model_bytes == {"CPU_Mapped": 150 * mib, "CUDA0": round(2048.5 * mib)}
    assert report.kv_cache_bytes == {"CUDA0": 80 * mib}
    assert report.recurrent_state_bytes == {"CPU": round(3.25 * mib)}
    assert report.compute_bytes == {"CUDA0": 300 * mib, "CUDA_Host": 12 * mib}


def test_tensor_override_to_cpu_loads_and_decodes_the_same(
    clean: LlamaBackend, smollm2_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = tokens_of(clean, PROMPTS[0])
    reference = prefill(clean, 0, prompt)
    # llama.cpp says which tensors an override moved only at debug level; the backend forwards it.
    with caplog.at_level(logging.DEBUG, logger="bindings.llama_backend"):
        overridden = LlamaBackend(
            smollm2_path,
            LlamaBackendConfig(
                n_slots=1,
                n_ctx_per_slot=256,
                n_threads=2,
                tensor_overrides=((r"blk\..*\.ffn_(up|down)\.weight", "CPU"),),
            ),
        )
    try:
        moved = {
            match[1]
            for record in caplog.records
            if (match := re.search(r"tensor (\S+) .* buffer type overridden to CPU", record.getMessage()))
        }
        assert moved == {f"blk.{layer}.ffn_{kind}.weight" for layer in range(30) for kind in ("up", "down")}
        assert np.array_equal(prefill(overridden, 0, prompt), reference)
    finally:
        overridden.close()


def test_unknown_device_names_the_available_ones(smollm2_path: Path) -> None:
    with pytest.raises(BackendError, match=r"unknown device 'NPU3'.*available devices: .*CPU"):
        LlamaBackend(smollm2_path, LlamaBackendConfig(tensor_overrides=((r"token_embd\.weight", "NPU3"),)))


def test_load_failures_are_readable(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="does not exist"):
        LlamaBackend(tmp_path / "missing.gguf", LlamaBackendConfig())
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("these are notes, not a model\n")
    with pytest.raises(BackendError, match=r"cannot load model .*notes\.gguf: .*magic"):
        LlamaBackend(not_gguf, LlamaBackendConfig())


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="type_k"):
        LlamaBackendConfig(type_k="q2_k")
    with pytest.raises(ValueError, match="n_ubatch"):
        LlamaBackendConfig(n_batch=64, n_ubatch=128)
    with pytest.raises(ValueError, match="not a valid regex"):
        LlamaBackendConfig(tensor_overrides=(("blk.(", "CPU"),))


def test_hybrid_model_saves_and_restores_but_cannot_truncate(tiny_qwen3next_gguf: Path) -> None:
    hybrid = LlamaBackend(tiny_qwen3next_gguf, LlamaBackendConfig(n_slots=2, n_ctx_per_slot=256, n_threads=2))
    try:
        assert hybrid.info.supports_partial_removal is False
        assert hybrid.memory_report().recurrent_state_bytes
        prompt = tokens_of(hybrid, "Hello, world! How are you today?")
        prefix, suffix = prompt[:4], prompt[4:]
        full = prefill(hybrid, 0, prompt)
        hybrid.apply([CacheOp("clear", slot=0)])
        prefill(hybrid, 0, prefix)
        hybrid.apply([CacheOp("save", slot=0)])
        hybrid.decode([BatchEntry(0, suffix, len(prefix), True)])
        with pytest.raises(BackendError, match="partial removal"):
            hybrid.apply([CacheOp("truncate", slot=0, n_keep=len(prefix))])
        hybrid.apply([CacheOp("restore", slot=0)])
        hybrid.decode([BatchEntry(0, suffix, len(prefix), True)])
        assert np.array_equal(hybrid.logits(len(suffix) - 1), full)
        hybrid.apply([CacheOp("copy", slot=1, src=0)])
        assert np.array_equal(step(hybrid, 1, 5, len(prompt)), step(hybrid, 0, 5, len(prompt)))
    finally:
        hybrid.close()


@pytest.mark.parametrize(
    "params",
    [
        GREEDY,
        SamplingParams(temperature=0.0, ignore_eos=True),
        SamplingParams(temperature=0.0, logit_bias={198: -100.0, 28: -5.0, 30: 0.0}),
    ],
    ids=["plain", "ignore_eos", "negative_biases"],
)
def test_greedy_fast_path_picks_what_the_llama_cpp_chain_picks(clean: LlamaBackend, params: SamplingParams) -> None:
    """Greedy sampling without penalties skips llama.cpp's sampler chain (an argmax over the logits in place):
    it must choose exactly what the chain chooses. A tiny positive bias on an unlikely token forces the chain."""
    chained = replace(params, logit_bias={**params.logit_bias, 49151: 1e-6})
    prompts = [tokens_of(clean, text) for text in PROMPTS]
    for slot, prompt in enumerate(prompts):
        clean.new_sampler(slot, params)
        clean.new_sampler(10 + slot, chained)
        position = len(prompt)
        logits_index = len(prompt) - 1
        clean.decode([BatchEntry(slot, prompt, 0, True)])
        for _ in range(24):
            fast = clean.sample(slot, logits_index, params).token
            chain = clean.sample(10 + slot, logits_index, chained).token
            assert fast == chain
            clean.decode([BatchEntry(slot, (fast,), position, True)])
            position, logits_index = position + 1, 0
        clean.free_sampler(slot)
        clean.free_sampler(10 + slot)


def _sample_until_end(
    backend: LlamaBackend, params: SamplingParams, prompt_text: str, max_steps: int
) -> tuple[bytes, bool]:
    """Decode one sequence in slot 0 with sampler 0: (its text, whether it ended by end-of-generation)."""
    backend.apply([CacheOp("clear", 0)])
    backend.new_sampler(0, params)
    prompt = tokens_of(backend, prompt_text)
    backend.decode([BatchEntry(0, prompt, 0, True)])
    index, position, text = len(prompt) - 1, len(prompt), b""
    try:
        for _ in range(max_steps):
            token = backend.sample(0, index, params).token
            if backend.is_eog(token):
                return text, True
            text += backend.piece(token)
            backend.decode([BatchEntry(0, (token,), position, True)])
            index, position = 0, position + 1
        return text, False
    finally:
        backend.free_sampler(0)


def test_greedy_with_a_grammar_follows_the_grammar_not_the_argmax(clean: LlamaBackend) -> None:
    # Unconstrained, SmolLM2 continues "The capital of France is" with prose; the grammar allows only
    # "yes" or "no" then end-of-generation: the argmax is rejected and the grammar's full pass decides.
    text, ended = _sample_until_end(
        clean, SamplingParams(temperature=0.0, grammar='root ::= "yes" | "no"'), PROMPTS[0], 8
    )
    assert ended  # the grammar is complete: end-of-generation is all it allows
    assert text in (b"yes", b"no")


def test_a_grammar_overrules_a_biased_sampler_chain(clean: LlamaBackend) -> None:
    # The unconstrained chain (bias +30 on " Paris", penalties, top-k, temperature) keeps picking a token the
    # grammar forbids; each time the token-first check must reject it and sample again under the grammar.
    paris = clean.tokenize(" Paris", add_special=False, parse_special=False)[0]
    params = SamplingParams(
        temperature=1.0,
        top_k=40,
        seed=7,
        repeat_penalty=1.1,
        logit_bias={paris: 30.0},
        grammar="root ::= [0-9] [0-9] [0-9]",
    )
    text, ended = _sample_until_end(clean, params, PROMPTS[0], 8)
    assert ended
    assert len(text) == 3 and text.isdigit()


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 40, "seed": 11}],
    ids=["greedy", "top-k"],
)
def test_the_grammar_shortlist_picks_what_the_full_grammar_pass_picks(
    clean: LlamaBackend, sampling: dict[str, float]
) -> None:
    # Two routes to the same constrained pick: without penalties, a rejected pick is retried on a shortlist of
    # the best-ranked tokens (exact when enough of them are allowed); a (negligible) positive bias on a rare
    # token disables that shortcut, so every rejection runs the full-vocabulary pass. Same tokens, same JSON.
    grammar = schema_grammar(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
            "required": ["city", "year"],
        }
    )
    rare = clean.tokenize(" zygote", add_special=False, parse_special=False)[0]
    params = SamplingParams(grammar=grammar, **sampling)  # type: ignore[arg-type]
    shortlisted, shortlisted_ended = _sample_until_end(clean, params, PROMPTS[0], 48)
    full, full_ended = _sample_until_end(clean, replace(params, logit_bias={rare: 1e-6}), PROMPTS[0], 48)
    assert shortlisted == full and shortlisted_ended == full_ended
    if shortlisted_ended:
        assert set(json.loads(shortlisted)) == {"city", "year"}


def test_a_lazy_grammar_holds_from_its_trigger_on(clean: LlamaBackend) -> None:
    # tool_choice "auto" in small: free text until the trigger (here "Paris", which SmolLM2 writes unprompted
    # right away; "<tool_call>" in the server), then the grammar from the trigger's match: unconstrained the
    # model goes on " Paris.\n\nThe United States ...", constrained it must write three digits and "!".
    free, _ = _sample_until_end(clean, SamplingParams(temperature=0.0), PROMPTS[0], 6)
    assert free.startswith(b" Paris.")
    params = SamplingParams(
        temperature=0.0, grammar='root ::= "Paris" [0-9] [0-9] [0-9] "!"', grammar_triggers=("Paris",)
    )
    text, ended = _sample_until_end(clean, params, PROMPTS[0], 12)
    assert ended
    assert re.fullmatch(rb" Paris[0-9]{3}!", text), text


def test_a_grammar_llama_cpp_rejects_is_a_backend_error(clean: LlamaBackend) -> None:
    with pytest.raises(BackendError, match="grammar could not be compiled"):
        clean.new_sampler(0, SamplingParams(grammar="root ::= undefined-rule"))


def test_drafted_positions_have_the_logits_of_decoding_them_one_by_one(clean: LlamaBackend) -> None:
    """Speculative decoding's entry: [pending, d1..dk] with logits at every position (n_logits = k + 1)."""
    backend = clean
    prompt = tokens_of(backend, PROMPTS[0])
    first = int(np.argmax(prefill(backend, 0, prompt)))
    drafts = tokens_of(backend, " Paris, the city")[1:4]
    one_by_one = [step(backend, 0, token, len(prompt) + i) for i, token in enumerate((first, *drafts))]
    backend.apply([CacheOp("truncate", slot=0, n_keep=len(prompt))])
    backend.decode([BatchEntry(0, (first, *drafts), len(prompt), True, n_logits=len(drafts) + 1)])
    for index, expected in enumerate(one_by_one):
        assert np.array_equal(backend.logits(index), expected)


def test_hybrid_model_rolls_drafts_back_to_its_checkpoint(tiny_qwen3next_gguf: Path) -> None:
    """A rejected draft on qwen3next: checkpoint (recurrent state only) before the speculative decode, rollback
    after, then the accepted tokens decoded again give exactly the logits of never having drafted."""
    config = LlamaBackendConfig(
        n_slots=1, n_ctx_per_slot=256, n_threads=2, type_k="f32", type_v="f32", flash_attn="off"
    )
    hybrid = LlamaBackend(tiny_qwen3next_gguf, config)
    try:
        prompt = tokens_of(hybrid, "Hello, world! How are you today?")
        accepted, rejected, correction = (11, 12), (13, 14, 15), 20
        prefill(hybrid, 0, prompt)
        hybrid.decode([BatchEntry(0, (*accepted, correction), len(prompt), True)])
        expected = hybrid.logits(len(accepted))
        hybrid.apply([CacheOp("clear", slot=0)])
        prefill(hybrid, 0, prompt)
        hybrid.apply([CacheOp("checkpoint", slot=0)])
        hybrid.decode([BatchEntry(0, accepted + rejected, len(prompt), True, n_logits=5)])
        drafted = hybrid.logits(4)
        hybrid.apply([CacheOp("rollback", slot=0, n_keep=len(prompt))])
        hybrid.decode([BatchEntry(0, (*accepted, correction), len(prompt), True)])
        assert np.array_equal(hybrid.logits(len(accepted)), expected)
        assert not np.allclose(drafted, expected, atol=1e-3), "the test tells the two histories apart"
        with pytest.raises(BackendError, match="partial removal"):
            hybrid.apply([CacheOp("truncate", slot=0, n_keep=len(prompt))])
    finally:
        hybrid.close()
