"""The chat output parser: reasoning, content and tool calls, the same however the text is split."""

from __future__ import annotations

import itertools
import json

import pytest

from server.api.chat_output import (
    ChatOutputParser,
    ContentPiece,
    OutputFormat,
    ParsedMessage,
    Piece,
    ReasoningPiece,
    ToolCallArguments,
    ToolCallStart,
    fold,
    parse_output,
)

TOOLS = OutputFormat(tools=True)
REASONING = OutputFormat(reasoning=True)
BOTH = OutputFormat(reasoning=True, tools=True)
OPENED = OutputFormat(reasoning=True, starts_in_reasoning=True, tools=True)
ONE_CALL = OutputFormat(tools=True, max_calls=1)

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call>'
SPACED = '<tool_call>\n{ "name": "f", "arguments": { "a": {"b": 1} , "c": 2 } }  \n</tool_call>'
NESTED = '<tool_call>\n{"name": "f", "arguments": {"a": {"b": "}"}, "c": "</tool_"}}\n</tool_call>'
# Strings holding the closing tag itself, after an escaped quote (the instructor client's City once did).
TAG_IN_STRING = '<tool_call>\n{"name": "City", "arguments": {"name": "]]\\"</tool_call>", "n": 1}}\n</tool_call>'
TAG_IN_STRING_KEYS_SWAPPED = '<tool_call>\n{"arguments": {"s": "a</tool_call>b"}, "name": "g"}\n</tool_call>'

CASES = [
    ("Hello, world!", TOOLS),
    ("x < y and <tool is not a call", TOOLS),
    (WEATHER, TOOLS),
    ("Let me check.\n" + WEATHER, TOOLS),
    (WEATHER + "\n" + NESTED, TOOLS),
    (SPACED, TOOLS),
    (TAG_IN_STRING + " after", TOOLS),
    (TAG_IN_STRING_KEYS_SWAPPED, TOOLS),
    (TAG_IN_STRING + TAG_IN_STRING, ONE_CALL),
    (WEATHER + "\n" + NESTED, ONE_CALL),
    ('<tool_call>\n{"arguments": {"x": 1}, "name": "g"}\n</tool_call>', TOOLS),  # keys the other way round
    ("<tool_call>not json</tool_call> tail", TOOLS),
    ('<tool_call>\n{"name": "cut", "arguments": {"x": 1', TOOLS),  # cut short by max_tokens
    ("<think>\nI should answer.\n</think>\n\nThe answer.", REASONING),
    ("<think>\nPlan: call.\n</think>\n\n" + WEATHER, BOTH),
    ("still thinking\n</think>\n\nDone.", OPENED),
    ("no think tag at all", REASONING),
    ("<think>\nunterminated", REASONING),
    ("  <thin", REASONING),
    ("<think>a < b </thin k></think>ok", REASONING),
    ("Hello, world!", OutputFormat()),
]


def _ids() -> object:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def _parse_in_chunks(text: str, output_format: OutputFormat, cuts: list[int]) -> tuple[ParsedMessage, list[Piece]]:
    parser = ChatOutputParser(output_format, _ids())  # type: ignore[arg-type]
    pieces: list[Piece] = []
    bounds = [0, *cuts, len(text)]
    for start, end in itertools.pairwise(bounds):
        pieces += parser.feed(text[start:end])
    pieces += parser.finish()
    return fold(pieces), pieces


@pytest.mark.parametrize(("text", "output_format"), CASES)
def test_every_split_gives_the_same_message(text: str, output_format: OutputFormat) -> None:
    whole, _ = _parse_in_chunks(text, output_format, [])
    by_char, _ = _parse_in_chunks(text, output_format, list(range(1, len(text))))
    assert by_char == whole
    for cut in range(1, len(text)):
        assert _parse_in_chunks(text, output_format, [cut])[0] == whole, cut


@pytest.mark.parametrize(("text", "output_format"), CASES)
def test_no_partial_tag_ever_reaches_content_or_reasoning(text: str, output_format: OutputFormat) -> None:
    message, pieces = _parse_in_chunks(text, output_format, list(range(1, len(text))))
    streamed = "".join(piece.text for piece in pieces if isinstance(piece, ContentPiece))
    assert streamed == message.content
    if output_format.tools:
        assert "<tool_call>" not in message.content or "not json" in text
    if output_format.reasoning:
        assert "<think>" not in message.content and "</think>" not in message.content


