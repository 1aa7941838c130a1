"""OpenAI response objects, built as plain dicts (a streamed token must cost microseconds, not a pydantic
model): chat completions and their chunks, legacy text completions and theirs, both logprob formats."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bindings.protocol import TokenLogprob
from server.api.chat_output import (
    ChatOutputParser,
    ContentPiece,
    OutputFormat,
    ParsedMessage,
    Piece,
    ReasoningPiece,
    ToolCallStart,
    new_call_id,
    parse_output,
)
from server.api.generation import ChoiceResult, finish_reason_text
from server.engine.request import FinishReason, TokenEvent

PLAIN_TEXT = OutputFormat()


def token_string(raw: bytes) -> str:
    """A token's text; a token holding part of a UTF-8 character shows U+FFFD (its `bytes` are exact)."""
    return raw.decode("utf-8", errors="replace")


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": token_string(entry.text),
                "logprob": entry.logprob,
                "bytes": list(entry.text),
                "top_logprobs": [
                    {"token": token_string(top.text), "logprob": top.logprob, "bytes": list(top.text)}
                    for top in entry.top
                ],
            }
            for entry in logprobs
        ]
    }


def completion_logprobs(logprobs: Sequence[TokenLogprob], text_offset: int) -> tuple[dict[str, Any], int]:
    """The legacy format (parallel lists), and the text offset after these tokens."""
    tokens = [token_string(entry.text) for entry in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    body = {
        "tokens": tokens,
        "token_logprobs": [entry.logprob for entry in logprobs],
        "top_logprobs": [{token_string(top.text): top.logprob for top in entry.top} for entry in logprobs],
        "text_offset": offsets,
    }
    return body, text_offset


def _merge_logprobs(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {key: first[key] + second[key] for key in first}


def completion_logprobs_with_prompt(
    first_piece: bytes, prompt_logprobs: Sequence[TokenLogprob], logprobs: Sequence[TokenLogprob], echo_chars: int
) -> tuple[dict[str, Any], int]:
    """The legacy format for an echoed prompt followed by generated tokens: the prompt's first token (nothing
    predicts it: null logprob and top list), the rest of the prompt from offset 0, then the generated tokens
    from the end of the echoed text (`echo_chars`); and the text offset after them."""
    first: dict[str, Any] = {
        "tokens": [token_string(first_piece)],
        "token_logprobs": [None],
        "top_logprobs": [None],
        "text_offset": [0],
    }
    prompt_body, _ = completion_logprobs(prompt_logprobs, len(first["tokens"][0]))
    generated_body, text_offset = completion_logprobs(logprobs, echo_chars)
    return _merge_logprobs(_merge_logprobs(first, prompt_body), generated_body), text_offset


@dataclass(frozen=True)
class ResponseHeader:
    """What every object and chunk of one response repeats."""

    response_id: str
    created: int
    model: str


def chat_completion(
    header: ResponseHeader,
    choices: Sequence[ChoiceResult],
    usage: dict[str, Any],
    want_logprobs: bool,
    output_format: OutputFormat = PLAIN_TEXT,
    new_id: Callable[[], str] = new_call_id,
) -> dict[str, Any]:
    """Each choice's text read as `output_format` says (reasoning, tool calls): the fold of the pieces a
    streamed answer sends (ChatChunks), so both agree."""
    body_choices = []
    for index, choice in enumerate(choices):
        parsed = parse_output(choice.text, output_format, new_id)
        body_choices.append(
            {
                "index": index,
                "message": assistant_message(parsed),
                "logprobs": chat_logprobs(choice.logprobs) if want_logprobs else None,
                "finish_reason": chat_finish_reason(choice.finish_reason, bool(parsed.tool_calls)),
            }
        )
    return {
        "id": header.response_id,
        "object": "chat.completion",
        "created": header.created,
        "model": header.model,
        "choices": body_choices,
        "usage": usage,
    }


def assistant_message(parsed: ParsedMessage) -> dict[str, Any]:
    """The non-streamed `message`: content null when the answer is only tool calls (as OpenAI)."""
    content = parsed.content if parsed.content or not parsed.tool_calls else None
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if parsed.reasoning:
        message["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        message["tool_calls"] = parsed.tool_calls
    return message


def chat_finish_reason(reason: FinishReason | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" for an answer that ended by itself with calls; "length" stays "length"."""
    if called and reason is FinishReason.STOP:
        return "tool_calls"
    return finish_reason_text(reason)


def text_completion(
    header: ResponseHeader,
    choices: Sequence[ChoiceResult],
    usage: dict[str, Any],
    want_logprobs: bool,
    echo_texts: Sequence[str],
    prompt_first_pieces: Sequence[bytes] | None = None,
) -> dict[str, Any]:
    """`echo_texts[i]` is what choice i's text starts with (its prompt when echo was asked, else "");
    `prompt_first_pieces[i]`, when prompt logprobs were asked (echo + logprobs), choice i's prompt's first token."""
    body_choices = []
    for index, choice in enumerate(choices):
        echo = echo_texts[index]
        logprobs = None
        if want_logprobs and prompt_first_pieces is not None:
            logprobs = completion_logprobs_with_prompt(
                prompt_first_pieces[index], choice.prompt_logprobs, choice.logprobs, len(echo)
            )[0]
        elif want_logprobs:
            logprobs = completion_logprobs(choice.logprobs, len(echo))[0]
        body_choices.append(
            {
                "index": index,
                "text": echo + choice.text,
                "logprobs": logprobs,
                "finish_reason": finish_reason_text(choice.finish_reason),
            }
        )
    return {
        "id": header.response_id,
        "object": "text_completion",
        "created": header.created,
        "model": header.model,
        "choices": body_choices,
        "usage": usage,
    }


class ChatChunks:
    """`chat.completion.chunk` objects for one streamed response. Each choice's text goes through its own
    ChatOutputParser: a chunk per piece (content, reasoning_content, a tool call's id/type/name with empty
    arguments, then its arguments fragments), the first one carrying the role; then a chunk with an empty
    delta and the finish_reason. Plain text (no reasoning, no tools) sends every event's text as it comes,
    the first chunk with the role even when empty."""

    def __init__(
        self,
        header: ResponseHeader,
        *,
        include_usage: bool,
        want_logprobs: bool,
        output_format: OutputFormat = PLAIN_TEXT,
        new_id: Callable[[], str] = new_call_id,
    ) -> None:
        self._header = header
        self._include_usage = include_usage
        self._want_logprobs = want_logprobs
        self._output_format = output_format
        self._new_id = new_id
        self._parsers: dict[int, ChatOutputParser] = {}
        self._role_sent: set[int] = set()

    def _chunk(self, index: int, delta: dict[str, Any], logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self._header.response_id,
            "object": "chat.completion.chunk",
            "created": self._header.created,
            "model": self._header.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if self._include_usage:
            chunk["usage"] = None  # OpenAI: every chunk but the last has a null usage
        return chunk

    def _parser(self, index: int) -> ChatOutputParser:
        parser = self._parsers.get(index)
        if parser is None:
            parser = self._parsers[index] = ChatOutputParser(self._output_format, self._new_id)
        return parser

    def for_event(self, index: int, event: TokenEvent) -> list[dict[str, Any]]:
        parser = self._parser(index)
        pieces = parser.feed(event.text)
        if event.finish_reason is not None:
            pieces += parser.finish()
        deltas = [_piece_delta(piece) for piece in pieces]
        with_logprobs = self._want_logprobs and bool(event.logprobs)
        if not deltas and (with_logprobs or (index not in self._role_sent and self._output_format.passthrough)):
            deltas = [{"content": ""} if self._output_format.passthrough else {}]
        chunks = []
        for position, delta in enumerate(deltas):
            if index not in self._role_sent:
                self._role_sent.add(index)
                delta = {"role": "assistant", **({"content": None} if "tool_calls" in delta else {}), **delta}
            logprobs = chat_logprobs(event.logprobs) if self._want_logprobs and position == 0 else None
            chunks.append(self._chunk(index, delta, logprobs, None))
        if event.finish_reason is not None:
            reason = chat_finish_reason(event.finish_reason, parser.n_calls > 0)
            chunks.append(self._chunk(index, {}, None, reason))
        return chunks

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self._header.response_id,
            "object": "chat.completion.chunk",
            "created": self._header.created,
            "model": self._header.model,
            "choices": [],
            "usage": usage,
        }


def _piece_delta(piece: Piece) -> dict[str, Any]:
    if isinstance(piece, ContentPiece):
        return {"content": piece.text}
    if isinstance(piece, ReasoningPiece):
        return {"reasoning_content": piece.text}
    if isinstance(piece, ToolCallStart):
        function = {"name": piece.name, "arguments": ""}
        return {"tool_calls": [{"index": piece.index, "id": piece.call_id, "type": "function", "function": function}]}
    return {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.fragment}}]}


class CompletionChunks:
    """`text_completion` chunks: text deltas (the first one led by the echoed prompt, and by its logprobs when
    asked), then a chunk with empty text and the finish_reason."""

    def __init__(
        self,
        header: ResponseHeader,
        *,
        include_usage: bool,
        want_logprobs: bool,
        echo_texts: Sequence[str],
        prompt_first_pieces: Sequence[bytes] | None = None,
    ) -> None:
        self._header = header
        self._include_usage = include_usage
        self._want_logprobs = want_logprobs
        self._echo_texts = echo_texts
        self._prompt_first_pieces = prompt_first_pieces
        self._started: set[int] = set()
        self._text_offsets = [len(echo) for echo in echo_texts]

    def _chunk(self, index: int, text: str, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self._header.response_id,
            "object": "text_completion",
            "created": self._header.created,
            "model": self._header.model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def for_event(self, index: int, event: TokenEvent) -> list[dict[str, Any]]:
        chunks = []
        text = event.text
        first = index not in self._started
        if first:
            self._started.add(index)
            text = self._echo_texts[index] + text
        with_prompt = first and self._want_logprobs and self._prompt_first_pieces is not None
        if text or (self._want_logprobs and event.logprobs) or with_prompt:
            logprobs = None
            offset = self._text_offsets[index]
            if with_prompt:
                assert self._prompt_first_pieces is not None
                first_piece = self._prompt_first_pieces[index]
                logprobs, offset = completion_logprobs_with_prompt(
                    first_piece, event.prompt_logprobs, event.logprobs, offset
                )
            elif self._want_logprobs:
                logprobs, offset = completion_logprobs(event.logprobs, offset)
            self._text_offsets[index] = offset
            chunks.append(self._chunk(index, text, logprobs, None))
        if event.finish_reason is not None:
            chunks.append(self._chunk(index, "", None, finish_reason_text(event.finish_reason)))
        return chunks

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self._header.response_id,
            "object": "text_completion",
            "created": self._header.created,
            "model": self._header.model,
            "choices": [],
            "usage": usage,
        }
