"""What a chat model wrote, split into what the OpenAI API returns: reasoning (`<think>…</think>`), content,
and tool calls (`<tool_call>{"name": …, "arguments": …}</tool_call>`, Qwen3's and Hermes' convention).

`ChatOutputParser` is fed the text deltas of one choice as they are generated and yields typed pieces. The
non-streamed message is the fold of the very same pieces (`fold`), so a streamed answer and a non-streamed
one are equal by construction, however the text happened to be split. Text that may be the start of a tag
(`<tool_c`, `</thi`) is held back until it is known not to be one: a partial tag never leaks into content.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

# The head of a call up to where its arguments begin. Qwen3 writes `{"name": "f", "arguments": {…}}` (the
# tool-call grammar forces that key order); whitespace may vary. The head is known once the arguments'
# first character is there.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')


@dataclass(frozen=True)
class OutputFormat:
    """How to read one answer. `reasoning`: split `<think>` blocks off; `starts_in_reasoning`: the prompt
    already opened the block (Qwen3 thinking templates end the generation prompt with `<think>`);
    `tools`: parse tool calls; `max_calls`: at most this many (parallel_tool_calls false: 1)."""

    reasoning: bool = False
    starts_in_reasoning: bool = False
    tools: bool = False
    max_calls: int | None = None

    @property
    def passthrough(self) -> bool:
        return not self.reasoning and not self.tools


@dataclass(frozen=True)
class ContentPiece:
    text: str


@dataclass(frozen=True)
class ReasoningPiece:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    call_id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    index: int
    fragment: str


Piece = ContentPiece | ReasoningPiece | ToolCallStart | ToolCallArguments


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class _State(Enum):
    THINK_START = "think-start"  # may open with <think>
    REASONING = "reasoning"
    CONTENT = "content"
    CALL = "call"  # inside <tool_call>…


def _tag_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


@dataclass
class _CallBodyScanner:
    """Finds the `</tool_call>` that ends a call: one outside every JSON string of the body. An argument may
    hold the tag itself (a string argument about tool calls; the grammar allows any text in strings), and
    the first raw match would cut the call there. Scans each character once across feeds: `position` is
    how far into the parser's buffer it has read, and the string state holds there."""

    position: int = 0
    in_string: bool = False
    escaped: bool = False

    def close_at(self, buffer: str) -> int:
        """Index of the closing tag in `buffer`, or -1 when it is not (yet) there."""
        while self.position < len(buffer):
            char = buffer[self.position]
            if self.in_string:
                self._read_string_char(char)
            elif char == '"':
                self.in_string = True
            elif char == "<":
                rest = buffer[self.position : self.position + len(CALL_CLOSE)]
                if rest == CALL_CLOSE:
                    return self.position
                if CALL_CLOSE.startswith(rest):
                    return -1  # may become the tag: read it again when more text is there
            self.position += 1
        return -1

    def _read_string_char(self, char: str) -> None:
        if self.escaped:
            self.escaped = False
        elif char == "\\":
            self.escaped = True
        elif char == '"':
            self.in_string = False

    def dropped(self, count: int) -> None:
        """The parser removed `count` characters from its buffer's front (all of them already read)."""
        self.position -= count


