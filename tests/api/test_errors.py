"""Every bad input gets an OpenAI-shaped error with the right status, and the server keeps serving."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.engine.engine import EngineConfig
from server.engine.fake_backend import FakeBackendConfig

from .helpers import MODEL, assert_openai_error, serve, sse_payloads, wait_for

pytestmark = pytest.mark.anyio

HI = [{"role": "user", "content": "hi"}]


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, **fields}


CHAT_BAD_BODIES = [
    # (body, param) — each a 400 invalid_request_error
    ({"model": MODEL}, "messages"),
    (chat_body(messages=[]), "messages"),
    (chat_body(messages="hi"), "messages"),
    (chat_body(messages=[{"content": "hi"}]), "messages[0].role"),
    (chat_body(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (chat_body(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (chat_body(messages=[{"role": "user"}]), "messages[0]"),
    (
        chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        "messages[0].content[0]",
    ),
    (chat_body(max_tokens=-1), "max_tokens"),
    (chat_body(max_tokens=0), "max_tokens"),
    (chat_body(max_tokens="5"), "max_tokens"),
    (chat_body(max_tokens=2.5), "max_tokens"),
    (chat_body(max_completion_tokens=-3), "max_completion_tokens"),
    (chat_body(temperature=2.5), "temperature"),
    (chat_body(temperature="hot"), "temperature"),
    (chat_body(top_p=1.5), "top_p"),
    (chat_body(n=0), "n"),
    (chat_body(stream="yes"), "stream"),
    (chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat_body(stop=7), "stop"),
    (chat_body(presence_penalty=-2.5), "presence_penalty"),
    (chat_body(frequency_penalty=2.5), "frequency_penalty"),
    (chat_body(logit_bias={"abc": 1}), "logit_bias"),
    (chat_body(logit_bias={"5": 101}), "logit_bias.5"),
    (chat_body(logit_bias={"99999": 1}), "logit_bias"),
    (chat_body(top_logprobs=21, logprobs=True), "top_logprobs"),
    (chat_body(top_logprobs=2), "top_logprobs"),
    (chat_body(top_k=-1), "top_k"),
    (chat_body(min_p=2), "min_p"),
    (chat_body(repeat_penalty=0), "repeat_penalty"),
    (chat_body(tools=[{"type": "function", "function": {"name": "no spaces"}}]), "tools[0].function.name"),
    (chat_body(tools=[{"type": "retrieval"}]), "tools[0].type"),
    (chat_body(tool_choice="required"), "tool_choice"),  # tool_choice without tools
    (chat_body(functions=[{"name": "f"}]), "functions"),
    (chat_body(reasoning_format="xml"), "reasoning_format"),
    (chat_body(chat_template_kwargs={"messages": []}), "chat_template_kwargs"),
    (chat_body(response_format={"type": "xml"}), "response_format"),
    (chat_body(response_format={"type": "json_schema"}), "response_format"),
    (chat_body(n=5), "n"),  # more choices than the fake's 4 slots
]


@pytest.mark.parametrize(("body", "param"), CHAT_BAD_BODIES)
async def test_bad_chat_request_is_400_with_its_param(body: dict[str, Any], param: str | None) -> None:
    async with serve() as served:
        response = await served.client.post("/v1/chat/completions", json=body)
        error = assert_openai_error(response, 400, param=param)
        assert error["type"] == "invalid_request_error"
        assert (await served.client.post("/v1/chat/completions", json=chat_body(max_tokens=2))).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [True, False]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 99999]}, "prompt"),  # a token id outside the vocabulary
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # nothing to return without echo
        ({"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens"),
    ],
)
async def test_bad_completion_request_is_400(body: dict[str, Any], param: str | None) -> None:
    async with serve() as served:
        assert_openai_error(await served.client.post("/v1/completions", json=body), 400, param=param)


async def test_malformed_json_and_non_object_bodies() -> None:
    async with serve() as served:
        for raw in (b"{not json", b"", b"[1, 2]", b'"text"'):
            response = await served.client.post(
                "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
            )
            assert_openai_error(response, 400)
        response = await served.client.post(
            "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
        )
        assert "JSON" in assert_openai_error(response, 400, code="invalid_json")["message"]


async def test_unknown_model_is_404() -> None:
    async with serve() as served:
        response = await served.client.post("/v1/chat/completions", json=chat_body(model="gpt-4"))
        error = assert_openai_error(response, 404, param="model", code="model_not_found")
        assert "gpt-4" in error["message"] and MODEL in error["message"]
        response = await served.client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert_openai_error(response, 404, param="model", code="model_not_found")
        assert_openai_error(await served.client.get("/v1/models/nope"), 404, param="model", code="model_not_found")


async def test_prompt_too_long_is_400_context_length_exceeded() -> None:
    async with serve(FakeBackendConfig(n_ctx_per_slot=64)) as served:
        long_chat = chat_body(messages=[{"role": "user", "content": "x" * 100}])
        response = await served.client.post("/v1/chat/completions", json=long_chat)
        assert_openai_error(response, 400, param="messages", code="context_length_exceeded")
        response = await served.client.post("/v1/completions", json={"prompt": "x" * 100})
        assert_openai_error(response, 400, param="prompt", code="context_length_exceeded")
        response = await served.client.post("/v1/chat/completions", json=chat_body(max_tokens=60))
        assert_openai_error(response, 400, param="max_tokens", code="context_length_exceeded")


async def test_unknown_route_and_wrong_method() -> None:
    async with serve() as served:
        assert_openai_error(await served.client.get("/v1/nothing"), 404, code="not_found")
        response = await served.client.get("/v1/chat/completions")
        assert_openai_error(response, 405, code="method_not_allowed")
        assert response.headers["allow"] == "POST"


async def test_queue_full_is_429_with_retry_after() -> None:
    slow = FakeBackendConfig(n_slots=1, step_delay_s=0.01)
    async with serve(slow, EngineConfig(max_queue=1)) as served:
        body = chat_body(max_tokens=20)
        running = asyncio.create_task(served.client.post("/v1/chat/completions", json=body))
        await wait_for(lambda: served.engine.stats().n_slots_busy == 1)
        waiting = asyncio.create_task(served.client.post("/v1/chat/completions", json=body))
        await wait_for(lambda: served.engine.stats().n_requests_waiting == 1)
        refused = await served.client.post("/v1/chat/completions", json=body)
        assert_openai_error(refused, 429, code="queue_full")
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert int(refused.headers["retry-after"]) >= 1
        assert (await running).status_code == 200 and (await waiting).status_code == 200


async def test_decode_failure_before_output_is_a_500() -> None:
    # The chat prompt holds "u" (from "user"), so its prefill fails: nothing was generated yet.
    async with serve(FakeBackendConfig(fail_on_token=ord("u"))) as served:
        response = await served.client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
        assert_openai_error(response, 500, code="decode_failed")
        response = await served.client.post("/v1/chat/completions", json=chat_body(max_tokens=3, stream=True))
        assert_openai_error(response, 500, code="decode_failed")  # an HTTP error, not a stream
        ok = await served.client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
        assert ok.status_code == 200  # a prompt without the poisoned token still works
        assert served.engine.stats().n_decode_errors == 2


async def test_decode_failure_mid_stream_is_an_error_event_then_done() -> None:
    # logit_bias forces "A"; feeding that "A" back in the next step fails, after one token was streamed.
    async with serve(FakeBackendConfig(fail_on_token=ord("A"))) as served:
        body = chat_body(max_tokens=5, temperature=0, stream=True, logit_bias={str(ord("A")): 100})
        response = await served.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        payloads = sse_payloads(response.text)
        assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": "A"}
        assert set(payloads[-2]) == {"error"} and payloads[-2]["error"]["code"] == "decode_failed"
        assert payloads[-1] == "[DONE]"
        assert (await served.client.post("/v1/completions", json={"prompt": "xyz", "max_tokens": 2})).status_code == 200


async def test_timeout_is_504() -> None:
    slow = FakeBackendConfig(step_delay_s=0.01)
    async with serve(slow, EngineConfig(request_timeout_s=0.1)) as served:
        response = await served.client.post("/v1/chat/completions", json=chat_body(max_tokens=200))
        assert_openai_error(response, 504, code="request_timeout")


async def test_an_unexpected_exception_is_a_logged_500_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serve() as served:

        def broken_slots() -> list[Any]:
            raise RuntimeError("boom")

        served.engine.slots = broken_slots  # type: ignore[method-assign]
        response = await served.client.get("/slots")
        error = assert_openai_error(response, 500, code="internal_error")
        assert "boom" not in error["message"]  # internals stay in the log
        assert "boom" in caplog.text and "Traceback" in caplog.text
        assert (await served.client.get("/v1/models")).status_code == 200


async def test_template_that_raises_is_400_with_its_message() -> None:
    template = "{{ raise_exception('Conversation roles must alternate') }}"
    async with serve(FakeBackendConfig(chat_template=template)) as served:
        response = await served.client.post("/v1/chat/completions", json=chat_body())
        error = assert_openai_error(response, 400, param="messages")
        assert "Conversation roles must alternate" in error["message"]


async def test_api_key() -> None:
    async with serve(api_key="sekret") as served:
        assert_openai_error(await served.client.get("/v1/models"), 401, code="invalid_api_key")
        wrong = {"Authorization": "Bearer nope"}
        assert_openai_error(await served.client.get("/v1/models", headers=wrong), 401, code="invalid_api_key")
        response = await served.client.post("/v1/chat/completions", json={"messages": 1}, headers=wrong)
        assert_openai_error(response, 401)  # the key is checked before the body
        right = {"Authorization": "Bearer sekret"}
        assert (await served.client.get("/v1/models", headers=right)).status_code == 200
        assert (await served.client.get("/metrics", headers=right)).status_code == 200
        assert (await served.client.get("/health")).status_code == 200  # load balancers have no key
