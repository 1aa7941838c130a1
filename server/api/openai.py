"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions; and llama-server's
/tokenize and /detokenize."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask

from bindings.protocol import SamplingParams
from server.api.auth import require_api_key
from server.api.errors import stream_error_payload
from server.api.generation import (
    ChoiceResult,
    Generation,
    audit_params,
    collect_choices,
    engine_requests,
    event_error,
    response_grammar,
    sampling_params,
)
from server.api.responses import (
    ChatChunks,
    CompletionChunks,
    ResponseHeader,
    chat_completion,
    text_completion,
)
from server.api.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from server.api.sse import DONE_EVENT, event_source_response, sse_event, until_disconnected
from server.api.state import ServerState, server_state
from server.api.tools import NO_TOOLS, ToolPlan, chat_output_plan, template_variables, tool_plan, tools_for_template
from server.audit.capture import note_disconnect, note_error, request_audit
from server.audit.record import AuditRecord
from server.chat_template import ChatTemplate
from server.engine.engine import Engine
from server.engine.request import TokenEvent
from server.errors import ApiError, ContextLengthExceededError, InvalidRequestError
from server.fleet.fleet import Lease
from server.fleet.slot import ModelSlot
from server.metrics import Metrics

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_api_key)])

# Rendering and tokenizing a prompt this long (characters) runs in a worker thread, so one huge prompt
# never holds up the event loop (and with it every other stream).
OFFLOAD_PROMPT_CHARS = 4096


BodyBuilder = Callable[[Generation, list[ChoiceResult]], dict[str, Any]]


class _Chunks(Protocol):
    def for_event(self, index: int, event: TokenEvent) -> list[dict[str, Any]]: ...

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]: ...


def _model_card(slot: ModelSlot) -> dict[str, Any]:
    return {
        "id": slot.id,
        "object": "model",
        "created": slot.created,
        "owned_by": "qwen3-local",
        # Extensions: what a request that leaves a parameter out gets (models.yaml's `sampling`), and the
        # model's place in the fleet (server/fleet): loaded, loading or unloaded, a slot's context, other names
        "sampling_defaults": dict(slot.spec.sampling_defaults),
        "state": slot.public_state,
        "context_length": slot.context_length(),
        "aliases": list(slot.spec.aliases),
    }


@router.get("/v1/models", response_model=None)
async def list_models(request: Request) -> dict[str, Any]:
    slots = server_state(request).fleet.slots.values()
    return {"object": "list", "data": [_model_card(slot) for slot in slots]}


@router.get("/v1/models/{model_id:path}", response_model=None)
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    return _model_card(server_state(request).model(model_id))


async def _off_loop_if_long(n_chars: int, work: Callable[[], list[int]]) -> list[int]:
    return await asyncio.to_thread(work) if n_chars > OFFLOAD_PROMPT_CHARS else work()


def _template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: string content, 'developer' read as 'system'."""
    rendered = []
    for message in messages:
        entry: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": message.text(),
        }
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls is not None:
            entry["tool_calls"] = message.tool_calls
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.reasoning_content is not None:
            entry["reasoning_content"] = message.reasoning_content
        rendered.append(entry)
    return rendered


async def _chat_prompt(
    template: ChatTemplate, messages: Sequence[ChatMessage], engine: Engine, *, add_generation_prompt: bool = True
) -> list[int]:
    return (await _rendered_chat_prompt(template, messages, engine, add_generation_prompt=add_generation_prompt))[1]


async def _rendered_chat_prompt(
    template: ChatTemplate,
    messages: Sequence[ChatMessage],
    engine: Engine,
    *,
    add_generation_prompt: bool = True,
    plan: ToolPlan = NO_TOOLS,
    variables: Mapping[str, Any] | None = None,
) -> tuple[str, list[int]]:
    """The prompt text and its tokens: the messages, with the plan's tools (server/api/tools.py) and the
    request's template variables."""
    template_messages, tools = tools_for_template(template, _template_messages(messages), plan)

    def render_and_tokenize() -> tuple[str, list[int]]:
        text = template.render(
            template_messages, add_generation_prompt=add_generation_prompt, tools=tools, variables=variables
        )
        return text, template.tokenize(text, engine.info, engine.vocab)

    n_chars = sum(len(message["content"]) for message in template_messages) + len(repr(tools or ""))
    if n_chars > OFFLOAD_PROMPT_CHARS:
        return await asyncio.to_thread(render_and_tokenize)
    return render_and_tokenize()


