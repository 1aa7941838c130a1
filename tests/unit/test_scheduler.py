"""The scheduler, driven step by step against the deterministic fake backend (no model, no threads)."""

from __future__ import annotations

from collections.abc import Sequence as Sequence_
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from bindings.protocol import BackendError, BatchEntry, Drafter, DraftRequest, SampledToken, SamplingParams
from server.engine.fake_backend import CONTROL_TEXT, EOS, FakeBackend, FakeBackendConfig
from server.engine.request import FinishReason, Request
from server.engine.scheduler import Scheduler, SchedulerConfig, StepPlan, common_prefix_length
from server.engine.sequence import Sequence, StepEvent
from server.engine.speculation import SpeculationConfig, verify_draft

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
TOKEN_BYTES = FakeBackendConfig().state_bytes_per_token  # what one cached token's state takes in the fake
CACHE_BYTES = 1024 * TOKEN_BYTES  # room for every prompt of these tests


class Harness:
    """A scheduler plus the fake backend, with one call per engine step."""

    def __init__(
        self,
        *,
        n_slots: int = 4,
        n_ctx: int = 64,
        budget: int = 16,
        partial: bool = True,
        cache_bytes: int = 0,
        state_bytes_fixed: int = 0,
        drafter: Drafter | None = None,
        speculation: SpeculationConfig | None = None,
    ) -> None:
        self.backend = FakeBackend(
            FakeBackendConfig(
                n_slots=n_slots,
                n_ctx_per_slot=n_ctx,
                n_batch=budget,
                supports_partial_removal=partial,
                state_bytes_fixed=state_bytes_fixed,
            )
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                n_slots=n_slots,
                n_ctx_per_slot=n_ctx,
                max_batch_tokens=budget,
                supports_partial_removal=partial,
                snapshot_min_tokens=4,
                prompt_cache_bytes=cache_bytes,
                speculation=speculation or (SpeculationConfig() if drafter is not None else None),
            ),
            self.backend,
            self.backend.state_size,
            drafter,
        )
        self.n_seq = 0
        self.plans: list[StepPlan] = []
        self.events: list[StepEvent] = []

    def submit(
        self, prompt: bytes | str, params: SamplingParams = GREEDY, n: int = 1, prompt_logprobs: int | None = None
    ) -> Request:
        tokens = tuple(prompt.encode() if isinstance(prompt, str) else prompt)
        request = Request(tokens, params, n=n, prompt_logprobs=prompt_logprobs)
        choices = []
        for index in range(n):
            choices.append(Sequence(self.n_seq, request, index))
            self.n_seq += 1
        self.scheduler.add(choices)
        return request

    def step(self) -> StepPlan:
        plan = self.scheduler.schedule()
        for seq in plan.admitted:
            self.backend.new_sampler(seq.seq_id, seq.request.params)
        try:
            self.backend.apply(plan.ops)
            if plan.entries:
                self.backend.decode(plan.entries)
            sampled = {seq.seq_id: self._sample(plan, seq, i) for seq, i in plan.samples}
            prompt_logprobs = {
                seq.seq_id: self.backend.prompt_logprobs(entry.slot)
                for entry, seq in zip(plan.entries, plan.entry_sequences, strict=True)
                if entry.logprob_targets
            }
        except BackendError as exc:  # as the engine does: fail the plan's requests, keep going
            events = self.scheduler.fail(plan, str(exc))
        else:
            events = self.scheduler.commit(plan, sampled, prompt_logprobs)
        for event in events:
            if event.finish_reason is not None:
                self.backend.free_sampler(event.sequence.seq_id)
        self.plans.append(plan)
        self.events += events
        return plan

    def _sample(self, plan: StepPlan, seq: Sequence, index: int) -> SampledToken | list[SampledToken]:
        """As the engine: a speculating sequence is verified position by position (verify_draft)."""
        params = seq.request.params
        draft = plan.drafts.get(seq.seq_id)
        if draft is None:
            return self.backend.sample(seq.seq_id, index, params)
        return verify_draft(draft, lambda i: self.backend.sample(seq.seq_id, index + i, params))

    def run(self, max_steps: int = 500) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_work:
                return
            self.step()
        raise AssertionError("scheduler did not finish")

    def text(self, request: Request, choice: int = 0) -> str:
        return "".join(
            e.text
            for e in self.events
            if e.sequence.request.request_id == request.request_id and e.sequence.choice_index == choice
        )

    def finish(self, request: Request, choice: int = 0) -> FinishReason | None:
        reasons = [
            e.finish_reason
            for e in self.events
            if e.sequence.request.request_id == request.request_id
            and e.sequence.choice_index == choice
            and e.finish_reason
        ]
        assert len(reasons) == 1, reasons
        return reasons[0]


def alone(prompt: str, params: SamplingParams = GREEDY, **kwargs: int | bool) -> str:
    h = Harness(**kwargs)  # type: ignore[arg-type]
    request = h.submit(prompt, params)
    h.run()
    return h.text(request)


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2], [1, 2]) == 2


def test_prefill_and_decode_share_one_step() -> None:
    h = Harness(budget=16)
    first = h.submit("abcd")
    h.step()  # prefill of the first request
    second = h.submit("0123456789")
    plan = h.step()
    kinds = {(e.slot, len(e.tokens)) for e in plan.entries}
    assert kinds == {(0, 1), (1, 10)}, "one decode token for slot 0 and the whole prompt of slot 1"
    assert [e.slot for e in plan.entries] == [0, 1]
    h.run()
    assert h.text(first) == alone("abcd")
    assert h.text(second) == alone("0123456789")


def test_token_budget_is_respected_and_long_prompts_are_chunked() -> None:
    h = Harness(budget=8, n_ctx=128)
    running = h.submit("ab", replace(GREEDY, max_tokens=30))
    h.step()
    long_request = h.submit("x" * 40)
    h.run()
    assert max(p.n_tokens for p in h.plans) <= 8
    chunks = [e for p in h.plans for e in p.entries if e.slot == 1 and len(e.tokens) > 1]
    assert [len(c.tokens) for c in chunks] == [7, 7, 7, 7, 7, 5], "7 prefill tokens beside 1 decode token per step"
    assert [c.start_pos for c in chunks] == [0, 7, 14, 21, 28, 35]
    decode_steps = [p for p in h.plans if any(e.slot == 0 and len(e.tokens) == 1 for e in p.entries)]
    assert len(decode_steps) >= 6, "the running stream kept decoding while the long prompt was prefilled"
    assert h.text(long_request) == alone("x" * 40, n_ctx=128)
    assert h.text(running) == alone("ab", replace(GREEDY, max_tokens=30), n_ctx=128)


