"""OpenAI response objects, built as plain dicts (a streamed token must cost microseconds, not a pydantic
model): chat completions and their chunks, legacy text completions and theirs, both logprob formats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bindings.protocol import TokenLogprob
from server.api.generation import ChoiceResult, finish_reason_text
from server.engine.request import TokenEvent


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


@dataclass(frozen=True)
class ResponseHeader:
    """What every object and chunk of one response repeats."""

    response_id: str
    created: int
    model: str


def chat_completion(
    header: ResponseHeader, choices: Sequence[ChoiceResult], usage: dict[str, Any], want_logprobs: bool
) -> dict[str, Any]:
    return {
        "id": header.response_id,
        "object": "chat.completion",
        "created": header.created,
        "model": header.model,
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": chat_logprobs(choice.logprobs) if want_logprobs else None,
                "finish_reason": finish_reason_text(choice.finish_reason),
            }
            for index, choice in enumerate(choices)
        ],
        "usage": usage,
    }


def text_completion(
    header: ResponseHeader,
    choices: Sequence[ChoiceResult],
    usage: dict[str, Any],
    want_logprobs: bool,
    echo_texts: Sequence[str],
) -> dict[str, Any]:
    """`echo_texts[i]` is what choice i's text starts with (its prompt when echo was asked, else "")."""
    body_choices = []
    for index, choice in enumerate(choices):
        echo = echo_texts[index]
        logprobs = completion_logprobs(choice.logprobs, len(echo))[0] if want_logprobs else None
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
    """`chat.completion.chunk` objects for one streamed response: each choice's first chunk carries the
    role, then content deltas, then a chunk with an empty delta and the finish_reason."""

    def __init__(self, header: ResponseHeader, *, include_usage: bool, want_logprobs: bool) -> None:
        self._header = header
        self._include_usage = include_usage
        self._want_logprobs = want_logprobs
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

    def for_event(self, index: int, event: TokenEvent) -> list[dict[str, Any]]:
        chunks = []
        first = index not in self._role_sent
        if first or event.text or (self._want_logprobs and event.logprobs):
            delta: dict[str, Any] = {"role": "assistant", "content": event.text} if first else {"content": event.text}
            self._role_sent.add(index)
            logprobs = chat_logprobs(event.logprobs) if self._want_logprobs else None
            chunks.append(self._chunk(index, delta, logprobs, None))
        if event.finish_reason is not None:
            chunks.append(self._chunk(index, {}, None, finish_reason_text(event.finish_reason)))
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


class CompletionChunks:
    """`text_completion` chunks: text deltas (the first one led by the echoed prompt), then a chunk with
    empty text and the finish_reason."""

    def __init__(
        self,
        header: ResponseHeader,
        *,
        include_usage: bool,
        want_logprobs: bool,
        echo_texts: Sequence[str],
    ) -> None:
        self._header = header
        self._include_usage = include_usage
        self._want_logprobs = want_logprobs
        self._echo_texts = echo_texts
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
        if index not in self._started:
            self._started.add(index)
            text = self._echo_texts[index] + text
        if text or (self._want_logprobs and event.logprobs):
            logprobs = None
            if self._want_logprobs:
                logprobs, self._text_offsets[index] = completion_logprobs(event.logprobs, self._text_offsets[index])
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
