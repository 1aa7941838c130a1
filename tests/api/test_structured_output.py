"""response_format over the fake backend: which formats are accepted, the 400s that name what cannot be
enforced, and that the compiled grammar reaches every choice's sampler (the live tests check the real
model's answers against the schema)."""

from __future__ import annotations

from typing import Any

import pytest

from bindings.grammar import JSON_OBJECT_GRAMMAR, schema_grammar

from .helpers import MODEL, assert_openai_error, serve, sse_payloads

pytestmark = pytest.mark.anyio

HI = [{"role": "user", "content": "hi"}]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "size": {"type": "integer"}},
    "required": ["city", "size"],
    "additionalProperties": False,
}


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("stream", [False, True])
async def test_json_schema_grammar_reaches_every_choice_sampler(stream: bool) -> None:
    async with serve() as served:
        body = {"model": MODEL, "messages": HI, "response_format": schema_format(SCHEMA), "n": 3, "stream": stream}
        response = await served.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        if stream:
            assert sse_payloads(response.text)[-1] == "[DONE]"
        else:
            assert len(response.json()["choices"]) == 3
        expected = schema_grammar(SCHEMA)
        assert served.backend.grammars == [expected] * 3
        assert 'root ::= "{" space city-kv "," space size-kv "}" space' in expected


async def test_json_object_uses_the_json_grammar_and_text_uses_none() -> None:
    async with serve() as served:
        for response_format in ({"type": "json_object"}, {"type": "text"}, None):
            body = {"model": MODEL, "messages": HI, "response_format": response_format, "max_tokens": 4}
            response = await served.client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
        assert served.backend.grammars == [JSON_OBJECT_GRAMMAR]


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "integer", "minimum": 0}, "minimum"),
        ({"type": "string", "format": "email"}, "email"),
        ({"type": "string", "pattern": "^a+$"}, "pattern"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 2}}}, "properties.a"),
        ({"type": "object", "properties": {}, "required": ["a"]}, "required"),
        ({"not": {"type": "string"}}, "not"),
        ({"$ref": "https://example.com/s.json"}, "example.com"),
        ({"type": "decimal"}, "decimal"),
    ],
)
async def test_unsupported_schema_feature_is_a_400_naming_it(schema: dict[str, Any], named: str) -> None:
    async with serve() as served:
        body = {"model": MODEL, "messages": HI, "response_format": schema_format(schema)}
        response = await served.client.post("/v1/chat/completions", json=body)
        error = assert_openai_error(response, 400, param="response_format")
        assert named in error["message"]
        assert served.backend.grammars == []  # refused before anything reached the engine


@pytest.mark.parametrize(
    "response_format",
    [{"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}],
)
async def test_malformed_response_format_is_a_400(response_format: dict[str, Any]) -> None:
    async with serve() as served:
        body = {"model": MODEL, "messages": HI, "response_format": response_format}
        response = await served.client.post("/v1/chat/completions", json=body)
        assert_openai_error(response, 400, param="response_format")


async def test_completions_route_constrains_and_refuses_like_the_chat_route() -> None:
    async with serve() as served:
        body = {"model": MODEL, "prompt": "hi", "response_format": schema_format(SCHEMA), "n": 2, "max_tokens": 4}
        response = await served.client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert served.backend.grammars == [schema_grammar(SCHEMA)] * 2
        body["response_format"] = schema_format({"type": "integer", "minimum": 0})
        response = await served.client.post("/v1/completions", json=body)
        assert "minimum" in assert_openai_error(response, 400, param="response_format")["message"]
        assert len(served.backend.grammars) == 2