def test_entries_are_ordered_by_slot_and_logits_indices_match() -> None:
    h = Harness(budget=32)
    for prompt in ["aaaa", "bb", "cccccc"]:
        h.submit(prompt)
    plan = h.step()
    assert [e.slot for e in plan.entries] == [0, 1, 2]
    assert [index for _, index in plan.samples] == [3, 5, 11]


def test_slot_is_reused_after_finish_and_the_lowest_free_slot_is_taken() -> None:
    h = Harness(n_slots=2)
    a = h.submit("first", replace(GREEDY, max_tokens=2))
    b = h.submit("second", replace(GREEDY, max_tokens=6))
    c = h.submit("zzz")  # waits: both slots busy
    h.step()
    assert h.scheduler.n_waiting == 1
    h.step()  # a finishes here (2 tokens)
    assert h.finish(a) is FinishReason.LENGTH
    h.step()
    assert h.scheduler.slots[0].sequence is not None
    assert h.scheduler.slots[0].sequence.request is c
    h.run()
    assert h.finish(b) is FinishReason.LENGTH
    assert h.text(c) == alone("zzz")


def test_cancel_frees_the_slot_for_a_waiting_request() -> None:
    h = Harness(n_slots=1)
    long_running = h.submit("abc", replace(GREEDY, max_tokens=50))
    waiting = h.submit("def")
    h.step()
    h.step()
    events = h.scheduler.cancel(long_running.request_id)
    assert [e.finish_reason for e in events] == [FinishReason.CANCELLED]
    assert h.scheduler.slots[0].free
    h.run()
    assert h.text(waiting) == alone("def")
    assert h.backend.n_live_samplers() == 1, "the cancelled sequence's sampler is the engine's to free"


def test_cancel_of_a_waiting_request_removes_it_from_the_queue() -> None:
    h = Harness(n_slots=1)
    h.submit("abc")
    waiting = h.submit("def")
    h.step()
    h.scheduler.cancel(waiting.request_id)
    assert h.scheduler.n_waiting == 0
    h.run()
    assert all(e.sequence.request is not waiting or e.finish_reason for e in h.events)


def test_new_request_takes_the_slot_with_the_longest_shared_prefix() -> None:
    h = Harness(n_slots=3)
    h.submit("system prompt: be terse. user: hi")
    h.submit("another conversation entirely")
    h.submit("third")
    h.run()
    follow_up = h.submit("another conversation entirely, continued")
    plan = h.step()
    assert follow_up is h.scheduler.slots[1].sequence.request  # type: ignore[union-attr]
    (entry,) = plan.entries
    n_shared = len("another conversation entirely")
    assert entry.start_pos == n_shared and len(entry.tokens) == len(follow_up.prompt_tokens) - n_shared
    h.run()
    assert h.text(follow_up) == alone("another conversation entirely, continued")
    assert h.events[-1].sequence.n_cached_tokens == n_shared


def test_identical_prompt_recomputes_only_its_last_token() -> None:
    h = Harness(n_slots=1)
    first = h.submit("repeat me")
    h.run()
    again = h.submit("repeat me")
    plan = h.step()
    assert [op.kind for op in plan.ops] == ["truncate"]
    assert plan.entries[0].tokens == (ord("e"),)
    h.run()
    assert h.text(again) == h.text(first)


def test_recurrent_model_restores_a_snapshot_instead_of_truncating() -> None:
    h = Harness(n_slots=1, partial=False)
    first = h.submit("shared prefix", replace(GREEDY, max_tokens=4))
    h.run()
    assert [op.kind for p in h.plans for op in p.ops] == ["save"], "prompt state saved once prefilled"
    second = h.submit("shared prefix and more")
    plan = h.step()
    assert [op.kind for op in plan.ops] == ["restore"]
    assert plan.entries[0].start_pos == len("shared prefix")
    h.run()
    assert h.text(second) == alone("shared prefix and more", partial=False)
    assert h.text(first) == alone("shared prefix", replace(GREEDY, max_tokens=4), partial=False)
    assert not any(op.kind == "truncate" for op in h.backend.ops)


def test_recurrent_model_continues_a_conversation_without_restoring() -> None:
    h = Harness(n_slots=1, partial=False)
    first = h.submit("hello", replace(GREEDY, max_tokens=3))
    h.run()
    history = "hello" + h.text(first)[:2]  # the slot holds prompt + all but the last sampled token
    follow = h.submit(history + " next")
    plan = h.step()
    assert plan.ops == []
    assert plan.entries[0].start_pos == len(history)
    h.run()
    assert h.text(follow) == alone(history + " next", partial=False)


def test_recurrent_model_clears_when_nothing_is_reusable() -> None:
    h = Harness(n_slots=1, partial=False)
    h.submit("abcdefgh", replace(GREEDY, max_tokens=2))
    h.run()
    other = h.submit("abcxyz")  # shares 3 tokens, but state cannot be cut back to them
    plan = h.step()
    assert [op.kind for op in plan.ops] == ["clear"]
    assert plan.entries[0].start_pos == 0
    h.run()
    assert h.text(other) == alone("abcxyz", partial=False)


def test_prefix_reuse_can_be_switched_off() -> None:
    h = Harness(n_slots=1)
    h.scheduler = Scheduler(replace(h.scheduler.config, prefix_reuse=False), h.backend)
    h.submit("same")
    h.run()
    h.submit("same")
    plan = h.step()
    assert [op.kind for op in plan.ops] == ["clear"] and plan.entries[0].start_pos == 0


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    reference = alone("stop test", replace(GREEDY, max_tokens=12))
    stop = reference[5:8]  # three characters = three byte tokens, so the stop string spans tokens
    h = Harness()
    request = h.submit("stop test", replace(GREEDY, max_tokens=12, stop=(stop, "never-seen")))
    h.run()
    assert h.text(request) == reference[:5]
    assert h.finish(request) is FinishReason.STOP
    emitted = [e.text for e in h.events]
    assert all(stop not in piece for piece in emitted)


