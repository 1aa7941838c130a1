"""The n-gram drafter, the adaptive back-off and the acceptance rule, without a real model."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from bindings.protocol import BatchEntry, DraftRequest, SampledToken, SamplingParams
from server.engine.fake_backend import FakeBackend, FakeBackendConfig
from server.engine.speculation import (
    NgramDrafter,
    SpecStats,
    SpeculationConfig,
    break_even_acceptance,
    verify_draft,
)
from tests.speculation.stats import chi2_quantile, homogeneity


def ask(drafter: NgramDrafter, prompt: list[int], output: list[int], n_max: int = 8, key: int = 0) -> tuple[int, ...]:
    (draft,) = drafter.draft([DraftRequest(key, 0, tuple(prompt), output, n_max)])
    return draft


def test_ngram_proposes_what_followed_the_latest_occurrence_of_the_longest_suffix() -> None:
    prompt = [1, 2, 3, 4, 5, 6, 9, 2, 3, 7, 8]
    assert ask(NgramDrafter(3, 2), prompt, [0, 2, 3]) == (7, 8, 0, 2, 3), "2-3 was last followed by 7 8"
    assert ask(NgramDrafter(3, 2), prompt, [1, 2, 3], n_max=2) == (4, 5), "the 3-gram 1-2-3 wins over 2-3"


def test_ngram_prefers_the_occurrence_whose_context_agrees_longest() -> None:
    # 2-3 occurs after 1 (followed by 9 9) and, later, after 7 (followed by 5 5); the sequence ends in 1 2 3:
    # the text being copied is the first occurrence, the later one a chance repeat.
    prompt = [1, 2, 3, 9, 9, 7, 2, 3, 5, 5, 0]
    assert ask(NgramDrafter(2, 2), prompt, [1, 2, 3], n_max=3) == (9, 9, 7)
    assert ask(NgramDrafter(2, 2), prompt, [8, 2, 3], n_max=3) == (5, 5, 0), "no context agrees: the latest"
    code = [4, 10, 11, 12, 20, 21, 4, 10, 11, 12, 30, 31]  # two lines that start alike
    output = [4, 10, 11, 12, 20, 21, 4, 10, 11, 12]  # copying them: the second line's own start
    assert ask(NgramDrafter(3, 2), code, output, n_max=2) == (30, 31), "aligned with the copy, not its first line"


def test_ngram_needs_at_least_n_min_matching_tokens() -> None:
    drafter = NgramDrafter(n_max=4, n_min=2)
    assert ask(drafter, [5, 6, 7, 8], [6]) == (), "a one-token match is no evidence"
    assert ask(drafter, [5, 6, 7, 8, 1], [5, 6], key=1) == (7, 8, 1, 5, 6)


def test_ngram_index_grows_incrementally_and_is_per_sequence() -> None:
    drafter = NgramDrafter()
    prompt = list(range(10, 30))
    output: list[int] = []
    for token in [10, 11, 12]:
        output.append(token)
        draft = ask(drafter, prompt, output)
    assert draft == tuple(range(13, 21))
    assert ask(drafter, [1, 2, 1], [2], key=7) == (1, 2), "another key, another history"
    drafter.forget(0)
    assert ask(drafter, [40, 41, 42], [43, 44]) == (), "forgotten: the new history has no repeat"


def test_backoff_after_misses_then_a_probe() -> None:
    config = SpeculationConfig(min_acceptance=0.3, backoff_max_steps=8)
    stats = SpecStats()
    stats.record(4, 0, config)
    waits = 0
    while not stats.wants_draft():
        waits += 1
    assert waits == 2
    stats.record(4, 0, config)
    stats.record(4, 0, config)
    stats.record(4, 0, config)
    waits = 0
    while not stats.wants_draft():
        waits += 1
    assert waits == 8, "capped"
    stats.record(4, 4, config)
    assert stats.wants_draft() and stats.n_misses == 0


def test_verify_draft_stops_at_the_first_mismatch_and_takes_a_bonus_token() -> None:
    picks = iter([5, 6, 9, 1])
    run = verify_draft((5, 6, 7), lambda i: SampledToken(next(picks)))
    assert [s.token for s in run] == [5, 6, 9]
    picks = iter([5, 6, 7, 1])
    assert [s.token for s in verify_draft((5, 6, 7), lambda i: SampledToken(next(picks)))] == [5, 6, 7, 1]
    positions: list[int] = []
    verify_draft((3,), lambda i: positions.append(i) or SampledToken(0))  # type: ignore[func-returns-value]
    assert positions == [0]


@pytest.mark.parametrize("draft_rank", [0, 1, 5])
def test_the_acceptance_rule_keeps_the_sampling_distribution(draft_rank: int) -> None:
    """Many seeded samples of the fake model at one position, each verified against the same draft token:
    the emitted token follows p exactly (chi-square), and the draft is accepted with probability p(draft)."""
    backend = FakeBackend(FakeBackendConfig(n_slots=1))
    params = SamplingParams(temperature=1.0, top_k=12)
    backend.decode([BatchEntry(0, (65, 66, 67, 68), 0, logits_last=True, n_logits=2)])  # pending + one draft
    backend.new_sampler(0, params)
    p = backend.probabilities(0, 2, params)  # row 2: the pending token's logits
    draft = int(np.argsort(-p)[draft_rank])
    n_trials = 4000
    emitted, accepted = [], 0
    for seed in range(n_trials):
        backend.new_sampler(seed, SamplingParams(temperature=1.0, top_k=12, seed=seed))
        run = verify_draft((draft,), lambda i, s=seed: backend.sample(s, 2 + i, params))
        backend.free_sampler(seed)
        emitted.append(run[0].token)
        accepted += len(run) == 2
    expected = np.rint(p * n_trials).astype(int)
    reference = [token for token, count in enumerate(expected) for _ in range(count)]
    statistic, dof = homogeneity(emitted, reference)
    assert statistic < chi2_quantile(dof), (statistic, dof)
    rate, sd = accepted / n_trials, math.sqrt(p[draft] * (1 - p[draft]) / n_trials)
    assert abs(rate - p[draft]) < 4 * sd + 1e-9, (rate, p[draft])
    assert Counter(emitted)[draft] == accepted


def test_the_fake_backend_has_logits_only_where_asked() -> None:
    backend = FakeBackend(FakeBackendConfig(n_slots=1))
    backend.decode([BatchEntry(0, (65, 66, 67), 0, logits_last=True, n_logits=2)])
    backend.new_sampler(0, SamplingParams(temperature=0.0))
    backend.sample(0, 1, SamplingParams(temperature=0.0))
    with pytest.raises(Exception, match="no logits"):
        backend.sample(0, 0, SamplingParams(temperature=0.0))


def test_draft_length_follows_the_acceptance() -> None:
    config = SpeculationConfig(draft_max=8, draft_min=2, min_reach=0.25)
    stats = SpecStats()
    assert stats.draft_length(config) == 8, "optimistic until measured"
    lengths = {}
    for acceptance in (0.9, 0.7, 0.5, 0.1):
        stats.acceptance = acceptance
        lengths[acceptance] = stats.draft_length(config)
    assert lengths == {0.9: 8, 0.7: 3, 0.5: 2, 0.1: 2}
    assert stats.draft_length(config, token_cost=0.5) == 2 and SpecStats(acceptance=0.9).draft_length(config, 0.5) == 6


def test_a_costly_verification_raises_the_bar_for_drafting() -> None:
    config = SpeculationConfig(min_acceptance=0.3)
    cheap, costly = SpecStats(), SpecStats()
    for stats, cost in ((cheap, 0.0), (costly, 0.6)):
        for _ in range(10):
            stats.record(8, 4, config, token_cost=cost)  # half the drafts accepted
    assert cheap.skip_steps == 0, "half accepted pays when verifying is cheap"
    assert costly.n_misses > 0, "and does not when a verified token costs 0.6 of a step"


def test_the_scheduler_learns_what_a_verified_token_costs() -> None:
    from server.engine.fake_backend import FakeBackend
    from server.engine.scheduler import Scheduler, SchedulerConfig

    scheduler = Scheduler(SchedulerConfig(n_slots=1, n_ctx_per_slot=64, max_batch_tokens=8), FakeBackend())
    scheduler.observe_draft_step(0.02, 4)
    assert scheduler.draft_token_cost == 0.0, "nothing to compare with before a plain step was timed"
    scheduler.observe_step(0.010)
    for _ in range(30):
        scheduler.observe_draft_step(0.030, 4)  # 4 drafts added 20 ms to a 10 ms step: 0.5 of a step each
    assert scheduler.draft_token_cost == pytest.approx(0.5, abs=0.01)


def test_the_loader_builds_the_drafter_the_settings_name() -> None:
    from bindings.protocol import BackendError
    from server.boot.loader import build_drafter, speculation_config
    from server.settings import Settings

    backend: Any = None  # neither none nor ngram touch the backend
    assert build_drafter(Settings(), backend) is None and speculation_config(Settings()) is None
    assert isinstance(build_drafter(Settings(spec_type="ngram"), backend), NgramDrafter)
    config = speculation_config(Settings(spec_type="ngram", draft_max=5, draft_min=3, spec_max_step_tokens=12))
    assert config == SpeculationConfig(draft_max=5, draft_min=3, max_step_tokens=12)
    not_loaded_for_mtp: Any = SimpleNamespace(config=SimpleNamespace(load_mtp=False))
    with pytest.raises(BackendError, match="MTP block"):  # an MTP context on such a model aborts the process
        build_drafter(Settings(spec_type="mtp"), not_loaded_for_mtp)


def test_the_break_even_acceptance_is_where_a_short_draft_pays_by_the_margin() -> None:
    # two draft tokens at half a step each: (1 + a + a^2) / 2 = 1.1 → a^2 + a - 1.2 = 0 → a = 0.6954
    assert break_even_acceptance(0.5, 2, 0.1) == pytest.approx((-1 + math.sqrt(1 + 4.8)) / 2, abs=1e-6)
    assert break_even_acceptance(0.0, 2, 0.0) == pytest.approx(0.0, abs=1e-6), "free verification always pays"
    assert break_even_acceptance(1.2, 2, 0.1) == math.inf, "3 tokens for 3.4 steps: never"


def test_a_chat_like_acceptance_backs_off_where_verifying_costs_half_a_step() -> None:
    """Acceptance 0.6 at half a step per verified token: 2 drafts emit 1.96 tokens for 2 steps' time: a loss."""
    config = SpeculationConfig()
    chat, repetitive = SpecStats(), SpecStats()
    for stats, accepted in ((chat, 6), (repetitive, 9)):
        for _ in range(10):
            stats.record(10, accepted, config, token_cost=0.5)
    assert chat.n_misses > 0 and chat.skip_steps > 0
    assert repetitive.n_misses == 0 and repetitive.wants_draft()


def test_a_verification_that_can_never_pay_backs_off_and_keeps_the_average_finite() -> None:
    """A verified token costing more than a step (a slow drafter): every verification backs off further, and the
    running acceptance stays a number that draft_length can use (an infinite bar once made it NaN)."""
    config = SpeculationConfig(backoff_max_steps=8)
    stats = SpecStats()
    for _ in range(5):
        stats.record(4, 4, config, token_cost=2.0)
        assert math.isfinite(stats.acceptance) and 0.0 <= stats.acceptance <= 1.0
        assert config.draft_min <= stats.draft_length(config, token_cost=2.0) <= config.draft_max
    assert stats.n_misses == 5 and stats.skip_steps == 8