async def _completion_prompt(prompt: str | list[int], engine: Engine) -> list[int]:
    if not isinstance(prompt, str):
        return prompt
    # As llama.cpp's server does: special tokens written in the text are parsed, BOS added if the model wants.
    return await _off_loop_if_long(
        len(prompt), lambda: engine.vocab.tokenize(prompt, add_special=True, parse_special=True)
    )


def _prompt_text(prompt: str | list[int], engine: Engine) -> str:
    if isinstance(prompt, str):
        return prompt
    return b"".join(engine.vocab.piece(token) for token in prompt).decode("utf-8", errors="replace")


async def _streamed_body(
    first: tuple[int, TokenEvent],
    events: AsyncGenerator[tuple[int, TokenEvent], None],
    generation: Generation,
    chunks: _Chunks,
    include_usage: bool,
    metrics: Metrics,
) -> AsyncIterator[bytes]:
    """The SSE events after the first engine event. An error from here on can only be told in the stream:
    a `data: {"error": ...}` event, then [DONE]. A disconnect cancels this iterator; `finally` frees the
    request's slots."""

    def encoded(index: int, event: TokenEvent) -> list[bytes]:
        error = event_error(event)
        if error is not None:
            raise error
        return [sse_event(chunk) for chunk in chunks.for_event(index, event)]

    # One yield (one socket write) per engine event, and the usage or error event goes out with [DONE]: each
    # write is a send syscall plus a trip through the ASGI layers, and an event may carry several chunks.
    tail = b""
    try:
        data = b"".join(encoded(*first))
        if data:
            yield data
        async for index, event in events:
            data = b"".join(encoded(index, event))
            if data:
                yield data
        if include_usage:
            tail = sse_event(chunks.usage_chunk(generation.usage()))
    except (asyncio.CancelledError, GeneratorExit):  # the client left mid-stream
        note_disconnect(generation.audit)
        raise
    except Exception as exc:
        note_error(generation.audit, exc)
        if isinstance(exc, ApiError):
            log.warning("stream %s ended by an error: %s", generation.streams[0].request_id, exc.message)
        else:
            log.exception("unexpected error while streaming %s", generation.streams[0].request_id)
        metrics.stream_errors.inc()
        tail = b"data: " + stream_error_payload(exc) + b"\n\n"
    finally:
        generation.cancel()
    yield tail + DONE_EVENT


async def _respond(
    request: Request,
    generation: Generation,
    *,
    stream: bool,
    chunks: _Chunks,
    include_usage: bool,
    build_body: BodyBuilder,
    metrics: Metrics,
    lease: Lease,
) -> Response:
    """The answer; the lease on the model ends with it (a stream's, when its last event is sent or the client
    leaves)."""
    if not stream:
        try:
            body = await until_disconnected(request, _collected_body(generation, build_body))
        finally:
            lease.release()
        return JSONResponse(body)
    events = generation.events()
    try:
        # Wait for the first event before answering: a request that fails before producing anything (decode
        # error, timeout) gets a proper HTTP error instead of a stream holding only an error event.
        first = await until_disconnected(request, anext(events))
        error = event_error(first[1])
        if error is not None:
            raise error
    except BaseException:
        generation.cancel()
        await events.aclose()
        lease.release()
        raise
    response = event_source_response(
        _released_after(_streamed_body(first, events, generation, chunks, include_usage, metrics), lease)
    )
    # Also when the body never started (released once). Awaited on the event loop: the fleet's state is the
    # loop's (a plain function would run in a worker thread, and cost a thread hand-off per request).
    response.background = BackgroundTask(_release, lease)
    return response


async def _release(lease: Lease) -> None:
    lease.release()


async def _released_after(body: AsyncIterator[bytes], lease: Lease) -> AsyncIterator[bytes]:
    try:
        async for chunk in body:
            yield chunk
    finally:
        lease.release()


async def _collected_body(generation: Generation, build_body: BodyBuilder) -> dict[str, Any]:
    return build_body(generation, await collect_choices(generation))