def test_max_tokens_is_exact() -> None:
    h = Harness()
    request = h.submit("count", replace(GREEDY, max_tokens=5))
    h.run()
    assert h.finish(request) is FinishReason.LENGTH
    assert sum(len(e.token_ids) for e in h.events) == 5


def test_generation_stops_with_length_at_the_context_end() -> None:
    h = Harness(n_ctx=20)
    request = h.submit("0123456789", replace(GREEDY, max_tokens=None))
    h.run()
    assert h.finish(request) is FinishReason.LENGTH
    assert sum(len(e.token_ids) for e in h.events) == 10, "prompt 10 + output 10 = the 20-token context"
    assert max(e.start_pos + len(e.tokens) for p in h.plans for e in p.entries) <= 20


def test_end_of_generation_token_stops_unless_ignored() -> None:
    eos_first = SamplingParams(temperature=0.0, max_tokens=5, logit_bias={EOS: 100.0})
    h = Harness()
    stopped = h.submit("x", eos_first)
    ignoring = h.submit("y", replace(eos_first, ignore_eos=True))
    h.run()
    assert h.finish(stopped) is FinishReason.STOP
    assert [t for e in h.events if e.sequence.request is stopped for t in e.token_ids] == [EOS]
    assert h.finish(ignoring) is FinishReason.LENGTH


def test_n_choices_share_one_prefill_and_differ_when_sampled() -> None:
    h = Harness(n_slots=4)
    # The control tokens (end of generation among them) are banned: a random seed may not end a choice early.
    no_control = {token: -100.0 for token in CONTROL_TEXT}
    params = SamplingParams(temperature=1.5, max_tokens=8, seed=None, logit_bias=no_control)
    request = h.submit("shared prompt", params, n=3)
    h.run()
    prefill_entries = [e for p in h.plans for e in p.entries if len(e.tokens) > 1]
    assert len(prefill_entries) == 1, "the prompt is computed once"
    copies = [op for p in h.plans for op in p.ops if op.kind == "copy"]
    assert sorted((op.src, op.slot) for op in copies) == [(0, 1), (0, 2)]
    events = [e for e in h.events if e.sequence.request is request]
    choices = [tuple(t for e in events if e.sequence.choice_index == i for t in e.token_ids) for i in range(3)]
    assert all(len(tokens) == 8 for tokens in choices)
    assert len(set(choices)) > 1
    for i in range(3):
        assert h.finish(request, i) is FinishReason.LENGTH


def test_n_choices_wait_until_enough_slots_are_free() -> None:
    h = Harness(n_slots=2)
    first = h.submit("a", replace(GREEDY, max_tokens=3))
    pair = h.submit("b", GREEDY, n=2)
    h.step()
    assert h.scheduler.n_waiting == 1, "two choices need two free slots"
    h.run()
    assert h.text(pair, 0) == h.text(pair, 1) == alone("b")
    assert h.finish(first) is FinishReason.LENGTH


def test_failed_decode_fails_only_the_batch_and_forgets_its_slots() -> None:
    h = Harness(n_slots=2)
    h.submit("fine", replace(GREEDY, max_tokens=3))
    h.run()
    ok = h.submit("fine", replace(GREEDY, max_tokens=3))
    plan = h.scheduler.schedule()
    events = h.scheduler.fail(plan, "boom")
    assert [(e.sequence.request is ok, e.finish_reason, e.error) for e in events] == [
        (True, FinishReason.ERROR, "boom")
    ]
    next_plan = h.scheduler.schedule()
    assert [op.kind for op in next_plan.ops] == ["clear"]
    assert h.scheduler.slots[0].cached_tokens == []


def test_expired_requests_time_out_waiting_or_running() -> None:
    h = Harness(n_slots=1)
    running = Request(tuple(b"abc"), replace(GREEDY, max_tokens=50), deadline=10.0)
    waiting = Request(tuple(b"def"), GREEDY, deadline=10.0)
    h.scheduler.add([Sequence(0, running, 0)])
    h.scheduler.add([Sequence(1, waiting, 0)])
    h.backend.new_sampler(0, running.params)
    h.step()
    events = h.scheduler.expire(now=11.0)
    assert sorted(e.sequence.request.request_id for e in events) == sorted([running.request_id, waiting.request_id])
    assert {e.finish_reason for e in events} == {FinishReason.TIMEOUT}
    assert not h.scheduler.has_work


def test_budget_smaller_than_slots_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        SchedulerConfig(n_slots=8, n_ctx_per_slot=64, max_batch_tokens=4)


def test_sampled_token_logprobs_travel_with_the_event() -> None:
    h = Harness()
    h.submit("lp", SamplingParams(temperature=0.0, max_tokens=2, logprobs=True, top_logprobs=3))
    h.run()
    logprobs = [lp for e in h.events for lp in e.logprobs]
    assert len(logprobs) == 2
    assert all(len(lp.top) == 3 and lp.top[0].logprob >= lp.top[1].logprob for lp in logprobs)
    assert all(lp.token == lp.top[0].token for lp in logprobs), "greedy picks the most likely token"


def test_prompt_cache_brings_back_a_prefix_its_slot_lost() -> None:
    h = Harness(n_slots=1, cache_bytes=CACHE_BYTES)
    first = h.submit("conversation one, turn one", replace(GREEDY, max_tokens=3))
    h.run()
    h.submit("something else entirely", replace(GREEDY, max_tokens=3))
    plan = h.step()
    assert [op.kind for op in plan.ops] == ["stash", "clear"], "the slot's contents go to RAM before the clear"
    h.run()
    history = "conversation one, turn one" + h.text(first)[:2]
    returning = h.submit(history + " turn two")
    plan = h.step()
    assert [op.kind for op in plan.ops] == ["stash", "load"]
    assert plan.entries[0].start_pos == len(history)
    h.run()
    assert h.text(returning) == alone(history + " turn two")
    assert h.events[-1].sequence.n_cached_tokens == len(history)


