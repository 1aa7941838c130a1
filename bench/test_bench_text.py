"""Benchmarks: what a request costs before it reaches the engine, with SmolLM2's real tokenizer and chat
template — tokenizing a ~2k-token prompt, rendering a conversation, rendering + tokenizing it."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bindings.llama_backend import LlamaBackend
from server.chat_template import ChatTemplate, select_chat_template

N_PROMPT_TOKENS = 2048
SENTENCE = (
    "the sea wind carries salt over quiet harbours while fishermen mend their nets and talk about weather "
    "prices children school engines rivers mountains history 1984 2048 café naïve déjà-vu code: def f(x): "
    "return x * 2 # comment, (brackets) [lists] {braces} and punctuation; semicolons! questions? quotes \"'"
)
WORDS = tuple(SENTENCE.split())


def prose(n_words: int, seed: int = 0) -> str:
    """Deterministic text with a mix of common words, numbers, accents, code and punctuation."""
    rng = random.Random(seed)
    lines = []
    for start in range(0, n_words, 16):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(min(16, n_words - start))).capitalize() + ".")
    return "\n".join(lines)


def text_of_n_tokens(vocab: LlamaBackend, n_tokens: int) -> str:
    """The shortest prose() of at least n_tokens tokens (grown, then trimmed by words)."""
    n_words = n_tokens
    while len(vocab.tokenize(prose(n_words), add_special=False, parse_special=False)) < n_tokens:
        n_words += n_words // 4
    while len(vocab.tokenize(prose(n_words - 8), add_special=False, parse_special=False)) >= n_tokens:
        n_words -= 8
    return prose(n_words)


def conversation(n_turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a helpful assistant. " + prose(30, 1)}]
    for turn in range(n_turns):
        messages.append({"role": "user", "content": prose(40, 2 + turn)})
        messages.append({"role": "assistant", "content": prose(60, 100 + turn)})
    messages.append({"role": "user", "content": "And one more question: " + prose(20, 999)})
    return messages


@pytest.fixture(scope="module")
def long_text(smollm2_vocab: LlamaBackend) -> str:
    return text_of_n_tokens(smollm2_vocab, N_PROMPT_TOKENS)


@pytest.fixture(scope="module")
def smollm2_template(smollm2_vocab: LlamaBackend) -> ChatTemplate:
    template = select_chat_template(smollm2_vocab.info, smollm2_vocab)
    assert template.origin == "gguf"
    return template


def test_bench_tokenize_2k_tokens(benchmark: Any, smollm2_vocab: LlamaBackend, long_text: str) -> None:
    tokens = benchmark(smollm2_vocab.tokenize, long_text, add_special=True, parse_special=True)
    assert N_PROMPT_TOKENS <= len(tokens) < N_PROMPT_TOKENS + 32
    detokenized = b"".join(smollm2_vocab.piece(token) for token in tokens).decode()
    assert detokenized.endswith(long_text[-200:])


@pytest.mark.parametrize("n_turns", [1, 8])
def test_bench_chat_template_render(benchmark: Any, smollm2_template: ChatTemplate, n_turns: int) -> None:
    messages = conversation(n_turns)
    rendered = benchmark(smollm2_template.render, messages)
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_start|>assistant\n")
    assert rendered.count("<|im_start|>") == len(messages) + 1


def test_bench_chat_prompt_render_and_tokenize(
    benchmark: Any, smollm2_vocab: LlamaBackend, smollm2_template: ChatTemplate
) -> None:
    """What a chat request costs on the event loop before it is submitted (short prompts stay on the loop)."""
    messages = conversation(1)
    info = smollm2_vocab.info

    def render_and_tokenize() -> list[int]:
        return smollm2_template.tokenize(smollm2_template.render(messages), info, smollm2_vocab)

    tokens = benchmark(render_and_tokenize)
    im_start = smollm2_vocab.tokenize("<|im_start|>", add_special=False, parse_special=True)
    assert len(im_start) == 1
    assert tokens.count(im_start[0]) == len(messages) + 1
