"""POST /v1/embeddings on a real server and real llama.cpp (SmolLM2, mean pooling), through the official
`openai` SDK: its default base64 and explicit float, vectors that do not depend on their batch mates, vectors
that mean something, and chat streams that keep flowing while a large embeddings request runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.integration.conftest import CacheHome, LiveServer, start_server, stop_server

MODEL = "smollm2-135m-instruct"
N_EMBD = 576  # SmolLM2-135M's hidden size
MAX_BATCH_TOKENS = 512
# How far a component of a unit vector may move with the inputs that share its decode: inputs never attend to
# each other, but llama.cpp's kernels round differently with a token's place in the batch and the 8-bit
# activation quantization amplifies it (bindings/embedder.py: at most 3e-3 measured; llama-server's default,
# flash attention on, moves them 8e-3 to 3e-2).
BATCH_TOLERANCE = 5e-3

TEXTS = [
    "The cat sat on the mat",
    "A cat is sitting on a mat",
    "Quarterly tax filing deadlines",
    "Paris is the capital of France.",
    "hi",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "def add(a, b): return a + b",
    "Die Katze sitzt auf der Matte.",
]


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory: pytest.TempPathFactory, live_cache_home: CacheHome) -> Iterator[LiveServer]:
    log_path = tmp_path_factory.mktemp("embeddings-server") / "server.log"
    server = start_server(
        [
            "--model", MODEL,
            "--embeddings",
            "--parallel", "4",
            "--ctx-size", "512",
            "--threads", "2",
            "--max-batch-tokens", str(MAX_BATCH_TOKENS),
        ],
        log_path,
        live_cache_home,
    )  # fmt: skip
    yield server
    stop_server(server)


@pytest.fixture
def client(embedding_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=embedding_server.api_url, api_key="unused", max_retries=0, timeout=120)


def as_array(embedding: list[float]) -> np.ndarray:
    return np.asarray(embedding, dtype=np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_sdk_default_base64_and_float_agree(client: openai.OpenAI) -> None:
    default = client.embeddings.create(model=MODEL, input=TEXTS[:3])  # the SDK asks for base64 and decodes it
    floats = client.embeddings.create(model=MODEL, input=TEXTS[:3], encoding_format="float")
    assert [item.index for item in default.data] == [0, 1, 2]
    for encoded, plain in zip(default.data, floats.data, strict=True):
        assert len(encoded.embedding) == N_EMBD
        assert np.linalg.norm(as_array(plain.embedding)) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(as_array(encoded.embedding), as_array(plain.embedding), atol=1e-6)
    assert default.model == MODEL
    assert default.usage.prompt_tokens == floats.usage.total_tokens > 3


def test_an_input_alone_equals_it_among_others(client: openai.OpenAI) -> None:
    together = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float").data
    for text, batched in zip(TEXTS, together, strict=True):
        alone = client.embeddings.create(model=MODEL, input=text, encoding_format="float").data[0]
        np.testing.assert_allclose(as_array(alone.embedding), as_array(batched.embedding), atol=BATCH_TOLERANCE)
        assert cosine(as_array(alone.embedding), as_array(batched.embedding)) > 0.9999
    again = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float").data
    for first, second in zip(together, again, strict=True):  # the same batch gives the same vectors, exactly
        assert first.embedding == second.embedding


def test_vectors_mean_something(client: openai.OpenAI) -> None:
    cat, cat_again, tax = (
        as_array(item.embedding) for item in client.embeddings.create(model=MODEL, input=TEXTS[:3]).data
    )
    assert cosine(cat, cat_again) > cosine(cat, tax)
    assert cosine(cat, cat_again) > cosine(cat_again, tax)


def test_token_ids_embed_like_their_text(client: openai.OpenAI, embedding_server: LiveServer) -> None:
    tokens = httpx.post(
        embedding_server.base_url + "/tokenize", json={"content": TEXTS[3], "add_special": True}, timeout=30
    ).json()["tokens"]
    from_text, from_text_again = client.embeddings.create(model=MODEL, input=[TEXTS[3], TEXTS[3]]).data
    (by_ids,) = client.embeddings.create(model=MODEL, input=[tokens]).data
    (alone,) = client.embeddings.create(model=MODEL, input=TEXTS[3]).data
    assert by_ids.embedding == alone.embedding  # the same tokens in the same place: exactly the same vector
    np.testing.assert_allclose(as_array(from_text_again.embedding), as_array(from_text.embedding), atol=BATCH_TOLERANCE)


def test_bad_requests_are_400s_naming_the_param(client: openai.OpenAI) -> None:
    cases = [
        ({"input": ""}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": [[1, 2], [10**6]]}, "input"),
        ({"input": "word " * MAX_BATCH_TOKENS}, "input"),
        ({"input": "ok", "dimensions": 256}, "dimensions"),
    ]
    for arguments, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model=MODEL, **arguments)  # type: ignore[arg-type]
        assert caught.value.status_code == 400
        body = caught.value.body
        assert isinstance(body, dict) and body.get("param") == param, body
    ok = client.embeddings.create(model=MODEL, input="ok", dimensions=N_EMBD)
    assert len(ok.data[0].embedding) == N_EMBD


def test_chat_streams_keep_flowing_during_a_large_embeddings_request(embedding_server: LiveServer) -> None:
    generated: list[int] = []

    async def scenario() -> tuple[list[float], float, float]:
        client = openai.AsyncOpenAI(base_url=embedding_server.api_url, api_key="unused", max_retries=0, timeout=300)
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a long story about the sea."}],
            temperature=0,
            max_tokens=150,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        arrivals: list[float] = []
        started = asyncio.Event()

        async def read_chat() -> None:
            async for chunk in stream:
                if chunk.usage is not None:
                    generated.append(chunk.usage.completion_tokens)
                    continue
                arrivals.append(time.monotonic())
                if len(arrivals) == 3:
                    started.set()

        reader = asyncio.create_task(read_chat())
        await started.wait()
        # ~2400 tokens: five full embedding decodes of 512 tokens
        inputs = [f"Sentence number {index} about ships, harbours and the open sea." for index in range(160)]
        embed_start = time.monotonic()
        result = await client.embeddings.create(model=MODEL, input=inputs)
        embed_end = time.monotonic()
        assert len(result.data) == len(inputs)
        await reader
        return arrivals, embed_start, embed_end

    arrivals, embed_start, embed_end = asyncio.run(scenario())
    during = [moment for moment in arrivals if embed_start < moment < embed_end]
    # The engine runs one embedding decode between two chat steps; one request's decodes all at once would
    # leave the stream silent for the whole request.
    assert len(during) >= 3, (len(during), embed_end - embed_start)
    assert generated == [150], "the stream ran to its end"


def test_the_log_says_how_embeddings_pool(embedding_server: LiveServer) -> None:
    log = Path(embedding_server.log_path).read_text(errors="replace")
    assert "embeddings: mean pooling, 576 dimensions" in log


@pytest.mark.parametrize(
    ("n_batch", "limit", "shape"),
    [
        (512, 64, (512, 64)),
        (100, 64, (100, 4)),
        (101, 64, (100, 4)),
        (512, 4, (512, 4)),
        (2, 64, (2, 2)),
        (1, 64, (1, 1)),
    ],
)
def test_the_embedding_context_holds_a_whole_number_of_tokens_per_sequence(
    n_batch: int, limit: int, shape: tuple[int, int]
) -> None:
    from bindings.embedder import context_shape

    assert context_shape(n_batch, limit) == shape
    got_batch, got_sequences = shape
    assert got_batch % got_sequences == 0  # else llama.cpp's graph reservation aborts the process


def test_the_embedder_on_llama_cpp_directly() -> None:
    """bindings.embedder without the server: pooling from the GGUF (SmolLM2 names none: mean), an override,
    a batch size llama.cpp could not split evenly over 64 sequences, and its limits as DecodeErrors."""
    from bindings.embedder import EmbedderConfig, LlamaEmbedder, gguf_pooling
    from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
    from bindings.protocol import DecodeError
    from registry.models import resolve_model

    backend = LlamaBackend(resolve_model(MODEL).path, LlamaBackendConfig(n_slots=1, n_ctx_per_slot=256, n_threads=2))
    embedders = []
    try:
        assert gguf_pooling(backend.model_handle) is None
        mean = LlamaEmbedder(backend, EmbedderConfig(n_batch=100, n_threads=2))
        last = LlamaEmbedder(backend, EmbedderConfig(pooling="last", n_batch=100, n_threads=2))
        embedders += [mean, last]
        assert (mean.info.pooling, mean.info.n_batch, mean.info.n_seq_max, mean.info.n_embd) == ("mean", 100, 4, N_EMBD)
        assert last.info.pooling == "last"
        tokens = backend.tokenize(TEXTS[0], add_special=True, parse_special=True)
        by_mean = np.frombuffer(mean.embed([tokens])[0], dtype="<f4")
        by_last = np.frombuffer(last.embed([tokens])[0], dtype="<f4")
        assert by_mean.shape == by_last.shape == (N_EMBD,)
        assert cosine(by_mean.astype(np.float64), by_last.astype(np.float64)) < 0.99  # another pooling
        with pytest.raises(DecodeError, match="exceed one embedding decode"):
            mean.embed([tokens] * 5)  # more inputs than sequences
        with pytest.raises(DecodeError, match="exceed one embedding decode"):
            mean.embed([[1] * 101])
        assert np.frombuffer(mean.embed([tokens])[0], dtype="<f4").tolist() == by_mean.tolist()  # it still works
    finally:
        for embedder in embedders:
            embedder.close()
        backend.close()