def test_prompt_cache_entry_is_truncated_to_the_shared_prefix() -> None:
    h = Harness(n_slots=1, cache_bytes=CACHE_BYTES)
    h.submit("shared system prompt. question A", replace(GREEDY, max_tokens=2))
    h.run()
    h.submit("unrelated", replace(GREEDY, max_tokens=2))
    h.run()
    other = h.submit("shared system prompt. question B")
    plan = h.step()
    n_shared = len("shared system prompt. question ")
    assert [op.kind for op in plan.ops] == ["stash", "load", "truncate"]
    assert plan.ops[-1].n_keep == n_shared and plan.entries[0].start_pos == n_shared
    h.run()
    assert h.text(other) == alone("shared system prompt. question B")


def test_prompt_cache_on_a_recurrent_model_needs_a_whole_prefix() -> None:
    h = Harness(n_slots=1, partial=False, cache_bytes=CACHE_BYTES)
    first = h.submit("recurrent prompt", replace(GREEDY, max_tokens=3))
    h.run()
    h.submit("a different prompt", replace(GREEDY, max_tokens=3))
    h.run()
    history = "recurrent prompt" + h.text(first)[:2]
    cut = h.submit("recurrent prompX")  # shares a prefix with the entry, but the state cannot be cut back
    plan = h.step()
    assert "load" not in [op.kind for op in plan.ops]
    h.run()
    whole = h.submit(history + " more")
    plan = h.step()
    assert "load" in [op.kind for op in plan.ops] and plan.entries[0].start_pos == len(history)
    h.run()
    assert h.text(whole) == alone(history + " more", partial=False)
    assert h.text(cut) == alone("recurrent prompX", partial=False)
    assert not any(op.kind == "truncate" for op in h.backend.ops)


def test_prompt_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used() -> None:
    # each entry is its prompt plus the one generated token that was fed back: 13, 13, 15 tokens
    h = Harness(n_slots=1, cache_bytes=30 * TOKEN_BYTES)
    for prompt in ["alpha prompt", "bravo prompt", "charlie prompt", "delta prompt"]:
        h.submit(prompt, replace(GREEDY, max_tokens=2))
        h.run()
        assert h.backend.stashed_bytes() <= 30 * TOKEN_BYTES
    drops = [op for p in h.plans for op in p.ops if op.kind == "drop"]
    stashes = [op for p in h.plans for op in p.ops if op.kind == "stash"]
    assert [op.n_bytes for op in stashes] == [13 * TOKEN_BYTES, 13 * TOKEN_BYTES, 15 * TOKEN_BYTES]
    assert len(stashes) == 3 and [op.entry for op in drops] == [stashes[0].entry], "alpha + bravo + charlie > 30"
    assert h.backend.n_stashed() == 2 and h.backend.stashed_bytes() == 28 * TOKEN_BYTES
    counters = h.scheduler.counters
    assert (counters.prompt_cache_entries, counters.prompt_cache_bytes) == (2, 28 * TOKEN_BYTES)
    assert counters.n_prompt_cache_evictions == 1
    again = h.submit("alpha prompt again")  # its entry was evicted: computed from scratch
    plan = h.step()
    assert "load" not in [op.kind for op in plan.ops] and plan.entries[0].start_pos == 0
    h.run()
    assert h.text(again) == alone("alpha prompt again")


def test_a_large_entry_evicts_as_many_small_ones_as_it_needs() -> None:
    h = Harness(n_slots=1, cache_bytes=40 * TOKEN_BYTES)
    for prompt in ["one prompt", "two prompt", "three prompt"]:  # entries of 11, 11 and 13 tokens
        h.submit(prompt, replace(GREEDY, max_tokens=2))
        h.run()
    big = h.submit("a much longer prompt of thirty tokens", replace(GREEDY, max_tokens=2))
    h.run()
    h.submit("end", replace(GREEDY, max_tokens=2))
    plan = h.step()  # stashes the long one (38 tokens): only it fits
    n_big = len("a much longer prompt of thirty tokens") + 1
    assert [op.kind for op in plan.ops] == ["drop", "drop", "drop", "stash", "clear"]
    assert plan.ops[3].n_bytes == n_big * TOKEN_BYTES
    assert h.backend.stashed_bytes() == n_big * TOKEN_BYTES == h.scheduler.counters.prompt_cache_bytes
    assert h.scheduler.counters.n_prompt_cache_evictions == 3
    h.run()
    assert h.finish(big) is FinishReason.LENGTH


def test_a_state_larger_than_the_whole_cache_is_not_stashed_and_is_counted() -> None:
    h = Harness(n_slots=1, cache_bytes=8 * TOKEN_BYTES)
    h.submit("more than eight tokens", replace(GREEDY, max_tokens=2))
    h.run()
    h.submit("next", replace(GREEDY, max_tokens=2))
    plan = h.step()
    assert [op.kind for op in plan.ops] == ["clear"]
    assert h.scheduler.counters.n_prompt_cache_stashes_skipped == 1 and h.backend.n_stashed() == 0


def test_prompt_cache_hits_and_misses_are_counted() -> None:
    h = Harness(n_slots=1, cache_bytes=CACHE_BYTES)
    first = h.submit("a returning conversation", replace(GREEDY, max_tokens=3))
    h.run()
    h.submit("unrelated", replace(GREEDY, max_tokens=2))
    h.run()
    h.submit("a returning conversation" + h.text(first)[:2] + " again")
    h.run()
    counters = h.scheduler.counters
    assert (counters.n_prompt_cache_misses, counters.n_prompt_cache_hits) == (2, 1)


def test_failed_load_is_forgotten_and_the_prefix_is_prefilled_cold() -> None:
    h = Harness(n_slots=1, cache_bytes=CACHE_BYTES)
    h.submit("a prompt to come back to", replace(GREEDY, max_tokens=2))
    h.run()
    h.submit("something else", replace(GREEDY, max_tokens=2))
    h.run()
    h.backend.failing_ops = {"load"}  # e.g. the entry is corrupt: loading it fails every time
    failed = h.submit("a prompt to come back to, again")
    plan = h.step()
    assert "load" in [op.kind for op in plan.ops]
    assert h.finish(failed) is FinishReason.ERROR
    retry = h.submit("a prompt to come back to, again")
    plan = h.step()
    assert "load" not in [op.kind for op in plan.ops], "the failed entry is not tried again"
    assert plan.entries[0].start_pos == 0
    h.run()
    assert h.finish(retry) is FinishReason.LENGTH
    assert h.text(retry) == alone("a prompt to come back to, again")
    assert h.backend.stashed_entry_ids() == h.scheduler.prompt_cache_entry_ids()


