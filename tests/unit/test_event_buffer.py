"""The engine's outbox: tokens of quick steps travel together, never the first or last ones, never past the
interval (server/engine/event_buffer.py)."""

from __future__ import annotations

import pytest

from bindings.protocol import TokenLogprob
from server.engine.event_buffer import TokenEventBuffer, merge_events
from server.engine.request import FinishReason, TokenEvent


def token(request: str, n_generated: int, text: str, *, choice: int = 0, **extra: object) -> TokenEvent:
    return TokenEvent(request, choice, text, (n_generated,), n_generated_tokens=n_generated, **extra)  # type: ignore[arg-type]


def test_a_zero_interval_hands_every_step_over() -> None:
    buffer = TokenEventBuffer(0.0)
    for n in range(1, 4):
        buffer.add([token("a", n, f"t{n}")])
        assert [e.text for e in buffer.take(now=n * 0.001)] == [f"t{n}"]


def test_quick_steps_wait_for_the_interval_then_go_as_one_event() -> None:
    buffer = TokenEventBuffer(0.020)
    buffer.add([token("a", 1, "Hel")])
    assert [e.text for e in buffer.take(now=0.0, next_step_s=0.006)] == ["Hel"], "the first token never waits"
    handed: list[TokenEvent] = []
    for step in range(2, 6):  # 6 ms steps
        buffer.add([token("a", step, f"<{step}>")])
        handed += buffer.take(now=(step - 1) * 0.006, next_step_s=0.006)
    assert [e.text for e in handed] == ["<2><3><4>"], "due once the next step would end past 20 ms"
    assert handed[0].token_ids == (2, 3, 4) and handed[0].n_generated_tokens == 4
    assert len(buffer) == 1, "token 5 waits for the next interval"


def test_the_finishing_event_takes_everything_held_with_it() -> None:
    buffer = TokenEventBuffer(1.0)
    buffer.add([token("a", 1, "x"), token("b", 1, "y")])
    buffer.take(now=0.0)
    buffer.add([token("a", 2, "x2"), token("b", 2, "y2")])
    assert buffer.take(now=0.01) == []
    buffer.add([token("a", 3, "x3", finish_reason=FinishReason.STOP)])
    handed = buffer.take(now=0.02)
    assert [(e.request_id, e.text, e.finish_reason) for e in handed] == [
        ("a", "x2x3", FinishReason.STOP),
        ("b", "y2", None),
    ]


def test_an_idle_engine_leaves_nothing_behind() -> None:
    buffer = TokenEventBuffer(1.0)
    buffer.add([token("a", 1, "x")])
    buffer.take(now=0.0)
    buffer.add([token("a", 2, "y")])
    assert buffer.take(now=0.001) == []
    assert [e.text for e in buffer.take(now=0.002, idle=True)] == ["y"]
    assert len(buffer) == 0 and buffer.take(now=0.003, idle=True) == []


def test_choices_of_one_request_stay_apart() -> None:
    buffer = TokenEventBuffer(1.0)
    buffer.add([token("a", 1, "p", choice=0), token("a", 1, "q", choice=1)])
    buffer.take(now=0.0)
    buffer.add([token("a", 2, "p2", choice=0), token("a", 2, "q2", choice=1), token("a", 3, "p3", choice=0)])
    handed = buffer.take(now=0.0, idle=True)
    assert [(e.choice_index, e.text) for e in handed] == [(0, "p2p3"), (1, "q2")]


def test_merging_keeps_logprobs_in_order_and_the_first_events_prompt_logprobs() -> None:
    first = TokenLogprob(token=1, text=b"a", logprob=-0.1)
    second = TokenLogprob(token=2, text=b"b", logprob=-0.2)
    prompt = (TokenLogprob(token=9, text=b"p", logprob=-1.0),)
    earlier = TokenEvent("r", 0, "a", (1,), logprobs=(first,), n_generated_tokens=1, prompt_logprobs=prompt)
    later = TokenEvent("r", 0, "b", (2,), logprobs=(second,), n_generated_tokens=2, n_cached_tokens=5)
    merged = merge_events(earlier, later)
    assert merged.logprobs == (first, second) and merged.prompt_logprobs == prompt
    assert (merged.text, merged.token_ids, merged.n_generated_tokens, merged.n_cached_tokens) == ("ab", (1, 2), 2, 5)


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        TokenEventBuffer(-0.001)
