"""Fuzz of the HTTP API with schemathesis, from the app's own OpenAPI document (/openapi.json), in-process
over the FakeBackend engine (fast and deterministic): every operation in the document gets schema-valid
requests, and those with a body schema-violating ones too. Checks: never a 5xx; every 4xx is an OpenAI error
body {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}; every status and body
is one the document declares. Then random JSON-schema-like documents as `response_format` and as tool
parameters, which reach the grammar converter: an answer or an OpenAI 400, never a crash. Derandomized."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import jsonschema
import pydantic
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    CheckContext,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import Failure
from schemathesis.core.transport import Response

from server.api.schemas import ChatMessage
from server.api.state import app_server_state
from server.app import create_app
from server.engine.engine import Engine, EngineConfig
from server.engine.fake_backend import FakeBackend, FakeBackendConfig
from server.engine.fake_embedder import FakeEmbedder
from server.settings import Settings

from .helpers import serve

MODEL = "fake-model"
EXAMPLES_PER_OPERATION = 100
SCHEMA_EXAMPLES = 300
# Every operation the document must describe: a route missing from it would go unfuzzed.
OPERATIONS = {
    "GET /health",
    "GET /slots",
    "GET /plan",
    "GET /metrics",
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /tokenize",
    "POST /detokenize",
    "POST /v1/embeddings",
    "GET /ui/api/whoami",
    "GET /ui/api/stats",
}


class NotAnOpenAIError(Failure):
    """A 4xx whose body is not {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, *, operation: str, status_code: int, problem: str) -> None:
        super().__init__(
            operation=operation,
            code="not_an_openai_error",
            title="4xx body is not an OpenAI error",
            message=f"{status_code}: {problem}",
        )


def _error_shape_problem(body: Any) -> str | None:
    """What is wrong with an error body, or None when it is OpenAI's shape."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return f"no 'error' object in {body!r}"
    error = body["error"]
    if set(error) != {"message", "type", "param", "code"}:
        return f"error keys are {sorted(error)}"
    if not isinstance(error["message"], str) or not error["message"]:
        return f"message is {error['message']!r}"
    if not isinstance(error["type"], str) or not error["type"]:
        return f"type is {error['type']!r}"
    if not all(error[key] is None or isinstance(error[key], str) for key in ("param", "code")):
        return f"param/code are {error['param']!r}/{error['code']!r}"
    return None


def openai_shaped_client_errors(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A schemathesis check: every 4xx answer is an OpenAI error body."""
    if not 400 <= response.status_code < 500:
        return None
    try:
        body = response.json()
    except ValueError:
        body = response.text
    problem = _error_shape_problem(body)
    if problem is not None:
        raise NotAnOpenAIError(operation=case.operation.label, status_code=response.status_code, problem=problem)
    return None


@pytest.fixture
def api_schema() -> schemathesis.schemas.BaseSchema:
    """The app over the fake engine (with a fake embedder, so /v1/embeddings serves), its document loaded,
    the engine ready. Per test: schemathesis' pytest plugin ends every ASGI lifespan it started when a test
    ends, so each test serves a fresh app."""
    backend = FakeBackend(FakeBackendConfig(n_slots=4, n_ctx_per_slot=256))
    engine = Engine(backend, EngineConfig(), embedder=FakeEmbedder(backend=backend))
    app = create_app(Settings(served_model_name=MODEL, embeddings=True), engine_factory=lambda: engine)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # this starts the app's lifespan
    deadline = time.monotonic() + 30
    while app_server_state(app).status != "ready":
        assert time.monotonic() < deadline, app_server_state(app).status
        time.sleep(0.01)
    return schema


def test_the_document_describes_every_route_and_request_body(api_schema: schemathesis.schemas.BaseSchema) -> None:
    document = api_schema.raw_schema
    described = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    assert described == OPERATIONS
    for path, item in document["paths"].items():
        if "post" in item:  # FastAPI describes a body from its pydantic model: the fuzz needs it to aim
            body = item["post"]["requestBody"]["content"]["application/json"]["schema"]
            assert body.get("$ref", "").startswith("#/components/schemas/"), path
        for method, operation in item.items():  # errors are documented as they are answered: OpenAI's shape
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            for status in ("400", "4XX", "5XX"):
                error = responses[status]["content"]["application/json"]["schema"]["properties"]["error"]
                assert error["required"] == ["message", "type", "param", "code"], (method, path)


# (message, whether the server accepts it): the document must say what validation says, or the fuzz's
# "schema-valid" bodies are 400s (and a client generating from the document sends them).
MESSAGES = [
    ({"role": "user", "content": "hi"}, True),
    ({"role": "user", "content": [{"type": "text", "text": "hi"}]}, True),
    ({"role": "assistant"}, True),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}, True),
    ({"role": "tool", "content": "42", "tool_call_id": "c"}, True),
    ({"role": "user"}, False),
    ({"role": "tool", "content": None, "tool_call_id": "c"}, False),
    ({"role": "user", "content": [{"type": "image_url"}]}, False),
    ({"role": "user", "content": [{"type": "text"}]}, False),
    ({"role": "user", "content": [{"type": "text", "text": None}]}, False),
]


