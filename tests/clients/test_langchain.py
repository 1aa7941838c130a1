"""langchain-openai's ChatOpenAI against the server: `with_structured_output` (json_schema and json_mode)
and `bind_tools` with a forced tool, each answered on the first request."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.clients.counting import CountedHttp
from tests.clients.shapes import MAX_TOKENS, MODEL, PROMPTS, SHAPES, City
from tests.integration.conftest import LiveServer


def chat_model(server: LiveServer, http: CountedHttp, **options: Any) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=server.api_url,
        api_key="unused",  # type: ignore[arg-type]
        model=MODEL,
        max_retries=0,
        http_client=http.client,
        **{"temperature": 0, "max_tokens": MAX_TOKENS, **options},
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.__name__)
def test_structured_output_json_schema(
    smollm2_server: LiveServer, counted_http: CountedHttp, shape: type[BaseModel]
) -> None:
    structured = chat_model(smollm2_server, counted_http, temperature=1.0).with_structured_output(
        shape, method="json_schema", include_raw=True
    )
    result = structured.invoke([HumanMessage(PROMPTS[shape])])
    assert isinstance(result, dict) and result["parsing_error"] is None, result
    assert isinstance(result["parsed"], shape)
    raw = result["raw"]
    assert isinstance(raw, AIMessage) and raw.response_metadata["finish_reason"] == "stop"
    assert len(counted_http.requests) == 1
    sent = json.loads(counted_http.requests[0].content)
    assert sent["response_format"]["type"] == "json_schema"  # LangChain asked for the strict schema


class CityCountry(BaseModel):
    city: str
    country: str


def test_structured_output_json_mode(smollm2_server: LiveServer, counted_http: CountedHttp) -> None:
    # json_mode only promises a JSON object (the prompt carries the shape), so a greedy answer to a prompt
    # SmolLM2 can follow: the grammar makes it an object, the model picks the keys
    structured = chat_model(smollm2_server, counted_http).with_structured_output(CityCountry, method="json_mode")
    result = structured.invoke('Repeat this JSON: {"city": "Paris", "country": "France"}')
    assert isinstance(result, CityCountry)
    assert len(counted_http.requests) == 1
    assert json.loads(counted_http.requests[0].content)["response_format"] == {"type": "json_object"}


def test_structured_output_json_mode_without_a_schema_is_an_object(
    smollm2_server: LiveServer, counted_http: CountedHttp
) -> None:
    # greedy: at temperature 1 a 135M model may wander inside a string until max_tokens (the grammar allows any
    # object), which would test the model, not the route
    structured = chat_model(smollm2_server, counted_http).with_structured_output(None, method="json_mode")
    for prompt in ("Describe a cat.", "List three fruits.", "What is 2 + 2?"):
        assert isinstance(structured.invoke(prompt), dict)  # whatever the question, the answer is an object
    assert len(counted_http.requests) == 3


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(max_length=24, description="The city, e.g. Paris")
    unit: str = Field(json_schema_extra={"enum": ["celsius", "fahrenheit"]})


class Multiply(BaseModel):
    """Multiply two integers."""

    a: int
    b: int


TOOLS = [GetWeather, Multiply]


def _tool_schema(tool: type[BaseModel]) -> dict[str, Any]:
    return convert_to_openai_tool(tool)["function"]["parameters"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("tool", TOOLS, ids=lambda tool: tool.__name__)
def test_bind_tools_with_a_forced_tool_returns_a_schema_valid_call(
    smollm2_server: LiveServer, counted_http: CountedHttp, tool: type[BaseModel]
) -> None:
    bound = chat_model(smollm2_server, counted_http, temperature=1.0).bind_tools(
        TOOLS,
        tool_choice=tool.__name__,
        parallel_tool_calls=False,  # one call: SmolLM2 may repeat it otherwise
    )
    message = bound.invoke("What is the weather in Paris, and what is 6 times 7?")
    assert isinstance(message, AIMessage)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == tool.__name__ and call["id"]
    jsonschema.validate(call["args"], _tool_schema(tool))
    tool.model_validate(call["args"])
    assert message.invalid_tool_calls == []


def test_bind_tools_required_then_a_follow_up_turn(smollm2_server: LiveServer, counted_http: CountedHttp) -> None:
    model = chat_model(smollm2_server, counted_http)
    question = HumanMessage("What is 6 times 7? Use the tool.")
    # LangChain's "any" is OpenAI's "required"
    first = model.bind_tools([Multiply], tool_choice="any", parallel_tool_calls=False).invoke([question])
    assert isinstance(first, AIMessage) and first.tool_calls
    call = first.tool_calls[0]
    assert call["name"] == "Multiply"
    arguments = Multiply.model_validate(call["args"])
    result = ToolMessage(str(arguments.a * arguments.b), tool_call_id=call["id"] or "")
    # the assistant's tool call and the tool's answer go back through the chat template
    second = model.bind_tools([Multiply]).invoke([question, first, result])
    assert isinstance(second, AIMessage)
    assert second.response_metadata["finish_reason"] in ("stop", "tool_calls", "length")
    sent = json.loads(counted_http.requests[-1].content)
    assert [message["role"] for message in sent["messages"]] == ["user", "assistant", "tool"]


def test_structured_output_via_function_calling(smollm2_server: LiveServer, counted_http: CountedHttp) -> None:
    structured = chat_model(smollm2_server, counted_http).with_structured_output(City, method="function_calling")
    city = structured.invoke(PROMPTS[City])
    assert isinstance(city, City)
    assert len(counted_http.requests) == 1
