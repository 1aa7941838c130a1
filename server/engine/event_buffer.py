"""Holding a stream's tokens for a few milliseconds, so that several travel to the event loop (and the client)
together.

Every hand-off from the engine thread to the event loop wakes the loop, and every event becomes one socket
write and one read in the client: ~0.5 ms of CPU per token single stream on a 2-core machine (bench.overhead),
taken from llama.cpp's compute threads while a step lasts ~6 ms. A person reading a stream cannot tell tokens
that arrive 20 ms apart in pairs from tokens that arrive one by one, so the engine hands its tokens over at most
once per interval, merging a choice's consecutive events into one (the same form as a speculative step that
emits several tokens at once). vLLM's `--stream-interval` makes the same trade in tokens; an interval in time
leaves a slow model (Qwen3-Next on RAM: 40-100 ms a token) streaming every token as it comes.

What never waits: a choice's first token (time to first token), its last event (finish, error), and anything
while the engine is about to sleep (no step follows to carry it).
"""

from __future__ import annotations

from dataclasses import replace

from server.engine.request import TokenEvent


def merge_events(earlier: TokenEvent, later: TokenEvent) -> TokenEvent:
    """One event saying what `earlier` then `later` said: texts, tokens and logprobs joined; the counts, finish
    and phase times (cumulative or final) from `later`; prompt logprobs (first event only) from `earlier`."""
    return replace(
        later,
        text=earlier.text + later.text,
        token_ids=earlier.token_ids + later.token_ids,
        logprobs=earlier.logprobs + later.logprobs,
        prompt_logprobs=earlier.prompt_logprobs or later.prompt_logprobs,
    )


def _is_urgent(event: TokenEvent) -> bool:
    """A choice's first tokens (time to first token) or its end: never held."""
    first = event.n_generated_tokens == len(event.token_ids)
    return first or event.finish_reason is not None or event.error is not None or bool(event.prompt_logprobs)


class TokenEventBuffer:
    """The engine thread's tokens not yet handed to the event loop, one merged event per choice."""

    def __init__(self, interval_s: float) -> None:
        if interval_s < 0:
            raise ValueError(f"the stream interval must be >= 0 seconds, got {interval_s}")
        self.interval_s = interval_s
        self._held: dict[tuple[str, int], TokenEvent] = {}  # by (request, choice), in arrival order
        self._urgent = False
        self._last_handed_at = float("-inf")

    def __len__(self) -> int:
        return len(self._held)

    def add(self, events: list[TokenEvent]) -> None:
        for event in events:
            key = (event.request_id, event.choice_index)
            held = self._held.get(key)
            self._held[key] = event if held is None else merge_events(held, event)
            self._urgent = self._urgent or _is_urgent(event)

    def take(self, now: float, *, next_step_s: float = 0.0, idle: bool = False) -> list[TokenEvent]:
        """The events due now: all of them when waiting for the next step (expected to take `next_step_s`)
        would pass the interval since the last hand-off, when something urgent arrived, or when the engine goes
        idle (`idle`); else none."""
        if not self._held:
            return []
        due = now + next_step_s - self._last_handed_at >= self.interval_s
        if not (idle or self._urgent or due):
            return []
        events = list(self._held.values())
        self._held.clear()
        self._urgent = False
        self._last_handed_at = now
        return events
