"""What flows into the engine (Request) and out of it (TokenEvent)."""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field

from bindings.protocol import SamplingParams, TokenLogprob


def next_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-generation token or a stop string
    LENGTH = "length"  # max_tokens reached, or the slot's context is full
    CANCELLED = "cancelled"  # the client went away or cancelled; nobody reads this one
    ERROR = "error"  # the backend failed (see TokenEvent.error)
    TIMEOUT = "timeout"  # the per-request deadline passed


@dataclass(frozen=True)
class Request:
    """A tokenized prompt plus how to sample from it; `n` choices share one prefill."""

    prompt_tokens: tuple[int, ...]
    params: SamplingParams
    n: int = 1
    request_id: str = field(default_factory=next_request_id)
    # Prompt logprobs (/v1/completions echo + logprobs): None → not computed; N → every prompt token's
    # logprob after the first, with the N best alternatives. Such a prompt is computed whole (see scheduler).
    prompt_logprobs: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() value after which the request is failed


@dataclass(frozen=True)
class TokenEvent:
    """What one step produced for one choice of a request.

    `text` is the new, complete-UTF-8, stop-string-free text since the last event. `finish_reason` is set
    on the choice's last event. Usage counts are cumulative for the choice.
    """

    request_id: str
    choice_index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    n_prompt_tokens: int = 0
    n_cached_tokens: int = 0  # prompt tokens whose KV was reused rather than computed
    n_generated_tokens: int = 0
    error: str | None = None  # set with FinishReason.ERROR / TIMEOUT
    # Set on each choice's first event when the request asked for them: prompt tokens 1.. (token 0 has none).
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    # On a choice's finishing event: seconds its request waited for a slot (queue), from the slot to the first
    # token (prefill), from the first token to the last (decode); None where a phase never started.
    queue_seconds: float | None = None
    prefill_seconds: float | None = None
    decode_seconds: float | None = None