def test_a_failed_step_frees_its_stashes_and_evictions_in_the_backend() -> None:
    h = Harness(n_slots=2, cache_bytes=60 * TOKEN_BYTES)
    first = [h.submit(p, replace(GREEDY, max_tokens=2)) for p in ("conversation A, turn one", "conversation B!!")]
    h.run()
    for prompt in ("unrelated C", "unrelated D"):  # both slots are taken over: A and B go to the cache
        h.submit(prompt, replace(GREEDY, max_tokens=2))
    h.run()
    assert h.backend.n_stashed() == 2
    h.backend.failing_ops = {"load"}
    returning = h.submit("conversation A, turn one" + h.text(first[0])[:1] + " two")
    bystander = h.submit("a newcomer E")
    plan = h.step()
    # A's load fails: the drops and the stash planned after it (for E's slot) never reach the backend
    kinds = [op.kind for op in plan.ops]
    assert kinds.index("load") < len(kinds) - 1 and "drop" in kinds[kinds.index("load") :]
    assert h.finish(returning) is FinishReason.ERROR and h.finish(bystander) is FinishReason.ERROR
    h.backend.failing_ops = set()
    h.step()  # the next step drops what the failed one may have left behind
    assert h.backend.stashed_entry_ids() == h.scheduler.prompt_cache_entry_ids()


def test_fail_all_leaves_no_orphaned_cache_entries() -> None:
    h = Harness(n_slots=1, cache_bytes=CACHE_BYTES)
    h.submit("stashed in a step that never ran", replace(GREEDY, max_tokens=2))
    h.run()
    h.submit("next", replace(GREEDY, max_tokens=2))
    plan = h.scheduler.schedule()
    assert [op.kind for op in plan.ops] == ["stash", "clear"]
    h.scheduler.fail_all("internal error in the engine step")  # the step died before its ops were applied
    assert h.scheduler.prompt_cache_entry_ids() == set()
    retry = h.submit("stashed in a step that never ran, again")
    plan = h.step()
    assert "load" not in [op.kind for op in plan.ops] and plan.entries[0].start_pos == 0
    h.run()
    assert h.finish(retry) is FinishReason.LENGTH
    assert h.backend.stashed_entry_ids() == h.scheduler.prompt_cache_entry_ids()


def test_an_idle_engine_stashes_free_slots_so_a_busy_one_need_not() -> None:
    h = Harness(n_slots=1, cache_bytes=CACHE_BYTES)
    h.submit("kept while the engine idles", replace(GREEDY, max_tokens=2))
    h.run()
    plan = h.step()  # nothing to do: the slot's contents go to the cache now
    assert [op.kind for op in plan.ops] == ["stash"] and not plan.entries
    assert h.step().empty, "once saved, idling does nothing"
    h.submit("a new request takes the slot", replace(GREEDY, max_tokens=2))
    plan = h.step()
    assert [op.kind for op in plan.ops] == ["clear"], "already saved: no copy while streams may wait"
    h.run()
    returning = h.submit("kept while the engine idles, back")
    plan = h.step()
    assert [op.kind for op in plan.ops] == ["stash", "load", "truncate"]
    h.run()
    assert h.text(returning) == alone("kept while the engine idles, back")


def test_under_load_a_stash_slower_than_a_step_is_skipped_and_counted() -> None:
    # Qwen3-Next-like states: 75 MiB of recurrent state whatever the length, so any stash costs ~45 ms
    fixed = 75 << 20
    h = Harness(n_slots=2, cache_bytes=1 << 30, state_bytes_fixed=fixed)
    h.scheduler.stash_seconds_per_byte = 0.6e-3 / (1 << 20)  # 0.6 ms/MiB: 45 ms for 75 MiB
    h.scheduler.observe_step(0.040)  # decode steps of 40 ms
    h.submit("finishes first", replace(GREEDY, max_tokens=2))
    running = h.submit("keeps decoding", replace(GREEDY, max_tokens=30))
    h.step()
    while h.scheduler.slots[0].sequence is not None:
        h.step()
    assert h.scheduler.slots[1].sequence is not None
    newcomer = h.submit("takes the first slot", replace(GREEDY, max_tokens=2))
    plan = h.step()
    assert [op.kind for op in plan.ops] == ["clear"], "copying 75 MiB would stall the running stream > 1 step"
    assert h.scheduler.counters.n_prompt_cache_stashes_skipped == 1
    h.run()
    assert h.finish(running) is FinishReason.LENGTH and h.finish(newcomer) is FinishReason.LENGTH
    h.scheduler.observe_step(0.060)  # slower steps (EWMA: 46 ms): the same copy now fits in one
    h.submit("while nothing else runs", replace(GREEDY, max_tokens=2))
    plan = h.step()
    assert [op.kind for op in plan.ops] == ["stash", "clear"]
    assert plan.ops[0].n_bytes == fixed + len("takes the first slot") * TOKEN_BYTES + TOKEN_BYTES


def test_stash_and_step_costs_follow_the_measurements() -> None:
    h = Harness(n_slots=1, cache_bytes=CACHE_BYTES)
    initial = h.scheduler.stash_seconds_per_byte
    h.scheduler.observe_stash(1 << 20, 1.0)  # small stashes reuse warm memory: they do not set the rate
    assert h.scheduler.stash_seconds_per_byte == initial
    h.scheduler.observe_stash(100 << 20, 0.1)  # 1 ms/MiB
    assert initial < h.scheduler.stash_seconds_per_byte < 1e-3 / (1 << 20)
    h.scheduler.observe_step(0.1)
    h.scheduler.observe_step(0.2)
    assert h.scheduler.step_seconds == pytest.approx(0.13)


def test_a_prompt_cache_needs_state_sizes() -> None:
    config = SchedulerConfig(n_slots=1, n_ctx_per_slot=64, max_batch_tokens=16, prompt_cache_bytes=1 << 20)
    with pytest.raises(ValueError, match="state_size"):
        Scheduler(config, FakeBackend())


