"""Benchmarks: end-to-end decode speed on SmolLM2 — 16 concurrent requests of 32 greedy tokens each, through
the real Engine + LlamaBackend (loaded exactly as `python -m server` loads it), and through the HTTP app
in-process (FastAPI routes, chat template, SSE encoding; httpx's ASGI transport instead of a socket).

One warm-up round fills each slot's cache with its prompt, so the timed rounds reuse it (prefix reuse) and
measure decoding. Each round's output tokens/s and ms per engine step land in the benchmark's extra_info
(`--benchmark-json`, `--benchmark-autosave`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from bench.harness import N_THREADS
from bench.load import DEFAULT_PROMPTS_PATH, load_prompts
from bindings.protocol import SamplingParams
from server.api.state import app_server_state
from server.app import create_app
from server.boot.loader import build_engine
from server.engine.engine import Engine
from server.engine.request import Request
from server.settings import Settings

N_STREAMS = 16
N_TOKENS = 32
ROUNDS = 3
SETTINGS = Settings(model=["smollm2-135m-instruct"], parallel=N_STREAMS, threads=N_THREADS, ctx_size=512)
PARAMS = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
LOAD_TIMEOUT_S = 120.0


@dataclass
class RoundLog:
    """Seconds and engine steps of each timed round, turned into extra_info after the benchmark."""

    seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def record(self, started: float, steps_before: int, steps_after: int) -> None:
        self.seconds.append(time.perf_counter() - started)
        self.steps.append(steps_after - steps_before)

    def extra_info(self, n_tokens_per_round: int, n_warmup_rounds: int) -> dict[str, float]:
        # With --benchmark-disable pytest-benchmark runs once and skips the warm-up: then that round counts.
        timed = slice(n_warmup_rounds, None) if len(self.seconds) > n_warmup_rounds else slice(None)
        seconds, steps = self.seconds[timed], self.steps[timed]
        best = min(seconds)
        return {
            "output_tokens_per_s_best": round(n_tokens_per_round / best, 1),
            "output_tokens_per_s_mean": round(n_tokens_per_round * len(seconds) / sum(seconds), 1),
            "ms_per_step_mean": round(1000 * sum(seconds) / sum(steps), 2),
            "steps_per_round_mean": sum(steps) / len(steps),
        }


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module: the engine captures the loop it starts on, and every round runs there."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


@pytest.fixture(scope="module")
def chat_prompts() -> tuple[str, ...]:
    return load_prompts(DEFAULT_PROMPTS_PATH)[:N_STREAMS]


@pytest.fixture(scope="module")
def engine(loop: asyncio.AbstractEventLoop) -> Iterator[Engine]:
    started = build_engine(SETTINGS)

    async def start() -> None:
        started.start()

    loop.run_until_complete(start())
    yield started
    started.stop()


async def generate_all(engine: Engine, prompts: list[tuple[int, ...]]) -> list[int]:
    """Submit every prompt at once; the number of tokens each produced."""

    async def one(prompt: tuple[int, ...]) -> int:
        return sum([len(event.token_ids) async for event in engine.submit(Request(prompt, PARAMS))])

    return list(await asyncio.gather(*(one(prompt) for prompt in prompts)))


def test_bench_decode_engine_smollm2_16x32(
    benchmark: Any, loop: asyncio.AbstractEventLoop, engine: Engine, chat_prompts: tuple[str, ...]
) -> None:
    prompts = [tuple(engine.vocab.tokenize(text, add_special=True, parse_special=False)) for text in chat_prompts]
    rounds = RoundLog()

    def one_round() -> list[int]:
        started, steps_before = time.perf_counter(), engine.stats().n_steps
        produced = loop.run_until_complete(generate_all(engine, prompts))
        rounds.record(started, steps_before, engine.stats().n_steps)
        return produced

    produced = benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(rounds.extra_info(N_STREAMS * N_TOKENS, n_warmup_rounds=1))

    assert produced == [N_TOKENS] * N_STREAMS
    # every slot decodes in every step: a round is about N_TOKENS steps, not N_STREAMS × N_TOKENS
    assert max(rounds.steps) < 2 * N_TOKENS
    assert engine.stats().n_requests_failed == 0


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        state = app_server_state(app)
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while state.status == "loading" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert state.status == "ready", state.load_error
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120.0) as client:
            yield client


@pytest.fixture(scope="module")
def http_app(loop: asyncio.AbstractEventLoop) -> Iterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(SETTINGS)
    stack = contextlib.AsyncExitStack()
    client = loop.run_until_complete(stack.enter_async_context(serving(app)))
    yield app, client
    loop.run_until_complete(stack.aclose())


def streamed_deltas(body: str) -> list[str]:
    """The content deltas of a chat completion's SSE body (role-only and finish chunks count as nothing)."""
    deltas = []
    for line in body.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[len("data: ") :])["choices"]:
                content = choice["delta"].get("content")
                if content:
                    deltas.append(content)
    return deltas


async def stream_all(client: httpx.AsyncClient, model: str, prompts: tuple[str, ...]) -> list[list[str]]:
    async def one(prompt: str) -> list[str]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": N_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return streamed_deltas(response.text)

    return list(await asyncio.gather(*(one(prompt) for prompt in prompts)))


def test_bench_decode_http_smollm2_16x32(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    http_app: tuple[FastAPI, httpx.AsyncClient],
    chat_prompts: tuple[str, ...],
) -> None:
    app, client = http_app
    state = app_server_state(app)
    engine_stats: Callable[[], int] = lambda: state.engine.stats().n_steps if state.engine else 0  # noqa: E731
    rounds = RoundLog()

    def one_round() -> list[list[str]]:
        started, steps_before = time.perf_counter(), engine_stats()
        answers = loop.run_until_complete(stream_all(client, state.served_model_id, chat_prompts))
        rounds.record(started, steps_before, engine_stats())
        return answers

    answers = benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(rounds.extra_info(N_STREAMS * N_TOKENS, n_warmup_rounds=1))

    assert len(answers) == N_STREAMS
    # one delta per token, except where a token ends half a UTF-8 character (its text waits for the next)
    assert all(N_TOKENS // 2 <= len(deltas) <= N_TOKENS and "".join(deltas).strip() for deltas in answers)
    assert max(rounds.steps) < 2 * N_TOKENS
