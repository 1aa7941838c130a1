"""Qwen3-Next's MTP head through the bound llama.cpp (bindings/mtp.py) on the tiny qwen3next written with an
MTP layer by convert/synth.py: it loads with the head, and greedy decoding that drafts with the head and
verifies the drafts (exact match, one sequence, rolling the hybrid state back after a rejection the way
llama-server does) gives exactly the tokens of plain greedy decoding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bindings.mtp import (
    MtpDrafter,
    MtpError,
    SimpleTarget,
    _SlotHidden,
    free_model,
    load_model,
    n_mtp_layers,
)
from bindings.protocol import BatchEntry, CacheOp, DraftRequest

PROMPTS = (tuple(range(10, 30)), (5, 77, 140, 141, 142, 300, 12, 9, 9, 9), (200,))
N_TOKENS = 40


@pytest.fixture(scope="module")
def mtp_model(tiny_qwen3next_mtp_gguf: Path) -> Iterator[Any]:
    model = load_model(tiny_qwen3next_mtp_gguf, load_mtp=True)
    yield model
    free_model(model)


def ask(slot: int, decoded: Sequence[int], last: int, n_max: int) -> DraftRequest:
    """The engine's request for `slot`: `decoded` is what the target has, `last` the token sampled after it."""
    return DraftRequest(key=slot, slot=slot, prompt=tuple(decoded), output=[last], n_max=n_max)


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    target_decodes: int = 0


def plain_greedy(model: Any, prompt: Sequence[int], n_tokens: int) -> list[int]:
    target = SimpleTarget(model)
    try:
        logits = target.decode(prompt, 0)
        out = [int(np.argmax(logits[-1]))]
        while len(out) < n_tokens:
            logits = target.decode([out[-1]], len(prompt) + len(out) - 1)
            out.append(int(np.argmax(logits[-1])))
        return out
    finally:
        target.close()


def speculative_greedy(model: Any, prompt: Sequence[int], n_tokens: int, n_draft: int) -> tuple[list[int], SpecStats]:
    """Greedy decoding with MTP drafts: each step verifies [last, *draft] in one target decode."""
    target = SimpleTarget(model)
    drafter = MtpDrafter(model, target.ctx, mtp_loaded=True)
    stats = SpecStats()
    try:
        logits = target.decode(prompt, 0)
        drafter.observe([BatchEntry(slot=0, tokens=tuple(prompt), start_pos=0, logits_last=True)])
        out = [int(np.argmax(logits[-1]))]  # the target has decoded the prompt and out[:-1]
        while len(out) < n_tokens:
            out.extend(_speculative_step(target, drafter, [*prompt, *out[:-1]], out[-1], n_draft, stats))
        return out[:n_tokens], stats
    finally:
        drafter.close()
        target.close()


def _speculative_step(
    target: SimpleTarget, drafter: MtpDrafter, decoded: Sequence[int], last: int, n_draft: int, stats: SpecStats
) -> list[int]:
    n_past = len(decoded)
    (draft,) = drafter.draft([ask(0, decoded, last, n_draft)])
    target.save(n_past)
    verified = (last, *draft)
    rows = target.decode(verified, n_past)
    drafter.observe([BatchEntry(slot=0, tokens=verified, start_pos=n_past, logits_last=True)])
    stats.drafted += len(draft)
    stats.target_decodes += 1
    n_accepted = 0
    while n_accepted < len(draft) and int(np.argmax(rows[n_accepted])) == draft[n_accepted]:
        n_accepted += 1
    stats.accepted += n_accepted
    if n_accepted < len(draft):
        # qwen3next's recurrent state cannot drop the rejected tail: back to the checkpoint, decode the
        # accepted part again (its hidden states feed the head again too).
        target.rollback()
        replay = verified[: n_accepted + 1]
        target.decode(replay, n_past)
        drafter.observe([BatchEntry(slot=0, tokens=replay, start_pos=n_past, logits_last=True)])
        stats.target_decodes += 1
    return [*draft[:n_accepted], int(np.argmax(rows[n_accepted]))]


def test_the_synthetic_model_has_an_mtp_head_that_loads(mtp_model: Any) -> None:
    assert n_mtp_layers(mtp_model) == 1
    target = SimpleTarget(mtp_model)
    drafter = MtpDrafter(mtp_model, target.ctx, mtp_loaded=True)
    try:
        assert drafter.n_seq == 1
    finally:
        drafter.close()
        target.close()


@pytest.mark.parametrize("n_draft", [1, 3, 6])
def test_greedy_tokens_with_mtp_drafts_equal_plain_greedy(mtp_model: Any, n_draft: int) -> None:
    total = SpecStats()
    for prompt in PROMPTS:
        expected = plain_greedy(mtp_model, prompt, N_TOKENS)
        actual, stats = speculative_greedy(mtp_model, prompt, N_TOKENS, n_draft)
        assert actual == expected, f"prompt {prompt}"
        total.drafted += stats.drafted
        total.accepted += stats.accepted
        total.target_decodes += stats.target_decodes
    # Both paths ran: drafts were accepted (the head is useful) and rejected (the rollback was exercised).
    assert 0 < total.accepted < total.drafted