def _audit_start(request: Request, state: ServerState, model: str | None, user: str | None) -> AuditRecord | None:
    """The request's audit record (None when auditing is off), with what the body says before anything can
    fail: a rejected request is recorded with its model and user too."""
    audit = request_audit(request)
    if audit is not None:
        audit.model, audit.user = model or state.served_model_id, user
    return audit


async def _leased(state: ServerState, model: str | None, keep_alive: str | int | float | None) -> Lease:
    """The request's model, loaded (on demand: the request waits), held until its answer ends."""
    return await state.acquire(model, keep_alive)


def _audit_submitted(audit: AuditRecord | None, prompt: str, params: SamplingParams, n: int) -> None:
    if audit is not None:
        audit.keep_prompt(prompt)
        audit.params = audit_params(params, n)


GenerationBody = TypeVar("GenerationBody", ChatCompletionRequest, CompletionRequest)
LeasedHandler = Callable[
    [GenerationBody, Request, ServerState, Lease, "AuditRecord | None", float], Awaitable[Response]
]


async def _answer_leased(body: GenerationBody, request: Request, handler: LeasedHandler[GenerationBody]) -> Response:
    """Hold the request's model (loading it on demand) while `handler` answers; the handler's response releases
    the lease when its answer ends, and a handler that fails releases it here."""
    received_at = time.perf_counter()
    state = server_state(request)
    audit = _audit_start(request, state, body.model, body.user)
    lease = await _leased(state, body.model, body.keep_alive)
    try:
        return await handler(body, request, state, lease, audit, received_at)
    except BaseException:
        lease.release()
        raise


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await _answer_leased(body, request, _chat_completion)


async def _chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    state: ServerState,
    lease: Lease,
    audit: AuditRecord | None,
    received_at: float,
) -> Response:
    slot = lease.slot
    settings, metrics = slot.spec.settings, state.metrics.for_model(slot.id)
    engine, template = slot.ready()
    plan = tool_plan(body)
    prompt_text, prompt = await _rendered_chat_prompt(
        template, body.messages, engine, plan=plan, variables=template_variables(body)
    )
    output = chat_output_plan(body, plan, template, prompt_text, settings.reasoning_format)
    params = sampling_params(
        body,
        engine.info,
        max_tokens=body.output_limit,
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
        default_top_k=settings.default_top_k,
        model_defaults=slot.spec.sampling_defaults,
        grammar=output.grammar.grammar or response_grammar(body.response_format),
    )
    params = dataclasses.replace(params, grammar_triggers=output.grammar.triggers)
    _audit_submitted(audit, prompt_text, params, body.n)
    response_id, requests = engine_requests([prompt], params, body.n, "chatcmpl")
    generation = Generation.submit(engine, requests, metrics, received_at, "chat")
    generation.audit = audit
    header = ResponseHeader(response_id, int(time.time()), slot.id)
    return await _respond(
        request,
        generation,
        stream=body.stream,
        chunks=ChatChunks(
            header, include_usage=body.include_usage, want_logprobs=params.logprobs, output_format=output.format
        ),
        include_usage=body.include_usage,
        build_body=lambda gen, choices: chat_completion(header, choices, gen.usage(), params.logprobs, output.format),
        metrics=metrics,
        lease=lease,
    )


def _completion_params(body: CompletionRequest, engine: Engine, slot: ModelSlot) -> SamplingParams:
    return sampling_params(
        body,
        engine.info,
        max_tokens=body.max_tokens,
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
        default_top_k=slot.spec.settings.default_top_k,
        model_defaults=slot.spec.sampling_defaults,
        grammar=response_grammar(body.response_format),
    )


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await _answer_leased(body, request, _text_completion)


