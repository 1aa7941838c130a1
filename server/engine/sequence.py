"""A Sequence is one choice of one request as it moves through a slot; a Slot is one llama.cpp sequence id."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from bindings.protocol import TokenLogprob
from server.engine.request import FinishReason, Request
from server.engine.speculation import SpecStats
from server.engine.text_stream import TextStream


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # no slot yet
    PREFILL = "prefill"  # prompt tokens still to compute
    FORKING = "forking"  # choice > 0 of an n > 1 request: waits for the parent's prefill, then copies it
    DECODE = "decode"  # has a sampled token waiting to be fed back
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int  # engine-unique; also the backend's sampler id
    request: Request
    choice_index: int
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int | None = None
    n_prompt_done: int = 0  # prompt tokens whose KV/state is in the slot
    n_cached_tokens: int = 0  # of those, how many were reused instead of computed
    output_tokens: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # of prompt tokens 1.., as computed
    finish_reason: FinishReason | None = None
    # time.monotonic() when the sequence got a slot and when its first token was sampled (the request's
    # queue / prefill / decode times, as vLLM splits them; see TokenEvent)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    spec: SpecStats = field(default_factory=SpecStats)  # speculative decoding: drafted / accepted, back-off
    text: TextStream = field(init=False)

    def __post_init__(self) -> None:
        self.text = TextStream(self.request.params.stop)

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt_tokens

    @property
    def n_prompt_tokens(self) -> int:
        return len(self.request.prompt_tokens)

    @property
    def pending_token(self) -> int:
        """The last sampled token, which the next decode feeds back."""
        return self.output_tokens[-1]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.request.prompt_logprobs is not None

    @property
    def n_tokens_total(self) -> int:
        return self.n_prompt_tokens + len(self.output_tokens)


@dataclass(eq=False)
class Slot:
    """One llama.cpp sequence id, and what its KV cache / recurrent state currently holds."""

    index: int
    cached_tokens: list[int] = field(default_factory=list)  # tokens whose KV/state is in the slot, in order
    snapshot_tokens: tuple[int, ...] | None = None  # tokens of the saved state (models without partial removal)
    sequence: Sequence | None = None
    needs_save: bool = False  # save a snapshot before the next decode (prompt just finished)
    n_drafted: int = 0  # speculative decoding: draft tokens verified in this slot, and how many were accepted
    n_accepted: int = 0
    checkpoint_length: int = 0  # tokens the slot held at its last speculative checkpoint (no partial removal)

    @property
    def free(self) -> bool:
        return self.sequence is None


@dataclass
class StepEvent:
    """What a commit produced for one sequence (the engine turns it into a TokenEvent)."""

    sequence: Sequence
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: FinishReason | None
    error: str | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # on a choice's first event, when the request wants them