def _observed(
    model: Any, chunks: Sequence[Sequence[int]], *, lose_state: bool = False
) -> tuple[bytes, tuple[int, ...]]:
    """The head's KV and its 5-token draft after the target decoded `chunks` one decode each.

    lose_state: the drafter forgets the target's last state between decodes (a bug to be caught)."""
    target = SimpleTarget(model)
    drafter = MtpDrafter(model, target.ctx, mtp_loaded=True)
    try:
        position, decoded = 0, []
        for chunk in chunks:
            target.decode(chunk, position)
            if lose_state:
                drafter._hidden[0] = _SlotHidden()
            drafter.observe([BatchEntry(slot=0, tokens=tuple(chunk), start_pos=position, logits_last=True)])
            position += len(chunk)
            decoded.extend(chunk)
        (draft,) = drafter.draft([ask(0, decoded, 33, 5)])
        return drafter.kv_state(0), draft
    finally:
        drafter.close()
        target.close()


def test_the_head_sees_the_same_hidden_states_however_the_prompt_is_chunked(mtp_model: Any) -> None:
    """Each token goes into the head with the target's state of the position before it, also across the
    boundary of two decodes (kept from the earlier one): the head's KV ends up the same either way."""
    prompt = PROMPTS[0]
    chunks = [prompt[:3], prompt[3:11], prompt[11:]]
    whole = _observed(mtp_model, [prompt])
    assert _observed(mtp_model, chunks) == whole
    assert _observed(mtp_model, [prompt[:10], prompt[10:12], prompt[12:]]) == whole
    # The check can fail: pairing the first token of a decode with zeros instead changes the head's KV.
    assert _observed(mtp_model, chunks, lose_state=True)[0] != whole[0]


def test_after_a_rejection_the_head_is_as_if_only_accepted_tokens_were_seen(mtp_model: Any) -> None:
    prompt = PROMPTS[1]
    committed = [*prompt, 60, 61]
    fresh = _observed(mtp_model, [committed])
    target = SimpleTarget(mtp_model)
    drafter = MtpDrafter(mtp_model, target.ctx, mtp_loaded=True)
    try:
        target.decode(prompt, 0)
        drafter.observe([BatchEntry(0, prompt, 0, True)])
        target.save(len(prompt))
        verified = (60, 61, 62, 63)  # 61 accepted, 62 and 63 rejected
        target.decode(verified, len(prompt))
        drafter.observe([BatchEntry(0, verified, len(prompt), True)])
        target.rollback()
        drafter.truncate(0, len(committed))
        target.decode((60, 61), len(prompt))  # the accepted part again, as the hybrid target needs
        (draft,) = drafter.draft([ask(0, committed, 33, 5)])
        assert (drafter.kv_state(0), draft) == fresh
    finally:
        drafter.close()
        target.close()


def test_a_snapshot_brings_the_head_back_to_where_it_was(mtp_model: Any) -> None:
    """Saved with the target's state and restored with it (prompt reuse), the head drafts as before."""
    target = SimpleTarget(mtp_model)
    drafter = MtpDrafter(mtp_model, target.ctx, mtp_loaded=True)
    try:
        prompt = PROMPTS[1]
        target.decode(prompt, 0)
        drafter.observe([BatchEntry(0, prompt, 0, True)])
        request = ask(0, prompt, 33, 5)
        before = drafter.draft([request])
        snapshot, kv = drafter.snapshot(0), drafter.kv_state(0)
        target.decode((33, 34, 35), len(prompt))
        drafter.observe([BatchEntry(0, (33, 34, 35), len(prompt), True)])
        assert drafter.kv_state(0) != kv
        drafter.clear(0)
        assert drafter.draft([request]) == [()]  # nothing known: no draft
        drafter.restore(0, snapshot)
        assert drafter.kv_state(0) == kv
        assert drafter.draft([request]) == before
        assert snapshot.n_bytes > len(snapshot.kv) > 0
    finally:
        drafter.close()
        target.close()