def test_a_call_parses_into_name_and_arguments_json() -> None:
    message = parse_output("Let me check.\n" + WEATHER, TOOLS, _ids())  # type: ignore[arg-type]
    assert message.content == "Let me check."
    assert message.tool_calls == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": [1, 2]}'},
        }
    ]


def test_parallel_calls_and_braces_inside_arguments() -> None:
    message = parse_output(WEATHER + "\n" + NESTED, TOOLS)
    assert [call["function"]["name"] for call in message.tool_calls] == ["get_weather", "f"]
    assert json.loads(message.tool_calls[1]["function"]["arguments"]) == {"a": {"b": "}"}, "c": "</tool_"}
    assert message.content == ""
    assert len({call["id"] for call in message.tool_calls}) == 2
    assert all(call["id"].startswith("call_") for call in message.tool_calls)


def test_a_closing_tag_inside_an_argument_string_does_not_end_the_call() -> None:
    for cuts in ([], list(range(1, len(TAG_IN_STRING)))):
        message, _ = _parse_in_chunks(TAG_IN_STRING + " after", TOOLS, cuts)
        assert message.tool_calls[0]["function"]["name"] == "City"
        assert json.loads(message.tool_calls[0]["function"]["arguments"]) == {"name": ']]"</tool_call>', "n": 1}
        assert message.content == "after"
    message = parse_output(TAG_IN_STRING_KEYS_SWAPPED, TOOLS)
    assert message.tool_calls[0]["function"] == {"name": "g", "arguments": '{"s": "a</tool_call>b"}'}
    assert message.content == ""


def test_calls_beyond_max_calls_are_dropped() -> None:
    message = parse_output(WEATHER + "\n" + NESTED, ONE_CALL)
    assert [call["function"]["name"] for call in message.tool_calls] == ["get_weather"]


def test_a_call_in_another_key_order_or_not_json() -> None:
    message = parse_output('<tool_call>\n{"arguments": {"x": 1}, "name": "g"}\n</tool_call>', TOOLS)
    assert message.tool_calls[0]["function"] == {"name": "g", "arguments": '{"x": 1}'}
    message = parse_output("<tool_call>not json</tool_call> tail", TOOLS)
    assert message.tool_calls == [] and message.content == "<tool_call>not json</tool_call>tail"


def test_streamed_pieces_come_in_openai_order() -> None:
    _, pieces = _parse_in_chunks("Hi " + WEATHER, TOOLS, list(range(1, len(WEATHER) + 3)))
    kinds = [type(piece) for piece in pieces]
    assert kinds[0] is ContentPiece
    start = kinds.index(ToolCallStart)
    assert all(kind is ToolCallArguments for kind in kinds[start + 1 :])
    assert len(kinds) - start > 5  # the arguments arrive in fragments as they are written


def test_reasoning_is_split_off_and_trimmed() -> None:
    message = parse_output("<think>\nI should answer.\n</think>\n\nThe answer.", REASONING)
    assert (message.reasoning, message.content) == ("I should answer.", "The answer.")
    message = parse_output("still thinking\n</think>\n\nDone.", OPENED)
    assert (message.reasoning, message.content) == ("still thinking", "Done.")
    message = parse_output("<think>\nunterminated", REASONING)
    assert (message.reasoning, message.content) == ("unterminated", "")
    message = parse_output("<think>\nPlan: call.\n</think>\n\n" + WEATHER, BOTH)
    assert (message.reasoning, message.content) == ("Plan: call.", "")
    assert message.tool_calls[0]["function"]["name"] == "get_weather"


def test_without_reasoning_split_the_think_block_stays_in_content() -> None:
    text = "<think>\nhmm\n</think>\n\nok"
    assert parse_output(text, TOOLS).content == text
    assert parse_output(text, OutputFormat()).content == text


def test_reasoning_streams_before_its_end_is_known() -> None:
    parser = ChatOutputParser(REASONING)
    assert parser.feed("<think>\nfirst ") == [ReasoningPiece("first")]
    assert parser.feed("second </th") == [ReasoningPiece(" second")]
    assert parser.feed("ink>\n\nanswer") == [ContentPiece("answer")]
    assert parser.finish() == []
