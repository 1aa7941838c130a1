"""Tools on /v1/chat/completions: which calls a request allows (tool_choice, parallel_tool_calls), how the
tools and the tool-call history reach the chat template, and the grammar that holds the model to a call.

The convention is Qwen3's (and Hermes'): a call is `<tool_call>\\n{"name": NAME, "arguments": {…}}\\n</tool_call>`,
and a tool's result comes back in a user turn as `<tool_response>\\n…\\n</tool_response>`. A template that
reads `tools` (Qwen3's) renders them itself. For one that does not (SmolLM2's, ChatML), the tools are
described in a system message in Qwen3's own words, and past calls and results are written in the same
convention, so any model sees one consistent format.

tool_choice:
  auto      the tools are rendered; a lazy grammar, triggered by `<tool_call>`, holds a call the model starts
            to the tools' schemas; text without a call is plain content.
  none      as OpenAI: the model does not call. The tools are not rendered (the model cannot call what it
            is not shown), no call is parsed, history with past calls still renders.
  required  the output is one call (or several, with parallel_tool_calls) of any tool, by grammar.
  named     the output is one call of that function, by grammar.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bindings.grammar import UnsupportedSchemaError, tool_call_grammar
from server.api.chat_output import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, THINK_OPEN, OutputFormat
from server.api.schemas import ChatCompletionRequest, NamedToolChoice, Tool
from server.chat_template import RESERVED_VARIABLES, ChatTemplate
from server.errors import InvalidRequestError

# The generic tool prompt for templates that cannot render tools: Qwen3's template's words, verbatim.
_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
# What starts a call: the lazy grammar's trigger (a regex, searched in the output so far).
CALL_TRIGGER = "<tool_call>"


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools and what it allows. `choice`: "auto", "none", "required" or "function" (`name`)."""

    tools: tuple[Tool, ...]
    choice: str
    name: str | None
    parallel: bool

    @property
    def rendered(self) -> bool:
        """Whether the model is shown the tools."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as Hugging Face templates take them."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools]


NO_TOOLS = ToolPlan((), "none", None, parallel=True)


def tool_plan(body: ChatCompletionRequest) -> ToolPlan:
    """The request's tool plan; tool_choice without tools, an unknown name or a repeated one is a 400."""
    tools = tuple(body.tools or ())
    names = [tool.function.name for tool in tools]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidRequestError(f"tools defines these function names more than once: {repeated}", param="tools")
    choice = body.tool_choice
    if choice is not None and not tools:
        raise InvalidRequestError("tool_choice is only allowed when tools are specified", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidRequestError(
                f"tool_choice names function {choice.function.name!r}, which is not in tools", param="tool_choice"
            )
        # One call of that function, whatever parallel_tool_calls says: forcing a function asks for that call
        # (OpenAI and vLLM answer one); a grammar allowing more lets a weak model repeat it until max_tokens.
        return ToolPlan(tools, "function", choice.function.name, parallel=False)
    return ToolPlan(tools, choice or ("auto" if tools else "none"), None, body.parallel_tool_calls)


def template_variables(body: ChatCompletionRequest) -> dict[str, Any]:
    """chat_template_kwargs, refusing names the server sets itself."""
    variables = dict(body.chat_template_kwargs or {})
    reserved = sorted(RESERVED_VARIABLES & set(variables))
    if reserved:
        raise InvalidRequestError(
            f"chat_template_kwargs may not set {', '.join(reserved)} (the server sets them)",
            param="chat_template_kwargs",
        )
    return variables


def tools_for_template(
    template: ChatTemplate, messages: list[dict[str, Any]], plan: ToolPlan
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and `tools` to render. A template without tool support gets the generic format: the
    tools in the system message, past calls written as `<tool_call>` text, results as user turns."""
    if template.supports_tools:
        return [_with_argument_objects(message) for message in messages], (
            plan.template_tools() if plan.rendered else None
        )
    generic = _generic_history(messages)
    if plan.rendered:
        generic = _with_tools_system_block(generic, plan.template_tools())
    return generic, None


def _with_argument_objects(message: dict[str, Any]) -> dict[str, Any]:
    """Past calls with `arguments` as a mapping where the JSON string holds an object: what Hugging Face
    templates expect (Qwen3's takes either, and `tojson` of the mapping is the text it was trained on)."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except ValueError:
                arguments = None
            if isinstance(arguments, dict):
                call = {**call, "function": {**function, "arguments": arguments}}
        calls.append(call)
    return {**message, "tool_calls": calls}


def _call_text(call: Any) -> str:
    function = call.get("function", call) if isinstance(call, dict) else {}
    arguments = function.get("arguments", {}) if isinstance(function, dict) else {}
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # not JSON: written as the string it is
            arguments = json.loads(arguments)
    name = function.get("name", "") if isinstance(function, dict) else ""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def _generic_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History in the generic format: assistant calls as text, tool results merged into user turns."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            parts = [message["content"]] if message["content"] else []
            parts += [_call_text(call) for call in message["tool_calls"]]
            rendered.append({"role": "assistant", "content": "\n".join(parts)})
        elif message["role"] == "tool":
            response = f"<tool_response>\n{message['content']}\n</tool_response>"
            if rendered and rendered[-1].get("from_tool"):
                rendered[-1]["content"] += "\n" + response
            else:
                rendered.append({"role": "user", "content": response, "from_tool": True})
        else:
            rendered.append(message)
    return [{key: value for key, value in message.items() if key != "from_tool"} for message in rendered]


def _with_tools_system_block(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    block = _TOOLS_HEADER + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools) + _TOOLS_FOOTER
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


@dataclass(frozen=True)
class ToolGrammar:
    grammar: str | None
    triggers: tuple[str, ...]  # non-empty: the grammar is lazy, enforced from the first match on


def tool_grammar(plan: ToolPlan, *, reasoning: str) -> ToolGrammar:
    """The grammar that holds the output to calls of the plan's tools (`reasoning`: "", "open" or
    "optional", a <think> block allowed first; forced calls only). A schema the grammar cannot enforce is a
    400 naming the tool: a call that does not match its schema would break the contract."""
    if not plan.rendered:
        return ToolGrammar(None, ())
    tools = [tool for tool in plan.tools if plan.choice != "function" or tool.function.name == plan.name]
    try:
        grammar = tool_call_grammar(
            [(tool.function.name, tool.function.parameters) for tool in tools],
            open_tag=CALL_OPEN,
            close_tag=CALL_CLOSE,
            parallel=plan.parallel,
            reasoning=reasoning if plan.forced else "",
        )
    except UnsupportedSchemaError as exc:
        raise InvalidRequestError(f"{_named(str(exc), tools, plan)}", param="tools") from exc
    return ToolGrammar(grammar, () if plan.forced else (CALL_TRIGGER,))


def _named(message: str, tools: Sequence[Tool], plan: ToolPlan) -> str:
    """The converter's message names tools[i] of the tools it was given: name the request's index and the
    function."""
    for index, tool in enumerate(tools):
        prefix = f"tools[{index}]."
        if message.startswith(prefix):
            request_index = plan.tools.index(tool)
            return f"tools[{request_index}] ({tool.function.name}): {message[len(prefix) :]}"
    return message


@dataclass(frozen=True)
class ChatOutputPlan:
    """How a chat answer is constrained (grammar) and read back (reasoning, calls)."""

    format: OutputFormat
    grammar: ToolGrammar


def chat_output_plan(
    body: ChatCompletionRequest, plan: ToolPlan, template: ChatTemplate, prompt_text: str, server_format: str
) -> ChatOutputPlan:
    """reasoning_format (the request's, else the server's): deepseek splits <think> blocks off, none leaves
    them in content, auto splits them for templates that know them. The prompt tells whether the answer
    starts inside one (the template opened it) or may open one."""
    reasoning_format = body.reasoning_format or server_format
    split = reasoning_format == "deepseek" or (reasoning_format == "auto" and template.knows_thinking)
    prompt_end = prompt_text.rstrip()
    opened = prompt_end.endswith(THINK_OPEN)
    if opened:
        think = "open"
    elif template.knows_thinking and not prompt_end.endswith(THINK_CLOSE):
        think = "optional"
    else:
        think = ""
    grammar = tool_grammar(plan, reasoning=think)
    if grammar.grammar is not None and (body.response_format or {}).get("type", "text") != "text":
        raise InvalidRequestError(
            "response_format together with tools is not supported (unless tool_choice is 'none')",
            param="response_format",
        )
    output_format = OutputFormat(
        reasoning=split, starts_in_reasoning=split and opened, tools=plan.rendered, max_calls=plan.max_calls
    )
    return ChatOutputPlan(output_format, grammar)
