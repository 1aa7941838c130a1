"""POST /tokenize and /detokenize (llama-server's shapes), and /tokenize of chat messages for a context meter."""

from __future__ import annotations

import threading

import httpx
import pytest

from server.api.state import app_server_state
from server.app import create_app
from server.engine.engine import Engine, EngineConfig
from server.engine.fake_backend import BOS, IM_END, IM_START, N_VOCAB, FakeBackend, FakeBackendConfig
from server.settings import Settings

from .helpers import MODEL, assert_openai_error, serve, wait_for

pytestmark = pytest.mark.anyio

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Was ist größer, 2 oder 3? 🙂"},
]


async def test_tokenize_then_detokenize_round_trips() -> None:
    text = "<|im_start|>Grüße 🙂"
    async with serve() as served:
        response = await served.client.post("/tokenize", json={"content": text})
        assert response.status_code == 200, response.text
        tokens = response.json()["tokens"]
        # special tokens written in the text are parsed; non-ASCII is its UTF-8 bytes in the fake vocabulary
        assert tokens == [IM_START, *"Grüße 🙂".encode()]
        assert response.json() == {"tokens": tokens}
        back = await served.client.post("/detokenize", json={"tokens": tokens[1:]})
        assert back.status_code == 200 and back.json() == {"content": "Grüße 🙂"}


async def test_add_special_and_pieces() -> None:
    # a model that adds BOS, to tell add_special apart
    async with serve(FakeBackendConfig(add_bos=True)) as served:
        plain = (await served.client.post("/tokenize", json={"content": "ü"})).json()["tokens"]
        special = (await served.client.post("/tokenize", json={"content": "ü", "add_special": True})).json()
        assert plain == list("ü".encode()) and special["tokens"] == [BOS, *plain]
        pieces = (await served.client.post("/tokenize", json={"content": "aü", "with_pieces": True})).json()
        # a piece that is not valid UTF-8 on its own (half of 'ü') is shown as its bytes, as llama-server does
        assert pieces == {
            "tokens": [{"id": 97, "piece": "a"}, {"id": 0xC3, "piece": [0xC3]}, {"id": 0xBC, "piece": [0xBC]}]
        }


async def test_messages_count_equals_the_chat_prompt_tokens() -> None:
    async with serve() as served:
        response = await served.client.post("/tokenize", json={"messages": MESSAGES})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["n_tokens"] == len(body["tokens"]) and body["n_ctx"] == served.engine.info.n_ctx_per_slot
        chat = await served.client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
        )
        assert body["n_tokens"] == chat.json()["usage"]["prompt_tokens"]
        without = (
            await served.client.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False})
        ).json()
        # the generation prompt is "<|im_start|>assistant\n": the control token plus the 10 bytes of the text
        assert without["tokens"] == body["tokens"][: -len("assistant\n") - 1]
        assert without["tokens"][-2:] == [IM_END, ord("\n")]
        pieces = (await served.client.post("/tokenize", json={"messages": MESSAGES, "with_pieces": True})).json()
        assert [token["id"] for token in pieces["tokens"]] == body["tokens"] and pieces["n_tokens"] == body["n_tokens"]


async def test_bad_requests_are_openai_errors() -> None:
    async with serve() as served:
        post = served.client.post
        assert_openai_error(await post("/tokenize", json={}), 400)
        assert_openai_error(await post("/tokenize", json={"content": "a", "messages": MESSAGES}), 400)
        assert_openai_error(await post("/tokenize", json={"content": 5}), 400, param="content")
        assert_openai_error(await post("/tokenize", json={"messages": []}), 400, param="messages")
        bad_role = await post("/tokenize", json={"messages": [{"role": "bot", "content": "x"}]})
        assert_openai_error(bad_role, 400, param="messages[0].role")
        error = assert_openai_error(await post("/detokenize", json={"tokens": [65, N_VOCAB, -1]}), 400, param="tokens")
        assert str(N_VOCAB) in error["message"]
        assert_openai_error(await post("/detokenize", json={"tokens": ["65"]}), 400, param="tokens[0]")
        assert_openai_error(await post("/detokenize", json={}), 400, param="tokens")


async def test_api_key_and_loading() -> None:
    async with serve(api_key="sekret") as served:
        for path, body in (("/tokenize", {"content": "a"}), ("/detokenize", {"tokens": [65]})):
            assert_openai_error(await served.client.post(path, json=body), 401, code="invalid_api_key")
            authorized = await served.client.post(path, json=body, headers={"Authorization": "Bearer sekret"})
            assert authorized.status_code == 200, authorized.text

    release = threading.Event()

    def slow_factory() -> Engine:
        assert release.wait(timeout=30)
        return Engine(FakeBackend(), EngineConfig())

    app = create_app(Settings(served_model_name=MODEL), engine_factory=slow_factory)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        for path, body in (("/tokenize", {"messages": MESSAGES}), ("/detokenize", {"tokens": [65]})):
            assert_openai_error(await client.post(path, json=body), 503, code="unavailable")
        release.set()
        await wait_for(lambda: app_server_state(app).status == "ready")
        assert (await client.post("/detokenize", json={"tokens": [65]})).json() == {"content": "A"}