# --- prompt logprobs (/v1/completions echo + logprobs) ------------------------------------------------------


def reference_prompt_logprobs(backend: FakeBackend, prompt: str) -> list[float]:
    """Each prompt token's logprob (after the first) under the fake model, computed directly."""
    tokens = list(prompt.encode())
    result = []
    for i in range(1, len(tokens)):
        logits = backend._model(tokens[:i]).astype(np.float64)
        shifted = logits - logits.max()
        result.append(float(shifted[tokens[i]] - np.log(np.exp(shifted).sum())))
    return result


def prompt_events(h: Harness, request: Request) -> list[StepEvent]:
    return [e for e in h.events if e.sequence.request.request_id == request.request_id and e.prompt_logprobs]


def test_prompt_logprobs_span_every_chunk_of_a_long_prompt() -> None:
    h = Harness(budget=8, n_ctx=64)
    prompt = "the quick brown fox jumps over"  # 30 tokens: four chunks of at most 8
    request = h.submit(prompt, replace(GREEDY, max_tokens=2), prompt_logprobs=3)
    h.run()
    chunks = [e for plan in h.plans for e in plan.entries if len(e.tokens) > 1 or e.logprob_targets]
    assert sum(len(e.tokens) for e in chunks) == len(prompt)
    # each chunk wants the logprob of the token after each of its positions; the last chunk omits its last
    assert [e.logprob_targets for e in chunks] == [
        tuple(prompt.encode()[e.start_pos + 1 : e.start_pos + len(e.tokens) + 1]) for e in chunks
    ]
    assert len(chunks[-1].logprob_targets) == len(chunks[-1].tokens) - 1
    assert all(e.top_logprobs == 3 for e in chunks)
    (first,) = prompt_events(h, request)
    assert first.token_ids, "the prompt logprobs ride on the first generated token's event"
    assert [lp.logprob for lp in first.prompt_logprobs] == pytest.approx(reference_prompt_logprobs(h.backend, prompt))
    assert [lp.token for lp in first.prompt_logprobs] == list(prompt.encode()[1:])
    for entry in first.prompt_logprobs:
        assert len(entry.top) == 3
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
    assert h.text(request) == alone(prompt, replace(GREEDY, max_tokens=2), budget=8)


def test_max_tokens_zero_finishes_after_the_prefill_without_sampling() -> None:
    h = Harness()
    request = h.submit("hello world", replace(GREEDY, max_tokens=0), n=2, prompt_logprobs=0)
    h.run()
    assert all(not plan.samples for plan in h.plans), "nothing is sampled"
    finishing = [e for e in h.events if e.finish_reason is not None]
    assert [e.sequence.choice_index for e in finishing] == [0, 1]
    assert all(e.finish_reason is FinishReason.LENGTH and e.text == "" and not e.token_ids for e in finishing)
    expected = reference_prompt_logprobs(h.backend, "hello world")
    for event in finishing:
        assert [lp.logprob for lp in event.prompt_logprobs] == pytest.approx(expected)
        assert all(not lp.top for lp in event.prompt_logprobs)
    assert h.scheduler.n_free_slots == 4 and not h.scheduler.has_work
    assert not any(op.kind == "copy" for plan in h.plans for op in plan.ops), "no choice needs a copy of the prompt"
    assert h.scheduler.counters.n_requests_finished == 1
    # the slot keeps the prompt: a later request reuses it as usual
    later = h.submit("hello world again")
    h.step()
    assert h.plans[-1].entries[0].start_pos == len("hello world")
    h.run()
    assert h.text(later) == alone("hello world again")
    assert request.prompt_logprobs == 0


def test_prompt_logprobs_never_reuse_a_cached_prefix() -> None:
    h = Harness(n_slots=2, cache_bytes=CACHE_BYTES)
    h.submit("shared prefix, then more", replace(GREEDY, max_tokens=2))
    h.submit("a different prompt", replace(GREEDY, max_tokens=2))
    h.run()
    assert [len(slot.cached_tokens) for slot in h.scheduler.slots] == [25, 19]
    request = h.submit("shared prefix, then more", replace(GREEDY, max_tokens=1), prompt_logprobs=1)
    plan = h.step()
    # the slot holding the least is emptied (its contents stashed first), and the prompt is computed whole
    assert [(op.kind, op.slot) for op in plan.ops] == [("stash", 1), ("clear", 1)]
    assert plan.entries[0].slot == 1 and plan.entries[0].start_pos == 0
    h.run()
    (event,) = prompt_events(h, request)
    expected = reference_prompt_logprobs(h.backend, "shared prefix, then more")
    assert [lp.logprob for lp in event.prompt_logprobs] == pytest.approx(expected)
    assert event.sequence.n_cached_tokens == 0
    assert h.scheduler.counters.n_prompt_cache_hits == 0


def test_prompt_logprobs_on_a_recurrent_model() -> None:
    h = Harness(partial=False, cache_bytes=CACHE_BYTES, state_bytes_fixed=4096)
    h.submit("recurrent state prompt", replace(GREEDY, max_tokens=2))
    h.run()
    request = h.submit("recurrent state prompt", replace(GREEDY, max_tokens=0), prompt_logprobs=2)
    h.run()
    (event,) = prompt_events(h, request)
    expected = reference_prompt_logprobs(h.backend, "recurrent state prompt")
    assert [lp.logprob for lp in event.prompt_logprobs] == pytest.approx(expected)
    assert not any(op.kind == "truncate" for plan in h.plans for op in plan.ops)


def test_prompt_logprobs_of_n_choices_are_the_shared_prefill_s() -> None:
    h = Harness()
    request = h.submit("abcdef", SamplingParams(temperature=1.0, seed=3, max_tokens=3), n=3, prompt_logprobs=1)
    h.run()
    events = prompt_events(h, request)
    assert sorted(e.sequence.choice_index for e in events) == [0, 1, 2], "each choice's first event has them"
    assert len({tuple(lp.logprob for lp in e.prompt_logprobs) for e in events}) == 1
    assert sum(len(e.tokens) for plan in h.plans for e in plan.entries if e.logprob_targets) == 6, "one prefill"


