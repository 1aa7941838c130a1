"""Request bodies of the OpenAI-compatible routes, validated strictly (a string is not a number, 1.0 is not
an integer), with unknown fields ignored the way OpenAI clients expect. Every constraint here turns into a
400 whose `param` names the field (see api/errors.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.config import JsonDict

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20

Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


class _StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


def _text_part_schema(schema: JsonDict) -> None:
    """What _only_text checks, said in the OpenAPI document too: a part is {"type": "text", "text": str}."""
    properties = cast(dict[str, dict[str, Any]], schema["properties"])
    properties["type"]["const"] = "text"
    properties["text"] = {"type": "string", "title": "Text"}
    schema["required"] = ["type", "text"]


class TextPart(_StrictModel):
    model_config = ConfigDict(json_schema_extra=_text_part_schema)

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _only_text(self) -> TextPart:
        if self.type != "text":
            raise ValueError(f"content parts of type '{self.type}' are not supported; only 'text' parts are")
        if self.text is None:
            raise ValueError("a 'text' content part needs a 'text' field")
        return self


# What _content_present checks, said in the OpenAPI document too (clients and the fuzz read it): only an
# assistant message may leave content out.
_CONTENT_UNLESS_ASSISTANT: JsonDict = {
    "anyOf": [
        {"properties": {"role": {"const": "assistant"}}},
        {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
    ]
}


class ChatMessage(_StrictModel):
    model_config = ConfigDict(json_schema_extra=_CONTENT_UNLESS_ASSISTANT)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # past assistant tool calls, handed to the template
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # a past answer's reasoning (templates that keep it may render it)

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self

    def text(self) -> str:
        """The content as one string: text parts joined by newlines, none as empty."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)


class StreamOptions(_StrictModel):
    include_usage: bool = False


class SamplingFields(_StrictModel):
    """What both generation routes accept beyond the prompt (OpenAI fields, then llama.cpp extras)."""

    model: str | None = Field(default=None, description="The served model id (optional: there is one).")
    keep_alive: str | int | float | None = Field(
        default=None,
        description="Ollama's: how long the model stays loaded after this request ('5m', seconds, 0, -1 = forever).",
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Bias] | None = None
    seed: int | None = None
    user: str | None = None
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool = False
    # Speculative decoding (when the server runs it) may draft for this request; false opts out
    speculative: bool = True
    # Both routes: decoding constrained to JSON (a grammar); see server/api/generation.py response_grammar
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, response_format: dict[str, Any] | None) -> dict[str, Any] | None:
        """The shape only; whether the schema can be enforced is decided when it is compiled (generation.py)."""
        if response_format is None:
            return None
        kind = response_format.get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type {kind!r} is not one of 'text', 'json_object', 'json_schema'")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ValueError("type 'json_schema' needs json_schema: {name, schema, strict} with schema an object")
        return response_format

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stop)}")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isdecimal():
                raise ValueError(f"keys must be token ids written as decimal strings, got {key!r}")
        return bias

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(stop for stop in stops if stop)  # an empty stop string would end every answer at once


class FunctionSpec(_StrictModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema for the arguments object; none: any object
    strict: bool | None = None


class Tool(_StrictModel):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(_StrictModel):
    name: str


class NamedToolChoice(_StrictModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None
    # llama-server's extensions: variables for the chat template (e.g. {"enable_thinking": false}), and how
    # reasoning (<think>…</think>) is returned, overriding --reasoning-format for this request.
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_format: Literal["none", "auto", "deepseek"] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return top_logprobs

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, functions: list[Any] | None) -> list[Any] | None:
        if functions:
            raise ValueError("the deprecated 'functions' field is not supported; send 'tools' instead")
        return functions

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


PromptInput = str | list[int] | list[str] | list[list[int]]


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(item) is int for item in value)


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    # OpenAI's default for this legacy route; 0 with echo: the prompt (and its logprobs) only, as lm-eval's
    # loglikelihood requests ask
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        """One readable message for every wrong shape, instead of one per member of the union."""
        if isinstance(prompt, str) or _is_token_ids(prompt):
            return prompt
        is_list_of_prompts = isinstance(prompt, list) and bool(prompt)
        if is_list_of_prompts and (
            all(isinstance(item, str) for item in prompt) or all(_is_token_ids(item) for item in prompt)
        ):
            return prompt
        raise ValueError(
            "prompt must be a string, a non-empty list of token ids, or a non-empty list of strings or of "
            "token-id lists"
        )

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported by this server")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != info.data.get("n"):
            raise ValueError("best_of is not supported (it may only equal n)")
        return best_of

    @property
    def prompt_logprobs(self) -> int | None:
        """How many alternatives each prompt token's logprob comes with (None: prompt logprobs not wanted)."""
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """The prompts this request holds: one per string or token-id list."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if _is_token_ids(prompt):
            return [cast(list[int], prompt)]
        return [cast(str | list[int], item) for item in prompt]


class TokenizeRequest(_StrictModel):
    """llama-server's POST /tokenize body, plus chat `messages` (rendered as /v1/chat/completions does)."""

    content: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special: bool = False
    with_pieces: bool = False
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _content_or_messages(self) -> TokenizeRequest:
        if (self.content is None) == (self.messages is None):
            raise ValueError("give exactly one of 'content' (text) and 'messages' (chat messages)")
        return self


class DetokenizeRequest(_StrictModel):
    tokens: list[int]


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request


def _embedding_input_problem(value: Any) -> str | None:
    """Why `input` is not a string, a list of strings, a token-id list or a list of them; None when it is."""
    if isinstance(value, str):
        return "input must not be an empty string" if not value else None
    if not isinstance(value, list) or not value:
        return "input must be a non-empty string, a non-empty list of strings, a token-id list or a list of them"
    if len(value) > MAX_EMBEDDING_INPUTS:
        return f"input holds {len(value)} inputs; at most {MAX_EMBEDDING_INPUTS} are allowed per request"
    if all(type(item) is int for item in value):
        return None
    for index, item in enumerate(value):
        if isinstance(item, str) and not item:
            return f"input[{index}] is an empty string"
        if isinstance(item, list) and not item:
            return f"input[{index}] is an empty token list"
        if not isinstance(item, str) and not _is_token_ids(item):
            return f"input[{index}] must be a string or a list of token ids (integers)"
    return None


class EmbeddingRequest(_StrictModel):
    """POST /v1/embeddings, as OpenAI's (`user` accepted and ignored)."""

    input: str | list[int] | list[str | list[int]]
    model: str | None = Field(default=None, description="The served model id (optional: there is one).")
    keep_alive: str | int | float | None = Field(
        default=None,
        description="Ollama's: how long the model stays loaded after this request ('5m', seconds, 0, -1 = forever).",
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        problem = _embedding_input_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    def inputs(self) -> list[str | list[int]]:
        """One entry per input: a text, or token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if _is_token_ids(self.input):
            return [cast(list[int], self.input)]
        return [cast(str | list[int], item) for item in self.input]
