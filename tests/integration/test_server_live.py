"""Black-box tests: the real `python -m server` process, the real SmolLM2 model, the official openai client."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pydantic
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import CHAT_PROMPTS as PROMPTS
from tests.integration.conftest import N_SLOTS, CacheHome, LiveServer, start_server, stop_server, stream_chat

MODEL = "smollm2-135m-instruct"


def sync_client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)


def async_client(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)


def chat(server: LiveServer, prompt: str, max_tokens: int = 48) -> openai.types.chat.ChatCompletion:
    return sync_client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens
    )


def test_chat_answers_are_sensible(smollm2_server: LiveServer) -> None:
    # SmolLM2-135M is small: these are questions it gets right at temperature 0 (as llama-server answers them)
    assert "4" in (chat(smollm2_server, "What is 2 + 2?").choices[0].message.content or "")
    colors = chat(smollm2_server, "Name three colors.").choices[0].message.content or ""
    assert {"Red", "Blue", "Green"} <= set(colors.replace(".", " ").split())
    answer = chat(smollm2_server, "What is 2 + 2?")
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage is not None and answer.usage.prompt_tokens > 5
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_stream_equals_non_stream_with_exact_usage(smollm2_server: LiveServer) -> None:
    whole = chat(smollm2_server, "Write one sentence about the sea.", max_tokens=20)
    streamed, finish_reason, n_tokens = asyncio.run(
        stream_chat(async_client(smollm2_server), "Write one sentence about the sea.", max_tokens=20)
    )
    assert streamed == whole.choices[0].message.content
    assert finish_reason == whole.choices[0].finish_reason
    assert whole.usage is not None and n_tokens == whole.usage.completion_tokens
    if finish_reason == "length":
        assert n_tokens == 20


def test_sixteen_concurrent_streams_equal_their_solo_answers(smollm2_server: LiveServer) -> None:
    solo = [chat(smollm2_server, prompt).choices[0].message.content for prompt in PROMPTS]

    async def run_all() -> tuple[list[tuple[str, str | None, int]], int]:
        client = async_client(smollm2_server)
        busy_seen = 0
        done = asyncio.Event()

        async def watch_slots() -> None:
            nonlocal busy_seen
            async with httpx.AsyncClient(base_url=smollm2_server.base_url) as http:
                while not done.is_set():
                    slots = (await http.get("/slots")).json()
                    busy_seen = max(busy_seen, sum(1 for s in slots if s["state"] != "idle"))
                    await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch_slots())
        results = await asyncio.gather(*(stream_chat(client, prompt) for prompt in PROMPTS))
        done.set()
        await watcher
        return list(results), busy_seen

    results, busy_seen = asyncio.run(run_all())
    assert [text for text, _, _ in results] == solo
    assert busy_seen >= N_SLOTS // 2, f"only {busy_seen} slots were ever busy at once"


def generated_tokens(server: LiveServer) -> float:
    """The server's count of tokens generated so far (Prometheus counter qwen3_local_generated_tokens)."""
    text = httpx.get(server.base_url + "/metrics").text
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "qwen3_local_generated_tokens"]
    return family.samples[0].value


def busy_slots(server: LiveServer) -> int:
    return sum(1 for s in httpx.get(server.base_url + "/slots").json() if s["state"] != "idle")


def test_disconnect_mid_stream_frees_the_slot(smollm2_server: LiveServer) -> None:
    max_tokens = 900  # the slot's whole context is 1024 tokens; finishing would generate exactly 900
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a very long story about dragons."}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    assert busy_slots(smollm2_server) == 0
    before = generated_tokens(smollm2_server)
    with (
        httpx.Client(base_url=smollm2_server.base_url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=payload) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines, strict=False)]
        assert any(line.startswith("data: ") for line in received)
    # Wait for the slot however long that takes (pytest-timeout bounds it), then count what it generated:
    # a server that frees the slot only when the request finishes has generated all max_tokens by then.
    while busy_slots(smollm2_server):
        time.sleep(0.05)
    generated = generated_tokens(smollm2_server) - before
    assert 0 < generated < max_tokens // 2, f"{generated} of {max_tokens} tokens generated before the slot was freed"
    assert "4" in (chat(smollm2_server, "What is 2 + 2?").choices[0].message.content or "")


