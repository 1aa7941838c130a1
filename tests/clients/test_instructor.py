"""instructor on the official SDK: `response_model=Model` in JSON_SCHEMA mode (response_format json_schema)
and TOOLS mode (a forced tool call), with max_retries=0: the grammar must make the first answer valid,
instructor may not repair it with a second request."""

from __future__ import annotations

import instructor
import pytest
from pydantic import BaseModel

from tests.clients.counting import CountedHttp
from tests.clients.shapes import MAX_TOKENS, MODEL, PROMPTS, SHAPES
from tests.integration.conftest import LiveServer


@pytest.mark.parametrize("mode", [instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS], ids=lambda mode: mode.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.__name__)
def test_response_model_first_answer_validates(
    smollm2_server: LiveServer, counted_http: CountedHttp, mode: instructor.Mode, shape: type[BaseModel]
) -> None:
    client = instructor.from_openai(counted_http.openai_client(smollm2_server), mode=mode)
    # One call for one object: with parallel calls allowed, SmolLM2 may repeat the forced call until max_tokens
    one_call = {"parallel_tool_calls": False} if mode is instructor.Mode.TOOLS else {}
    result, completion = client.chat.completions.create_with_completion(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[shape]}],
        response_model=shape,
        max_retries=0,
        temperature=1.0,
        max_tokens=MAX_TOKENS,
        **one_call,
    )
    assert isinstance(result, shape)
    assert len(counted_http.requests) == 1
    choice = completion.choices[0]
    if mode is instructor.Mode.TOOLS:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls and choice.message.tool_calls[0].function.name == shape.__name__
        assert (
            shape.model_validate_json(choice.message.tool_calls[0].function.arguments).model_dump()
            == result.model_dump()
        )
    else:
        assert choice.finish_reason == "stop"
        assert shape.model_validate_json(choice.message.content or "").model_dump() == result.model_dump()


def test_json_schema_mode_streams_partial_objects(smollm2_server: LiveServer, counted_http: CountedHttp) -> None:
    client = instructor.from_openai(counted_http.openai_client(smollm2_server), mode=instructor.Mode.JSON_SCHEMA)
    shape = SHAPES[-1]
    partials = list(
        client.chat.completions.create_partial(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPTS[shape]}],
            response_model=shape,
            max_retries=0,
            temperature=1.0,
            max_tokens=MAX_TOKENS,
        )
    )
    assert len(partials) > 1
    shape.model_validate(partials[-1].model_dump())  # the last partial is the whole, valid object
    assert len(counted_http.requests) == 1
