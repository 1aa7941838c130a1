"""The official openai SDK's structured-output helpers: `chat.completions.parse(response_format=Model)` and
the streaming `chat.completions.stream(...)`, which send the model's strict JSON schema and validate the
answer into the model on the client side. A grammar-constrained answer must pass that validation."""

from __future__ import annotations

import openai
import pytest
from pydantic import BaseModel

from tests.clients.shapes import MAX_TOKENS, MODEL, PROMPTS, SHAPES, City, Contact, Person


def _messages(shape: type[BaseModel]) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[shape]}]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.__name__)
def test_parse_returns_a_validated_instance(client: openai.OpenAI, shape: type[BaseModel]) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=_messages(shape),  # type: ignore[arg-type]
        response_format=shape,
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, shape)
    assert choice.message.refusal is None
    # the SDK's object is the server's text, validated: nothing was lost or filled in on the way
    assert shape.model_validate_json(choice.message.content or "") == choice.message.parsed


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.__name__)
def test_parse_every_one_of_three_choices_at_temperature_one(client: openai.OpenAI, shape: type[BaseModel]) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=_messages(shape),  # type: ignore[arg-type]
        response_format=shape,
        temperature=1.0,
        n=3,
        max_tokens=MAX_TOKENS,
    )
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, shape)
    # at temperature 1.0 the three answers are samples, not copies of one answer
    assert len({choice.message.content for choice in completion.choices}) > 1


@pytest.mark.parametrize("shape", [Person, Contact], ids=lambda shape: shape.__name__)
def test_stream_helper_parses_partial_and_final_objects(client: openai.OpenAI, shape: type[BaseModel]) -> None:
    deltas: list[str] = []
    partials = 0
    done_events = []
    with client.chat.completions.stream(
        model=MODEL,
        messages=_messages(shape),  # type: ignore[arg-type]
        response_format=shape,
        temperature=1.0,
        max_tokens=MAX_TOKENS,
    ) as stream:
        for event in stream:
            if event.type == "content.delta":
                deltas.append(event.delta)
                partials += event.parsed is not None  # the SDK parses the JSON as it grows
            elif event.type == "content.done":
                done_events.append(event)
        final = stream.get_final_completion()
    assert len(deltas) > 1 and partials > 0
    assert len(done_events) == 1 and isinstance(done_events[0].parsed, shape)
    choice = final.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, shape)
    assert choice.message.content == "".join(deltas)
    assert choice.message.parsed == done_events[0].parsed


def test_streamed_three_choices_at_temperature_one_all_parse(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=_messages(Person),  # type: ignore[arg-type]
        response_format=Person,
        temperature=1.0,
        n=3,
        max_tokens=MAX_TOKENS,
    ) as stream:
        final = stream.get_final_completion()
    assert sorted(choice.index for choice in final.choices) == [0, 1, 2]
    for choice in final.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Person)


def test_parse_usage_counts_the_constrained_tokens(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=_messages(City),
        response_format=City,
        temperature=0,
        max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
    )
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens < MAX_TOKENS
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