def test_a_one_token_prompt_has_no_prompt_logprobs() -> None:
    h = Harness()
    request = h.submit("x", replace(GREEDY, max_tokens=0), prompt_logprobs=5)
    h.run()
    (event,) = [e for e in h.events if e.finish_reason is not None]
    assert event.finish_reason is FinishReason.LENGTH and event.prompt_logprobs == ()
    assert all(not e.logprob_targets for plan in h.plans for e in plan.entries)
    assert request.prompt_logprobs == 5


# --- speculative decoding --------------------------------------------------------------------------------


class OracleDrafter:
    """Drafts what the fake model's greedy sampler will pick next, wrong on purpose at `wrong_at` (a draft
    position) every `wrong_every`-th call: the scheduler must then emit exactly what it emits without drafts."""

    name = "oracle"

    def __init__(self, backend: FakeBackend, *, wrong_every: int = 0, wrong_at: int = 0) -> None:
        self.backend = backend
        self.wrong_every = wrong_every
        self.wrong_at = wrong_at
        self.n_calls = 0
        self.forgotten: list[int] = []
        self.requests: list[DraftRequest] = []

    def draft(self, requests: Sequence_[DraftRequest]) -> list[tuple[int, ...]]:
        drafts = []
        for request in requests:
            self.n_calls += 1
            self.requests.append(request)
            draft = self.backend.greedy_continuation([*request.prompt, *request.output], request.n_max)
            if self.wrong_every and self.n_calls % self.wrong_every == 0:
                position = min(self.wrong_at, len(draft) - 1)
                draft[position] = ord("#") if draft[position] != ord("#") else ord("%")
            drafts.append(tuple(draft))
        return drafts

    def forget(self, key: int) -> None:
        self.forgotten.append(key)

    def observe(self, entries: Sequence_[BatchEntry]) -> None:
        pass

    def close(self) -> None:
        pass


SPEC = SpeculationConfig(draft_max=4, draft_min=1, max_step_tokens=16)
LONG = replace(GREEDY, max_tokens=24)


def spec_harness(wrong_every: int = 0, wrong_at: int = 0, spec: SpeculationConfig = SPEC, **kwargs: Any) -> Harness:
    h = Harness(**kwargs)
    h.scheduler._drafter = OracleDrafter(h.backend, wrong_every=wrong_every, wrong_at=wrong_at)
    h.scheduler.config = replace(h.scheduler.config, speculation=spec)
    return h


def drafted_entries(h: Harness) -> list[Any]:
    return [e for plan in h.plans for e in plan.entries if e.n_logits > 1]


@pytest.mark.parametrize("partial", [True, False])
@pytest.mark.parametrize(("wrong_every", "wrong_at"), [(0, 0), (1, 0), (2, 1), (3, 3)])
def test_speculation_gives_exactly_the_tokens_of_plain_decoding(partial: bool, wrong_every: int, wrong_at: int) -> None:
    h = spec_harness(wrong_every, wrong_at, partial=partial)
    request = h.submit("speculate on this", LONG)
    h.run()
    assert h.text(request) == alone("speculate on this", LONG, partial=partial)
    assert h.finish(request) is FinishReason.LENGTH
    counters = h.scheduler.counters
    assert drafted_entries(h) and counters.n_draft_tokens > 0
    if wrong_every != 1 or wrong_at > 0:
        assert counters.n_draft_accepted > 0
    if wrong_every == 0:
        assert counters.n_draft_accepted == counters.n_draft_tokens
        assert len(h.plans) < 24 // 2, "right drafts: several tokens per step"
    assert h.scheduler.slots[0].cached_tokens == h.backend.slot_tokens(0) or h.scheduler.has_work


@pytest.mark.parametrize("partial", [True, False])
def test_rejected_drafts_leave_the_slot_with_exactly_the_accepted_tokens(partial: bool) -> None:
    h = spec_harness(wrong_every=1, wrong_at=2, partial=partial)
    h.submit("abcdef", LONG)
    h.run()
    kinds = {op.kind for plan in h.plans for op in plan.ops}
    if partial:
        assert "truncate" in kinds and "checkpoint" not in kinds
    else:
        assert {"checkpoint", "rollback"} <= kinds and "truncate" not in kinds
        replays = [e for e in drafted_entries(h) if e.tokens[0] != e.tokens[-e.n_logits]]
        assert replays, "after a rollback the accepted tokens are decoded again before the new pending token"
    assert h.scheduler.slots[0].cached_tokens == h.backend.slot_tokens(0)


def test_a_stop_string_inside_an_accepted_run_ends_the_output_where_plain_decoding_does() -> None:
    reference = alone("stop inside", LONG)
    stop = reference[9:11]
    params = replace(LONG, stop=(stop,))
    h = spec_harness()
    request = h.submit("stop inside", params)
    h.run()
    assert h.text(request) == alone("stop inside", params) == reference[:9]
    assert h.finish(request) is FinishReason.STOP
    assert drafted_entries(h), "the stop string landed inside a drafted run"
    assert h.scheduler.counters.n_generated_tokens < 24


@pytest.mark.parametrize("max_tokens", [2, 5, 7, 10])
def test_max_tokens_inside_an_accepted_run_is_exact(max_tokens: int) -> None:
    params = replace(GREEDY, max_tokens=max_tokens)
    h = spec_harness()
    request = h.submit("bounded", params)
    h.run()
    assert h.text(request) == alone("bounded", params)
    assert sum(len(e.token_ids) for e in h.events) == max_tokens
    assert all(e.n_logits - 1 <= max_tokens - 2 for e in drafted_entries(h)), "never drafts past max_tokens"


class RunsPastTheEndDrafter(OracleDrafter):
    """Drafts two tokens, an end-of-generation token, then more: what an n-gram draft looks like when it reaches
    the end of a quoted passage and runs on into the prompt's turn markers."""

    def draft(self, requests: Sequence_[DraftRequest]) -> list[tuple[int, ...]]:
        self.requests.extend(requests)
        return [(ord("a"), ord("b"), EOS, ord("c"), ord("d"))[: request.n_max] for request in requests]