def test_the_head_follows_the_engines_cache_ops(mtp_model: Any) -> None:
    """follow() mirrors the target's memory ops: a prompt-cache stash/load and a save/restore bring the head's
    KV and drafts back with the target's state, a clear or an unknown entry leaves no draft, copy clones."""
    target = SimpleTarget(mtp_model, n_seq=2)
    drafter = MtpDrafter(mtp_model, target.ctx, mtp_loaded=True)
    try:
        prompt = PROMPTS[1]
        target.decode(prompt, 0)
        drafter.observe([BatchEntry(0, prompt, 0, True)])
        request = ask(0, prompt, 33, 5)
        before, kv = drafter.draft([request]), drafter.kv_state(0)
        assert before[0], "the head drafts after the prompt"
        drafter.follow([CacheOp("stash", 0, entry=7), CacheOp("save", 0), CacheOp("clear", 0)])
        assert drafter.kv_state(0) != kv and drafter.draft([request]) == [()]
        drafter.follow([CacheOp("load", 0, entry=7)])
        assert drafter.kv_state(0) == kv and drafter.draft([request]) == before
        drafter.follow([CacheOp("clear", 0), CacheOp("restore", 0)])
        assert drafter.kv_state(0) == kv and drafter.draft([request]) == before
        drafter.follow([CacheOp("copy", 1, src=0)])
        assert drafter.draft([ask(1, prompt, 33, 5)]) == before
        drafter.follow([CacheOp("drop", -1, entry=7), CacheOp("load", 0, entry=7)])  # gone: cleared
        assert drafter.draft([request]) == [()]
        drafter.follow([CacheOp("truncate", 1, n_keep=3), CacheOp("checkpoint", 1), CacheOp("rollback", 1)])
        assert drafter.kv_state(1) != kv
    finally:
        drafter.close()
        target.close()


def test_drafts_for_several_slots_in_one_batch_equal_drafts_alone(mtp_model: Any) -> None:
    """draft() drafts all slots in one MTP decode per step: each slot gets what it gets when alone."""
    target = SimpleTarget(mtp_model, n_seq=2)
    drafter = MtpDrafter(mtp_model, target.ctx, mtp_loaded=True)
    try:
        assert drafter.n_seq == 2
        for slot in (0, 1):
            target.decode(PROMPTS[slot], 0, seq=slot)
            drafter.observe([BatchEntry(slot, PROMPTS[slot], 0, True)])
        requests = [ask(0, PROMPTS[0], 7, 4), ask(1, PROMPTS[1], 99, 4)]
        together = drafter.draft(requests)
        alone = [drafter.draft([request])[0] for request in requests]
        assert together == alone
        assert [len(d) for d in together] == [4, 4]
        assert together[0] != together[1]
        drafter.copy(0, 1)  # slot 1 becomes slot 0 (the engine's "copy" op)
        assert drafter.draft([ask(1, PROMPTS[0], 7, 4)]) == [together[0]]
        # A request with nothing sampled yet has no token to draft after.
        assert drafter.draft([DraftRequest(key=0, slot=0, prompt=PROMPTS[0], output=[], n_max=4)]) == [()]
    finally:
        drafter.close()
        target.close()


def test_a_drafter_is_refused_for_a_model_without_its_mtp_block(
    tiny_qwen3next_gguf: Path, tiny_qwen3next_mtp_gguf: Path
) -> None:
    plain = load_model(tiny_qwen3next_gguf, load_mtp=True)
    try:
        assert n_mtp_layers(plain) == 0
        target = SimpleTarget(plain)
        with pytest.raises(MtpError, match="no MTP head"):
            MtpDrafter(plain, target.ctx, mtp_loaded=True)
        target.close()
    finally:
        free_model(plain)
    skipped = load_model(tiny_qwen3next_mtp_gguf, load_mtp=False)
    try:
        target = SimpleTarget(skipped)
        with pytest.raises(MtpError, match="load_mtp=True"):
            MtpDrafter(skipped, target.ctx, mtp_loaded=False)
        target.close()
    finally:
        free_model(skipped)


def test_a_failed_observe_costs_drafts_not_the_process(mtp_model: Any) -> None:
    target = SimpleTarget(mtp_model)
    drafter = MtpDrafter(mtp_model, target.ctx, mtp_loaded=True)
    try:
        prompt = PROMPTS[0]
        target.decode(prompt, 0)
        drafter.observe([BatchEntry(0, prompt, 0, True)])
        assert len(drafter.draft([ask(0, prompt, 33, 3)])[0]) == 3
        drafter.observe([BatchEntry(0, prompt[:2], 0, True), BatchEntry(7, (1,), 0, True)])  # no slot 7: logged
        assert drafter.draft([ask(0, prompt, 33, 3)]) == [()]  # slot 0 lost track of its target state
        with pytest.raises(MtpError, match="slot 7"):
            drafter.draft([ask(7, prompt, 33, 3)])
        target.decode((33,), len(prompt))
        drafter.observe([BatchEntry(0, (33,), len(prompt), True)])
        assert len(drafter.draft([ask(0, (*prompt, 33), 34, 3)])[0]) == 3  # back on track
    finally:
        drafter.close()
        target.close()


def test_loading_the_head_leaves_the_trunk_unchanged(tiny_qwen3next_mtp_gguf: Path, mtp_model: Any) -> None:
    without = load_model(tiny_qwen3next_mtp_gguf, load_mtp=False)
    try:
        assert plain_greedy(without, PROMPTS[0], 12) == plain_greedy(mtp_model, PROMPTS[0], 12)
    finally:
        free_model(without)