@pytest.mark.parametrize(("message", "accepted"), MESSAGES)
def test_the_document_and_validation_agree_on_a_message(
    api_schema: schemathesis.schemas.BaseSchema, message: dict[str, Any], accepted: bool
) -> None:
    document = api_schema.raw_schema
    schema = {"$ref": "#/components/schemas/ChatMessage", "components": document["components"]}
    assert jsonschema.Draft202012Validator(schema).is_valid(message) is accepted
    try:
        ChatMessage.model_validate(message)
    except pydantic.ValidationError:
        assert not accepted
    else:
        assert accepted


def _serving_model(case: Case) -> Case:
    """A body naming a model names the served one: another id is a 404 before anything else is looked at,
    which would leave the rest of the body unfuzzed (GET /v1/models/{model_id} fuzzes model ids)."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL
    return case


# No 5xx; every 4xx OpenAI-shaped; and every answer is one the document declares, with the body it declares.
CHECKS = [not_a_server_error, openai_shaped_client_errors, status_code_conformance, response_schema_conformance]

# Schema-valid requests for every operation; schema-violating ones where there is something to violate (a GET
# without parameters has none, and a path parameter is any string).
FUZZ_RUNS = [(operation, GenerationMode.POSITIVE) for operation in sorted(OPERATIONS)] + [
    (operation, GenerationMode.NEGATIVE) for operation in sorted(OPERATIONS) if operation.startswith("POST")
]


@pytest.mark.parametrize(("operation", "mode"), FUZZ_RUNS, ids=[f"{op}-{mode.value}" for op, mode in FUZZ_RUNS])
def test_fuzz_no_server_errors_and_openai_shaped_client_errors(
    api_schema: schemathesis.schemas.BaseSchema, operation: str, mode: GenerationMode
) -> None:
    method, path = operation.split(" ", 1)
    api_operation = api_schema[path][method]
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=api_operation.as_strategy(generation_mode=mode).map(_serving_model))
    def fuzz(case: Case) -> None:
        response = case.call()
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    fuzz()
    assert not statuses.keys() - {200, 400, 404}, statuses  # no 5xx (the checks), nor 401/429/503 here
    if method == "POST" and mode is GenerationMode.POSITIVE:
        assert statuses[200] > 0, statuses  # the fuzz gets past validation into the engine, not only 400s


# --- response_format and tools: random JSON-schema-like documents reach the grammar converter ------------

_keywords = st.sampled_from(
    [
        "type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs",
        "minItems", "maxItems", "minLength", "maxLength", "format", "additionalProperties", "pattern", "minimum",
        "prefixItems", "not", "title", "definitions", "uniqueItems",
    ]
)  # fmt: skip
_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_keyword_values = st.one_of(
    _json_values,
    st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null", "tuple"]),
    st.lists(st.sampled_from(["string", "null", "integer"]), max_size=3),
    st.sampled_from(["#", "#/$defs/a", "#/definitions/a", "#/nope", "#/properties/a", "https://example.com/s", "a"]),
    st.sampled_from(["date", "time", "date-time", "uuid", "email", "uri"]),
)
schemas_ish = st.recursive(
    st.dictionaries(_keywords, _keyword_values, max_size=4),
    lambda inner: st.one_of(
        st.dictionaries(_keywords, inner | _keyword_values, max_size=4),
        st.builds(lambda props, req: {"type": "object", "properties": props, "required": req},
                  st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3),
                  st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=3)),
        st.builds(lambda item, defs: {"type": "array", "items": item, "$defs": defs},
                  inner, st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2)),
        st.lists(inner, min_size=1, max_size=3).map(lambda options: {"anyOf": options}),
    ),
    max_leaves=12,
)  # fmt: skip


def _chat_body(schema: Any, as_tool: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    if as_tool:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
        body["tool_choice"] = "required"  # the tool-call grammar is built from the parameters' schema
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    return body


@pytest.mark.parametrize("as_tool", [False, True], ids=["response_format", "tools"])
def test_random_schemas_get_an_answer_or_an_openai_400(as_tool: bool) -> None:
    backend = FakeBackend(FakeBackendConfig(n_slots=4, n_ctx_per_slot=4096))  # room for the rendered tools
    engine = Engine(backend, EngineConfig())
    app = create_app(Settings(served_model_name=MODEL), engine_factory=lambda: engine)
    statuses: Counter[int] = Counter()
    with TestClient(app) as client:

        @settings(max_examples=SCHEMA_EXAMPLES, deadline=None, derandomize=True, database=None)
        @given(schema=schemas_ish)
        def fuzz(schema: Any) -> None:
            response = client.post("/v1/chat/completions", json=_chat_body(schema, as_tool))
            statuses[response.status_code] += 1
            assert response.status_code in (200, 400), (schema, response.text)
            if response.status_code == 400:
                assert _error_shape_problem(response.json()) is None, response.text
                assert response.json()["error"]["param"] in ("response_format", "tools"), response.text

        fuzz()
    assert statuses[200] > 0 and statuses[400] > 0, statuses  # both supported and refused schemas were drawn


# --- what the fuzz found, pinned ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "extreme",
    [
        {"top_p": 0.0},  # the fake kept no token at all (NaN probabilities); llama.cpp keeps the most likely
        {"repeat_penalty": 5e-324},  # a repeated token's logit overflowed to inf (NaN probabilities)
    ],
    ids=["top_p-0", "repeat_penalty-tiny"],
)
async def test_extreme_sampling_values_still_sample(extreme: dict[str, float]) -> None:
    async with serve() as served:
        body = {"prompt": "ab ab ab ab", "max_tokens": 8, "temperature": 1.0, "seed": 1, **extreme}
        response = await served.client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] > 0
