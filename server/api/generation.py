"""From a validated request body to engine requests, and from the engine's TokenEvents back to choices:
sampling parameters, submitting (several prompts → several engine requests), reading the events of all of
them as one sequence of (choice index, event), latency metrics, usage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from bindings.grammar import JSON_OBJECT_GRAMMAR, UnsupportedSchemaError, schema_grammar
from bindings.protocol import ModelInfo, SamplingParams, TokenLogprob
from server.api.schemas import SamplingFields
from server.audit.record import AuditRecord
from server.engine.engine import Engine, RequestStream
from server.engine.request import FinishReason, Request, TokenEvent, next_request_id
from server.errors import ApiError, EngineFailureError, InvalidRequestError, RequestTimeoutError
from server.metrics import FinishedRequest, Metrics

_DEFAULTS = SamplingParams()


def sampling_params(
    body: SamplingFields,
    info: ModelInfo,
    *,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    default_top_k: int,
    model_defaults: Mapping[str, float] = MappingProxyType({}),
    grammar: str | None = None,
) -> SamplingParams:
    """The engine's SamplingParams for a request body. Each parameter the request leaves unset (null) takes
    the model's models.yaml default if it has one, else OpenAI's default (the server's for top_k: llama.cpp's
    extension, OpenAI has none)."""

    def pick(name: str, requested: float | None, server_default: float) -> float:
        if requested is not None:
            return requested
        return model_defaults.get(name, server_default)

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", body.temperature, _DEFAULTS.temperature),
        top_k=int(pick("top_k", body.top_k, default_top_k)),
        top_p=pick("top_p", body.top_p, _DEFAULTS.top_p),
        min_p=pick("min_p", body.min_p, 0.0),
        seed=body.seed,
        presence_penalty=pick("presence_penalty", body.presence_penalty, 0.0),
        frequency_penalty=pick("frequency_penalty", body.frequency_penalty, 0.0),
        repeat_penalty=pick("repeat_penalty", body.repeat_penalty, _DEFAULTS.repeat_penalty),
        logit_bias=MappingProxyType(_token_biases(body.logit_bias, info.n_vocab)),
        stop=body.stop_strings(),
        ignore_eos=body.ignore_eos,
        speculative=body.speculative,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        grammar=grammar,
    )


def audit_params(params: SamplingParams, n: int) -> dict[str, Any]:
    """The sampling parameters an audit record keeps: what the engine used, defaults filled in."""
    return {
        "n": n,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "seed": params.seed,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repeat_penalty": params.repeat_penalty,
        "logit_bias": {str(token): bias for token, bias in params.logit_bias.items()},
        "stop": list(params.stop),
        "ignore_eos": params.ignore_eos,
        "logprobs": params.logprobs,
        "top_logprobs": params.top_logprobs,
        "constrained": params.grammar is not None,
    }


def response_grammar(response_format: Mapping[str, Any] | None) -> str | None:
    """The GBNF grammar that constrains decoding to a response_format (None: plain text). A schema feature
    the grammar cannot enforce is a 400 naming it: answering unconstrained would break the contract."""
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return JSON_OBJECT_GRAMMAR
    if kind != "json_schema":
        return None
    assert response_format is not None  # the request model checked the shape
    try:
        return schema_grammar(response_format["json_schema"]["schema"])
    except UnsupportedSchemaError as exc:
        raise InvalidRequestError(f"response_format.json_schema: {exc}", param="response_format") from exc


def _token_biases(logit_bias: dict[str, float] | None, n_vocab: int) -> dict[int, float]:
    biases = {int(token): bias for token, bias in (logit_bias or {}).items()}
    outside = sorted(token for token in biases if not 0 <= token < n_vocab)
    if outside:
        raise InvalidRequestError(
            f"logit_bias names token ids outside this model's vocabulary [0, {n_vocab}): {outside[:5]}",
            param="logit_bias",
        )
    return biases


def engine_requests(
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    n: int,
    id_prefix: str,
    *,
    prompt_logprobs: int | None = None,
) -> tuple[str, list[Request]]:
    """One engine request per prompt, all answering to one response id (the engine applies its timeout)."""
    response_id = next_request_id(id_prefix)
    requests = [
        Request(
            prompt_tokens=tuple(prompt),
            params=params,
            n=n,
            request_id=response_id if len(prompts) == 1 else f"{response_id}-{index}",
            prompt_logprobs=prompt_logprobs,
        )
        for index, prompt in enumerate(prompts)
    ]
    return response_id, requests


def event_error(event: TokenEvent) -> ApiError | None:
    """The error a finishing event stands for, if it is not a normal finish."""
    if event.finish_reason is FinishReason.TIMEOUT:
        return RequestTimeoutError(event.error or "The request did not finish within the server's time limit.")
    if event.finish_reason is FinishReason.ERROR:
        return EngineFailureError(event.error or "The model failed while generating this answer.")
    if event.finish_reason is FinishReason.CANCELLED:
        return EngineFailureError("The request was cancelled by the server.")
    return None


def finish_reason_text(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


class Generation:
    """The running engine requests of one HTTP request, read as one stream of (choice index, event).

    Choice indices run prompt by prompt: prompt p's choice c is p * n + c. Cancelling (the client left, or
    an error ends the response early) frees every slot the request holds.
    """

    def __init__(
        self, streams: list[RequestStream], n: int, metrics: Metrics, received_at: float, endpoint: str
    ) -> None:
        self.streams = streams
        self.endpoint = endpoint
        self.n = n
        self.n_choices = n * len(streams)
        self._metrics = metrics
        # Observed on every streamed event: the labelled child once, not a labels() lookup (and lock) each time.
        self._inter_token_latency = metrics.inter_token_latency.labels(metrics.model_name)
        self._received_at = received_at
        self._first_token_seen = False
        self._last_token_at: dict[int, float] = {}
        self.final_events: dict[int, TokenEvent] = {}
        self._pumps: list[asyncio.Task[None]] = []
        self.audit: AuditRecord | None = None  # the request's audit record, when auditing is on
        self._tokens_seen: dict[int, int] = {}  # per choice, for the record of an answer cut short

    @classmethod
    def submit(
        cls, engine: Engine, requests: list[Request], metrics: Metrics, received_at: float, endpoint: str
    ) -> Generation:
        """Submit every request or none: if one is refused (queue full, too long), the others are cancelled."""
        streams: list[RequestStream] = []
        try:
            for request in requests:
                streams.append(engine.submit(request))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return cls(streams, requests[0].n, metrics, received_at, endpoint)

    def cancel(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        for stream in self.streams:
            stream.cancel()

    async def events(self) -> AsyncGenerator[tuple[int, TokenEvent], None]:
        try:
            source = self._one_stream() if len(self.streams) == 1 else self._merged_streams()
            async for prompt_index, event in source:
                index = prompt_index * self.n + event.choice_index
                self._observe(index, event)
                yield index, event
            elapsed = time.perf_counter() - self._received_at
            self._metrics.request_duration.labels(self.endpoint).observe(elapsed)
            self._metrics.e2e_latency.labels(self._metrics.model_name).observe(elapsed)
        finally:
            self.cancel()
            self._book_requests()
            self._book_audit()

    def _book_requests(self) -> None:
        """vLLM's per-request metrics, once per engine request: a request whose reader left (or failed) before
        every choice finished counts as aborted."""
        for prompt, stream in enumerate(self.streams):
            finals = [self.final_events.get(prompt * self.n + choice) for choice in range(self.n)]
            first = finals[0]
            complete = all(event is not None for event in finals)
            reason = first.finish_reason if complete and first is not None else None
            self._metrics.request_finished(
                FinishedRequest(
                    finish_reason=reason or FinishReason.CANCELLED,
                    n_prompt_tokens=stream.n_prompt_tokens,
                    n_generation_tokens=sum(event.n_generated_tokens for event in finals if event is not None),
                    queue_seconds=first.queue_seconds if first else None,
                    prefill_seconds=first.prefill_seconds if first else None,
                    decode_seconds=first.decode_seconds if first else None,
                )
            )

    async def _one_stream(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        async for event in self.streams[0]:
            yield 0, event

    async def _merged_streams(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        queue: asyncio.Queue[tuple[int, TokenEvent] | BaseException | None] = asyncio.Queue()

        async def pump(prompt_index: int, stream: RequestStream) -> None:
            try:
                async for event in stream:
                    queue.put_nowait((prompt_index, event))
            except Exception as exc:  # handed to the reader, which raises it in the request's context
                queue.put_nowait(exc)
            queue.put_nowait(None)

        self._pumps = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(self.streams)]
        n_open = len(self._pumps)
        while n_open:
            item = await queue.get()
            if item is None:
                n_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def _book_audit(self) -> None:
        """The audit record gets the response's own usage counts, the finish reasons and the output."""
        if self.audit is None:
            return
        usage = self.usage()
        self.audit.prompt_tokens = usage["prompt_tokens"]
        self.audit.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
        # A choice cut short (the client left) has no final event: count the tokens it had streamed.
        unfinished = sum(n for index, n in self._tokens_seen.items() if index not in self.final_events)
        self.audit.generated_tokens = usage["completion_tokens"] + unfinished
        reasons = [event.finish_reason.value for _, event in sorted(self.final_events.items()) if event.finish_reason]
        self.audit.finish_reason = ",".join(dict.fromkeys(reasons)) or None
        self.audit.keep_output()

    def _observe(self, index: int, event: TokenEvent) -> None:
        if self.audit is not None:
            self._tokens_seen[index] = self._tokens_seen.get(index, 0) + len(event.token_ids)
            if self.audit.wants_output and event.text:
                self.audit.add_output(index, event.text)
        if event.finish_reason is not None:
            self.final_events[index] = event
        if not event.token_ids:
            return
        now = time.perf_counter()
        if not self._first_token_seen:
            self._first_token_seen = True
            self._metrics.time_to_first_token.labels(self._metrics.model_name).observe(now - self._received_at)
            if self.audit is not None:
                self.audit.ttft_ms = round((now - self._received_at) * 1000.0, 3)
        last = self._last_token_at.get(index)
        if last is not None:
            gap = (now - last) / len(event.token_ids)
            self._inter_token_latency.observe(gap)
        self._last_token_at[index] = now

    def usage(self) -> dict[str, Any]:
        """Exact counts: each prompt once (its choices share one prefill), every choice's generated tokens."""
        n_prompt = sum(stream.n_prompt_tokens for stream in self.streams)
        n_completion = sum(event.n_generated_tokens for event in self.final_events.values())
        n_cached = sum(
            self.final_events[prompt * self.n].n_cached_tokens
            for prompt in range(len(self.streams))
            if prompt * self.n in self.final_events
        )
        return {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_completion,
            "total_tokens": n_prompt + n_completion,
            "prompt_tokens_details": {"cached_tokens": n_cached},
        }


@dataclass
class ChoiceResult:
    """One choice of a non-streamed answer, gathered from its events."""

    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1.., when asked (echo)
    finish_reason: FinishReason | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


async def collect_choices(generation: Generation) -> list[ChoiceResult]:
    """Read a generation to its end; an engine failure or timeout of any choice fails the whole answer."""
    results = [ChoiceResult() for _ in range(generation.n_choices)]
    async for index, event in generation.events():
        error = event_error(event)
        if error is not None:
            raise error
        result = results[index]
        result.text_parts.append(event.text)
        result.logprobs.extend(event.logprobs)
        result.prompt_logprobs.extend(event.prompt_logprobs)
        result.finish_reason = event.finish_reason or result.finish_reason
    return results