@dataclass
class ChatOutputParser:
    """Incremental: `feed` each text delta, then `finish` once; both return the pieces now known."""

    output_format: OutputFormat
    new_id: Callable[[], str] = new_call_id
    _buffer: str = ""
    _state: _State = _State.CONTENT
    _strip_leading: bool = False  # drop whitespace before the next text (after </think>, a call, <think>)
    _n_calls: int = 0
    _call_started: bool = False  # the current call's name is out; its arguments are streaming
    _discard_call: bool = False  # a call beyond max_calls: parsed and dropped
    _call_body: _CallBodyScanner = field(default_factory=_CallBodyScanner)
    _pieces: list[Piece] = field(default_factory=list)

    def __post_init__(self) -> None:
        fmt = self.output_format
        if fmt.reasoning:
            self._state = _State.REASONING if fmt.starts_in_reasoning else _State.THINK_START
            self._strip_leading = True

    @property
    def n_calls(self) -> int:
        return self._n_calls

    def feed(self, text: str) -> list[Piece]:
        if self.output_format.passthrough:
            return [ContentPiece(text)] if text else []
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[Piece]:
        if self.output_format.passthrough:
            return []
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> list[Piece]:
        self._pieces = []
        while self._step(final):
            pass
        return [piece for piece in self._pieces if not _empty(piece)]

    def _step(self, final: bool) -> bool:
        """Advance one state; False when the buffer holds nothing more that can be decided now."""
        if self._state is _State.THINK_START:
            return self._think_start(final)
        if self._state is _State.REASONING:
            return self._reasoning(final)
        if self._state is _State.CALL:
            return self._call(final)
        return self._content(final)

    # --- reasoning -------------------------------------------------------------------------------------
    def _think_start(self, final: bool) -> bool:
        stripped = self._buffer.lstrip()
        if stripped.startswith(THINK_OPEN):
            self._buffer = stripped[len(THINK_OPEN) :]
            self._state = _State.REASONING
            return True
        if not final and THINK_OPEN.startswith(stripped):
            return False  # still may be "<think>" (or only whitespace so far)
        self._state = _State.CONTENT
        return True

    def _reasoning(self, final: bool) -> bool:
        end = self._buffer.find(THINK_CLOSE)
        if end >= 0:
            self._emit_reasoning(self._buffer[:end].rstrip())
            self._buffer = self._buffer[end + len(THINK_CLOSE) :]
            self._state = _State.CONTENT
            self._strip_leading = True
            return True
        if final:  # an unclosed block (the answer was cut short): all of it is reasoning
            self._emit_reasoning(self._buffer.rstrip())
            self._buffer = ""
            return False
        # Hold back a possible start of </think>, and trailing whitespace (it is trimmed before </think>).
        safe = self._buffer[: len(self._buffer) - _tag_prefix_len(self._buffer, THINK_CLOSE)]
        keep_from = len(safe.rstrip())
        self._emit_reasoning(self._buffer[:keep_from])
        self._buffer = self._buffer[keep_from:]
        return False

    def _emit_reasoning(self, text: str) -> None:
        if self._strip_leading:
            text = text.lstrip()
            self._strip_leading = not text
        self._pieces.append(ReasoningPiece(text))

    # --- content ---------------------------------------------------------------------------------------
    def _content(self, final: bool) -> bool:
        if not self.output_format.tools:
            self._emit_content(self._buffer)
            self._buffer = ""
            return False
        start = self._buffer.find(CALL_OPEN)
        if start >= 0:
            self._emit_content(self._buffer[:start].rstrip())  # the whitespace before a call is layout
            self._buffer = self._buffer[start + len(CALL_OPEN) :]
            self._start_call()
            return True
        if final:
            self._emit_content(self._buffer)
            self._buffer = ""
            return False
        # Hold back a possible start of <tool_call>, and trailing whitespace (dropped if a call follows).
        safe = self._buffer[: len(self._buffer) - _tag_prefix_len(self._buffer, CALL_OPEN)]
        keep_from = len(safe.rstrip())
        self._emit_content(self._buffer[:keep_from])
        self._buffer = self._buffer[keep_from:]
        return False

    def _emit_content(self, text: str) -> None:
        if self._strip_leading:
            text = text.lstrip()
            self._strip_leading = not text
        self._pieces.append(ContentPiece(text))

    # --- tool calls ------------------------------------------------------------------------------------
    def _start_call(self) -> None:
        self._state = _State.CALL
        self._call_started = False
        self._call_body = _CallBodyScanner()
        max_calls = self.output_format.max_calls
        self._discard_call = max_calls is not None and self._n_calls >= max_calls

    def _call(self, final: bool) -> bool:
        if not self._call_started and not self._discard_call:
            head = _CALL_HEAD.match(self._buffer)
            if head is not None:
                self._open_call(json.loads(f'"{head.group(1)}"'))
                self._buffer = self._buffer[head.end() :]
                self._call_body = _CallBodyScanner()  # the head ends outside any string
        end = self._call_body.close_at(self._buffer)
        if end < 0 and final and not self._call_started:
            end = self._buffer.find(CALL_CLOSE)  # not JSON after all (an unclosed quote): the tag ends it
        if end >= 0:
            self._close_call(self._buffer[:end])
            self._buffer = self._buffer[end + len(CALL_CLOSE) :]
            self._state = _State.CONTENT
            self._strip_leading = True
            return True
        if final:
            self._close_call(self._buffer)
            self._buffer = ""
            return False
        if self._call_started and not self._discard_call:
            keep_from = _arguments_tail_start(self._buffer)
            self._pieces.append(ToolCallArguments(self._n_calls - 1, self._buffer[:keep_from]))
            self._buffer = self._buffer[keep_from:]
            self._call_body.dropped(keep_from)
        return False

    def _open_call(self, name: str) -> None:
        self._pieces.append(ToolCallStart(self._n_calls, self.new_id(), name))
        self._n_calls += 1
        self._call_started = True

    def _close_call(self, body: str) -> None:
        """The rest of a call once its end is known: the arguments' last fragment, or, for a call whose head
        did not have the expected shape, the whole call at once (or as content if it is no call at all)."""
        if self._discard_call:
            return
        if self._call_started:
            self._pieces.append(ToolCallArguments(self._n_calls - 1, _without_outer_close(body)))
            return
        parsed = _parse_call(body)
        if parsed is None:
            self._pieces.append(ContentPiece(CALL_OPEN + body + CALL_CLOSE))
            return
        self._open_call(parsed[0])
        self._pieces.append(ToolCallArguments(self._n_calls - 1, parsed[1]))


