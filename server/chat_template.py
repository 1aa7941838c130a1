"""Chat templates: turn OpenAI messages into the prompt text the model was trained on, and that text into
tokens the way llama.cpp does.

The template comes from the GGUF (`tokenizer.chat_template`), or from a file named in the settings, or,
for a GGUF without one, ChatML. A GGUF is untrusted input and its template is code: it runs in jinja2's
ImmutableSandboxedEnvironment (no attribute access to internals, no mutation of what it is given), with
the helpers Hugging Face-style templates expect (`raise_exception`, `strftime_now`, a JSON `tojson`, the
`{% generation %}` block, loop controls).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2 import nodes
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bindings.protocol import ModelInfo, Vocab
from server.errors import InvalidRequestError

log = logging.getLogger(__name__)

# Variables the renderer sets itself; chat_template_kwargs may not replace them.
RESERVED_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or a template file that cannot be read."""


class TemplateRaisedError(jinja2.TemplateError):
    """The template itself rejected the messages through `raise_exception(...)`."""


def _raise_exception(message: str) -> NoReturn:
    raise TemplateRaisedError(message)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson HTML-escapes (<, >, &, '), which would corrupt prompts; templates written for
    # Hugging Face expect plain json.dumps with non-ASCII kept as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant output for training masks; rendering it is
    rendering its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares `tags` on Extension as a plain class attribute)

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _new_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template plus the BOS/EOS texts it is rendered with. Rendering is thread-safe."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", origin: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.origin = origin
        env = _new_environment()
        try:
            self._template = env.from_string(source)
            variables = jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template ({origin or 'inline'}) does not compile: {exc}") from exc
        # A template that reads `tools` renders tool definitions itself (Qwen3, Hermes, Llama 3.x, ...);
        # for the others the API describes the tools in a system message (server/api/tools.py).
        self.supports_tools = "tools" in variables
        # Qwen3-style reasoning: the template knows <think> blocks (strips them from history, may open one).
        self.knows_thinking = "<think>" in source

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text; a template that fails on these messages is the request's 400, not a crash.
        `tools`: tool definitions as Hugging Face templates take them ({"type": "function", "function": …});
        `variables`: extra template variables (a request's chat_template_kwargs, e.g. enable_thinking)."""
        extra = {key: value for key, value in (variables or {}).items() if key not in RESERVED_VARIABLES}
        if tools:
            extra["tools"] = [dict(tool) for tool in tools]
        try:
            return self._template.render(
                messages=[dict(message) for message in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except TemplateRaisedError as exc:
            raise InvalidRequestError(f"The chat template rejected the messages: {exc}", param="messages") from exc
        except MemoryError:
            raise  # the server ran out of memory: a 500, never the request's 400 (and never hidden)
        except Exception as exc:  # the template is foreign code: any failure of it is a failure to render
            # RecursionError stays a 400 on purpose: a template recursing without end on these messages is
            # the template failing on this request, and the interpreter's stack is intact once it unwinds.
            raise InvalidRequestError(
                f"The chat template failed on these messages: {type(exc).__name__}: {exc}", param="messages"
            ) from exc

    def tokenize(self, prompt_text: str, info: ModelInfo, vocab: Vocab) -> list[int]:
        """Tokens of a rendered prompt, as llama.cpp makes them: special tokens parsed, and BOS added where
        the model wants one unless the template already wrote it (never a double BOS)."""
        starts_with_bos = bool(self.bos_token) and prompt_text.startswith(self.bos_token)
        return vocab.tokenize(prompt_text, add_special=info.add_bos and not starts_with_bos, parse_special=True)


def _special_text(vocab: Vocab, token: int | None) -> str:
    return "" if token is None else vocab.token_text(token)


def select_chat_template(info: ModelInfo, vocab: Vocab, override_path: Path | None = None) -> ChatTemplate:
    """The settings' template file if given (an unreadable or broken file is an error), else the GGUF's
    (a broken one is logged and replaced by ChatML), else ChatML."""
    texts = {"bos_token": _special_text(vocab, info.bos_token), "eos_token": _special_text(vocab, info.eos_token)}
    if override_path is not None:
        try:
            source = override_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ChatTemplateError(f"cannot read chat template file {override_path}: {exc}") from exc
        return ChatTemplate(source, origin=str(override_path), **texts)
    if info.chat_template:
        try:
            return ChatTemplate(info.chat_template, origin="gguf", **texts)
        except ChatTemplateError as exc:
            log.warning("%s; falling back to ChatML", exc)
    return ChatTemplate(CHATML_TEMPLATE, origin="chatml", **texts)