async def _text_completion(
    body: CompletionRequest,
    request: Request,
    state: ServerState,
    lease: Lease,
    audit: AuditRecord | None,
    received_at: float,
) -> Response:
    slot = lease.slot
    metrics = state.metrics.for_model(slot.id)
    engine, _ = slot.ready()
    if body.max_tokens == 0 and not body.echo:
        raise InvalidRequestError(
            "max_tokens 0 generates nothing; it is only useful with echo: true (the prompt, and its logprobs "
            "with logprobs set)",
            param="max_tokens",
        )
    params = _completion_params(body, engine, slot)
    prompts = body.prompts()
    _audit_submitted(audit, _prompts_text(prompts), params, body.n)
    prompt_tokens = [await _completion_prompt(prompt, engine) for prompt in prompts]
    response_id, requests = engine_requests(prompt_tokens, params, body.n, "cmpl", prompt_logprobs=body.prompt_logprobs)
    try:
        generation = Generation.submit(engine, requests, metrics, received_at, "completions")
        generation.audit = audit
    except ContextLengthExceededError as exc:
        exc.param = "prompt" if exc.param == "messages" else exc.param
        raise
    echo_texts = [_prompt_text(prompt, engine) if body.echo else "" for prompt in prompts for _ in range(body.n)]
    # The first prompt token of each choice: its entry leads the prompt logprobs (nothing predicts it).
    first_pieces = None
    if body.prompt_logprobs is not None:
        first_pieces = [engine.vocab.piece(tokens[0]) for tokens in prompt_tokens for _ in range(body.n)]
    header = ResponseHeader(response_id, int(time.time()), slot.id)
    return await _respond(
        request,
        generation,
        stream=body.stream,
        chunks=CompletionChunks(
            header,
            include_usage=body.include_usage,
            want_logprobs=params.logprobs,
            echo_texts=echo_texts,
            prompt_first_pieces=first_pieces,
        ),
        include_usage=body.include_usage,
        build_body=lambda gen, choices: text_completion(
            header, choices, gen.usage(), params.logprobs, echo_texts, first_pieces
        ),
        metrics=metrics,
        lease=lease,
    )


def _prompts_text(prompts: Sequence[str | list[int]]) -> str:
    """The prompts as the audit log keeps them: a text as sent, token ids as their JSON list (exact, and they
    are not checked against the vocabulary yet); several prompts as a JSON list of those."""
    texts = [prompt if isinstance(prompt, str) else json.dumps(prompt) for prompt in prompts]
    return texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False)


def _piece_json(piece: bytes) -> str | list[int]:
    """As llama-server shows a piece: its text when it is valid UTF-8, else its byte values (a piece may be
    part of a multi-byte character)."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


async def _loaded(state: ServerState, model: str | None) -> tuple[Engine, ChatTemplate]:
    """The model's engine and template, loaded on demand (tokenizing needs no hold on it)."""
    lease = await state.acquire(model)
    lease.release()
    return lease.slot.ready()


@router.post("/tokenize", response_model=None)
async def tokenize(body: TokenizeRequest, request: Request, model: str | None = None) -> dict[str, Any]:
    """llama-server's /tokenize; with `messages`, the tokens of the prompt /v1/chat/completions would build
    from them, with the per-slot context they must fit, so a UI can show how full the context is. `?model=`
    picks a served model (default: the default model)."""
    engine, template = await _loaded(server_state(request), model)
    if body.messages is not None:
        tokens = await _chat_prompt(template, body.messages, engine, add_generation_prompt=body.add_generation_prompt)
    else:
        text = body.content or ""
        # parse_special as llama-server does: special tokens written in the text are tokens, not characters
        tokens = await _off_loop_if_long(
            len(text), lambda: engine.vocab.tokenize(text, add_special=body.add_special, parse_special=True)
        )
    listed: list[Any] = (
        [{"id": token, "piece": _piece_json(engine.vocab.piece(token))} for token in tokens]
        if body.with_pieces
        else tokens
    )
    if body.messages is None:
        return {"tokens": listed}
    return {"tokens": listed, "n_tokens": len(tokens), "n_ctx": engine.info.n_ctx_per_slot}


@router.post("/detokenize", response_model=None)
async def detokenize(body: DetokenizeRequest, request: Request, model: str | None = None) -> dict[str, Any]:
    engine, _ = await _loaded(server_state(request), model)
    n_vocab = engine.info.n_vocab
    outside = [token for token in body.tokens if not 0 <= token < n_vocab]
    if outside:
        raise InvalidRequestError(
            f"tokens names ids outside this model's vocabulary [0, {n_vocab}): {outside[:5]}", param="tokens"
        )
    return {"content": _prompt_text(body.tokens, engine)}