def test_live_servers_keep_their_caches_in_the_temporary_home(
    smollm2_server: LiveServer, live_cache_home: CacheHome
) -> None:
    chat(smollm2_server, "What is 2 + 2?", max_tokens=4)
    # the extra-buffer-types verdict went to the --cache-dir the tests gave, and nothing to the home directory
    assert list(live_cache_home.qwen3_local.glob("extra-bufts-probe-*.json"))
    assert not (live_cache_home.home / ".cache").exists()


def test_legacy_completions_endpoint(smollm2_server: LiveServer) -> None:
    completion = sync_client(smollm2_server).completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert completion.object == "text_completion"
    assert "Paris" in completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens <= 8


def test_models_health_and_metrics(smollm2_server: LiveServer) -> None:
    models = sync_client(smollm2_server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(smollm2_server.base_url + "/health")
    assert health.status_code == 200
    chat(smollm2_server, "What is 2 + 2?", max_tokens=4)
    text = httpx.get(smollm2_server.base_url + "/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    generated = [s.value for f in families.values() for s in f.samples if "generated" in s.name and "token" in s.name]
    assert generated and max(generated) >= 4


def test_tokenize_counts_the_chat_prompt_and_round_trips(smollm2_server: LiveServer) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Wie heißt die Hauptstadt von Frankreich?"},
    ]
    with httpx.Client(base_url=smollm2_server.base_url, timeout=60) as http:
        meter = http.post("/tokenize", json={"messages": messages}).json()
        answer = sync_client(smollm2_server).chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=2,
            temperature=0,
        )
        assert answer.usage is not None and meter["n_tokens"] == answer.usage.prompt_tokens > 10
        assert meter["n_ctx"] > meter["n_tokens"] and len(meter["tokens"]) == meter["n_tokens"]

        text = "Grüße aus Köln: 東京 🙂 – ça va?"
        tokens = http.post("/tokenize", json={"content": text}).json()["tokens"]
        assert all(isinstance(token, int) for token in tokens)
        assert http.post("/detokenize", json={"tokens": tokens}).json() == {"content": text}
        pieces = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
        assert [piece["id"] for piece in pieces] == tokens
        # pieces joined give the text back: a piece that is part of a character comes as its bytes
        joined = b"".join(
            piece["piece"].encode() if isinstance(piece["piece"], str) else bytes(piece["piece"]) for piece in pieces
        )
        assert joined.decode() == text
        bad = http.post("/detokenize", json={"tokens": [1, 10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


ERROR_CASES = [
    ("malformed json", b"{not json", 400, None),
    ("wrong type", json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
    ("missing field", json.dumps({"model": MODEL}).encode(), 400, "messages"),
    (
        "negative max_tokens",
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(),
        400,
        "max_tokens",
    ),
    (
        "unknown model",
        json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}).encode(),
        404,
        "model",
    ),
    (
        "prompt too long",
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}).encode(),
        400,
        None,
    ),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_gets_openai_error_and_server_keeps_serving(
    smollm2_server: LiveServer, case: str, body: bytes, status: int, param: str | None
) -> None:
    response = httpx.post(
        smollm2_server.base_url + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if case == "prompt too long":
        assert error["code"] == "context_length_exceeded"
    assert smollm2_server.process.poll() is None
    assert chat(smollm2_server, "What is 2 + 2?", max_tokens=4).choices[0].finish_reason in ("stop", "length")


def test_full_queue_answers_429_with_retry_after(tmp_path: Path, live_cache_home: CacheHome) -> None:
    server = start_server(
        ["--model", MODEL, "--parallel", "1", "--max-queue", "0", "--ctx-size", "512", "--threads", "2"],
        tmp_path / "server.log",
        live_cache_home,
    )
    try:
        long_request = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 300,
            "ignore_eos": True,
            "stream": True,
        }
        with (
            httpx.Client(base_url=server.base_url, timeout=60) as http,
            http.stream("POST", "/v1/chat/completions", json=long_request) as running,
        ):
            assert running.status_code == 200
            # Keep the line iterator referenced: a discarded httpx iterator is closed at once, and closing it
            # closes the connection, which frees the slot (a race this test once lost 1 time in 6).
            lines = running.iter_lines()
            next(lines)  # the slot is busy now
            refused = http.post("/v1/chat/completions", json={**long_request, "stream": False, "max_tokens": 4})
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
        # the stream was closed early: its slot frees up and the server keeps serving
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = httpx.post(
                server.api_url + "/chat/completions", json={**long_request, "stream": False, "max_tokens": 4}
            )
            if answer.status_code == 200:
                break
            time.sleep(0.1)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    finally:
        stop_server(server)


# --- response_format: decoding constrained by a grammar compiled from the schema ---------------------------

# Bounded (short strings, a small array, an enum), so every answer completes within max_tokens even at
# temperature 1: a truncated answer would be max_tokens' fault, not the grammar's.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer"},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "nickname": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
    },
    "required": ["name", "age", "mood", "pets", "nickname"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
PERSON_PROMPT = [{"role": "user", "content": "Describe a made-up person as JSON."}]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=24)
    country: str = pydantic.Field(max_length=24)
    population: int
    coastal: bool