@pytest.mark.parametrize(("ignore_eos", "expected"), [(False, (ord("a"), ord("b"), EOS)), (True, (ord("a"), ord("b")))])
def test_a_draft_ends_at_its_first_end_of_generation_token(ignore_eos: bool, expected: tuple[int, ...]) -> None:
    h = spec_harness(spec=SpeculationConfig(draft_max=8, draft_min=1, max_step_tokens=16))
    h.scheduler._drafter = RunsPastTheEndDrafter(h.backend)
    request = h.submit("past the end", replace(LONG, ignore_eos=ignore_eos))
    h.run()
    drafts = {tuple(e.tokens[len(e.tokens) - e.n_logits + 1 :]) for e in drafted_entries(h)}
    assert expected in drafts, "the draft up to the end token was verified"
    assert all(expected[: len(draft)] == draft for draft in drafts), (
        "nothing after the end token (with ignore_eos, not the end token either): near max_tokens, less"
    )
    assert h.text(request) == alone("past the end", replace(LONG, ignore_eos=ignore_eos))


def test_a_busy_step_drafts_only_while_a_likely_draft_pays() -> None:
    """A drafted token's measured cost (0.06 of a plain step: SmolLM2 verifying at 16 streams on 2 threads) is
    paid by every slot decoding in the step: one busy slot drafts, sixteen do not (a draft would have to be
    accepted ~99% of the time to pay), and with the gate off (max_break_even 1) they draft again."""

    def drafted_with(n_streams: int, max_break_even: float) -> int:
        """Tokens drafted in the steps where all n_streams decode."""
        spec = SpeculationConfig(draft_max=4, draft_min=2, max_step_tokens=128, max_break_even=max_break_even)
        h = spec_harness(spec=spec, n_slots=16, budget=512, n_ctx=128)
        h.scheduler.draft_token_cost = 0.06
        for i in range(n_streams):
            h.submit(f"stream {i:02d} speculates", LONG)
        plans = [h.step() for _ in range(4)]
        busy = [plan for plan in plans if len(plan.entries) == n_streams and not plan.admitted]
        assert busy, "every stream decoded together"
        return sum(len(draft) for plan in busy for draft in plan.drafts.values())

    assert drafted_with(1, 0.9) > 0
    assert drafted_with(16, 0.9) == 0
    assert drafted_with(16, 1.0) > 0


def test_generation_at_the_context_end_is_exact_with_drafts() -> None:
    params = replace(GREEDY, max_tokens=None)
    h = spec_harness(n_ctx=24)
    request = h.submit("0123456789", params)
    h.run()
    assert h.text(request) == alone("0123456789", params, n_ctx=24)
    assert max(e.start_pos + len(e.tokens) for p in h.plans for e in p.entries) <= 24


@pytest.mark.parametrize("partial", [True, False])
def test_a_mixed_batch_of_speculating_prefilling_and_plain_slots(partial: bool) -> None:
    h = spec_harness(
        wrong_every=2, wrong_at=1, spec=replace(SPEC, max_step_tokens=32), budget=32, n_ctx=128, partial=partial
    )
    first = h.submit("first stream", LONG)
    plain = Request(tuple(b"plain stream"), replace(LONG, speculative=False))
    h.scheduler.add([Sequence(h.n_seq, plain, 0)])
    h.n_seq += 1
    h.step()
    h.step()
    late = h.submit("a late and long prompt that is prefilled in chunks beside the others", LONG)
    h.run()
    for request, prompt in ((first, "first stream"), (plain, "plain stream")):
        assert h.text(request) == alone(prompt, LONG, n_ctx=128, budget=32, partial=partial)
    late_prompt = "a late and long prompt that is prefilled in chunks beside the others"
    assert h.text(late) == alone(late_prompt, LONG, n_ctx=128, budget=32, partial=partial)
    mixed = [p for p in h.plans if p.drafts and any(len(e.tokens) > 5 and e.n_logits == 1 for e in p.entries)]
    assert mixed, "drafts and a prefill chunk shared a decode"
    drafter = h.scheduler._drafter
    assert isinstance(drafter, OracleDrafter)
    assert drafter.requests and all(r.key != 1 for r in drafter.requests), "the opted-out request never drafts"


def test_seeded_sampling_gives_the_same_tokens_with_drafts() -> None:
    params = SamplingParams(temperature=0.7, seed=11, max_tokens=20)
    h = spec_harness(wrong_every=2, wrong_at=0)
    request = h.submit("sampled", params)
    h.run()
    assert h.text(request) == alone("sampled", params)
    assert h.scheduler.counters.n_draft_tokens > 0


def test_no_drafts_when_the_step_is_already_big() -> None:
    h = spec_harness(spec=replace(SPEC, max_step_tokens=4), n_slots=4)
    prompts = {"one": 6, "two": 8, "three": 10, "four": 30}  # prompt → max_tokens: the streams end one by one
    requests = [h.submit(prompt, replace(GREEDY, max_tokens=n)) for prompt, n in prompts.items()]
    h.run()
    assert h.scheduler.counters.n_draft_tokens > 0, "drafts once only some slots decode"
    full_steps = [p for p in h.plans[1:] if len(p.entries) == 4]  # after the prefill: four decoding slots
    assert full_steps and all(p.n_tokens == 4 and not p.drafts for p in full_steps), "four slots leave no spare"
    for request, (prompt, n) in zip(requests, prompts.items(), strict=True):
        assert h.text(request) == alone(prompt, replace(GREEDY, max_tokens=n))


def test_a_slot_whose_drafts_miss_backs_off_and_probes_again() -> None:
    h = spec_harness(wrong_every=1, wrong_at=0)  # every draft is wrong from its first token
    h.submit("misses", replace(GREEDY, max_tokens=50))
    h.run()
    drafting_steps = len(drafted_entries(h))
    assert 2 <= drafting_steps <= 12, f"{drafting_steps} drafting steps of {len(h.plans)}: backs off, probes again"
    assert h.scheduler.counters.n_draft_accepted == 0


def test_finished_sequences_are_forgotten_by_the_drafter() -> None:
    h = spec_harness()
    h.submit("forget me", replace(GREEDY, max_tokens=6))
    h.run()
    drafter = h.scheduler._drafter
    assert isinstance(drafter, OracleDrafter) and drafter.forgotten == [0]