def _arguments_tail_start(buffer: str) -> int:
    """Where the part of `buffer` that may still be the call's end (whitespace, `}`, whitespace, part of
    </tool_call>) begins: arguments before it are final, and are what _without_outer_close would keep."""
    rest = buffer[: len(buffer) - _tag_prefix_len(buffer, CALL_CLOSE)].rstrip()
    return len(rest[:-1].rstrip()) if rest.endswith("}") else len(rest)


def _without_outer_close(body: str) -> str:
    """The arguments text of a call body: without the closing brace of the `{"name", "arguments"}` object."""
    body = body.rstrip()
    return body[:-1].rstrip() if body.endswith("}") else body


def _parse_call(body: str) -> tuple[str, str] | None:
    """A call written another way (keys in another order, arguments as a string): (name, arguments)."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return call["name"], arguments


def _empty(piece: Piece) -> bool:
    if isinstance(piece, ContentPiece | ReasoningPiece):
        return not piece.text
    if isinstance(piece, ToolCallArguments):
        return not piece.fragment
    return False


@dataclass
class ParsedMessage:
    """The fold of an answer's pieces: the non-streamed message."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, piece: Piece) -> None:
        if isinstance(piece, ContentPiece):
            self.content += piece.text
        elif isinstance(piece, ReasoningPiece):
            self.reasoning += piece.text
        elif isinstance(piece, ToolCallStart):
            function = {"name": piece.name, "arguments": ""}
            self.tool_calls.append({"id": piece.call_id, "type": "function", "function": function})
        else:
            self.tool_calls[piece.index]["function"]["arguments"] += piece.fragment


def fold(pieces: Iterable[Piece]) -> ParsedMessage:
    message = ParsedMessage()
    for piece in pieces:
        message.add(piece)
    return message


def parse_output(text: str, output_format: OutputFormat, new_id: Callable[[], str] = new_call_id) -> ParsedMessage:
    parser = ChatOutputParser(output_format, new_id)
    return fold([*parser.feed(text), *parser.finish()])