def test_parse_returns_the_pydantic_object(smollm2_server: LiveServer) -> None:
    completion = sync_client(smollm2_server).chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about Paris."}],
        response_format=City,
        max_tokens=200,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert City.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_json_schema_every_choice_validates_at_temperature_one(smollm2_server: LiveServer) -> None:
    completion = sync_client(smollm2_server).chat.completions.create(
        model=MODEL,
        messages=PERSON_PROMPT,  # type: ignore[arg-type]
        response_format=PERSON_FORMAT,  # type: ignore[arg-type]
        temperature=1.0,
        n=3,
        max_tokens=200,
    )
    assert len(completion.choices) == 3
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON_SCHEMA)


def test_json_schema_streamed_every_choice_validates(smollm2_server: LiveServer) -> None:
    stream = sync_client(smollm2_server).chat.completions.create(
        model=MODEL,
        messages=PERSON_PROMPT,  # type: ignore[arg-type]
        response_format=PERSON_FORMAT,  # type: ignore[arg-type]
        temperature=1.0,
        n=3,
        max_tokens=200,
        stream=True,
    )
    texts = ["", "", ""]
    finish_reasons: list[str | None] = [None, None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finish_reasons[choice.index] = choice.finish_reason or finish_reasons[choice.index]
    assert finish_reasons == ["stop"] * 3, texts
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)


def test_json_object_output_parses(smollm2_server: LiveServer) -> None:
    completion = sync_client(smollm2_server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": 'Repeat this JSON: {"city": "Paris", "country": "France"}'}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=300,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content or ""), dict)


def test_unsupported_schema_feature_is_a_400_naming_it(smollm2_server: LiveServer) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}, "required": ["n"]}
    with pytest.raises(openai.BadRequestError) as caught:
        sync_client(smollm2_server).chat.completions.create(
            model=MODEL,
            messages=PERSON_PROMPT,  # type: ignore[arg-type]
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        )
    assert caught.value.body["param"] == "response_format"  # type: ignore[index]
    assert "minimum" in caught.value.body["message"]  # type: ignore[index]


def test_completions_route_takes_a_json_schema_too(smollm2_server: LiveServer) -> None:
    # llama-server constrains /completion the same way; lm-eval-style and raw-prompt clients rely on it.
    completion = sync_client(smollm2_server).completions.create(
        model=MODEL,
        prompt="A made-up person, as JSON:",
        temperature=1.0,
        n=2,
        max_tokens=200,
        extra_body={"response_format": PERSON_FORMAT},
    )
    assert len(completion.choices) == 2
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), PERSON_SCHEMA)
