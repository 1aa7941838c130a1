"""Speculative decoding inside the continuous-batching step: when to draft, the n-gram drafter, and the
acceptance rule. Plain Python, no llama.cpp (the draft-model drafter is bindings/draft_model.py).

A speculating slot's batch entry is [last accepted token, d1..dk] with logits at every position, in the same
llama_decode as every other slot's tokens. Position i's logits predict the token after d_i (d_0 being the last
accepted token), so the slot's own sampler samples position 0; while the sampled token equals the draft token
at that position the next position is sampled too; the first mismatch is the correction and ends the run. Up to
k + 1 tokens come out of one decode; the rejected positions are then removed from the slot's memory.

Why "sample and compare" keeps the output distribution exactly (the rejection-sampling rule of Leviathan et
al. / Chen et al. with a deterministic drafter): the standard rule accepts a draft token d drawn from q with
probability min(1, p(d)/q(d)) and on rejection draws from norm(max(0, p - q)). Our drafters are deterministic:
q is a point mass on d, so min(1, p(d)/1) = p(d), and max(0, p - q) is p with d removed, renormalized. Sampling
t ~ p and accepting when t == d does exactly that: P(accept) = P(t == d) = p(d), and given t != d, t is
distributed as p restricted to tokens other than d, renormalized. So every emitted token is distributed as
the non-speculative sampler's, whatever was drafted; and since the sampler accepts exactly the emitted tokens,
in order (penalties, grammar and its RNG advance as without speculation), a seeded greedy or sampled run
gives the same tokens with or without drafts whenever the RNG draws are consumed the same way (greedy: always).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from bindings.protocol import BatchEntry, CacheOp, DraftRequest, SampledToken

SPEC_TYPES = ("none", "ngram", "draft", "mtp")


@runtime_checkable
class CacheFollower(Protocol):
    """A drafter that keeps per-slot state mirroring the target's memory (an MTP head's KV cache,
    bindings/mtp.py): the engine hands it each step's cache ops right after the target applied them."""

    def follow(self, ops: Sequence[CacheOp]) -> None:
        """Apply `ops` (in plan order) to the drafter's own state. Must not raise."""
        ...


@dataclass(frozen=True)
class SpeculationConfig:
    """When the scheduler drafts. Off (spec_type none, or no drafter) costs one attribute test per step."""

    draft_max: int = 32  # most drafted tokens per slot and step
    draft_min: int = 2  # a shorter draft is not worth its verification: dropped
    # The most tokens a step with drafts may hold: one slot's token and a full draft. Whether a busy step drafts
    # at all is max_break_even's call, from the measured cost of a verified token.
    max_step_tokens: int = 33
    # A slot whose acceptance (running average) falls below this, or below what a verified token costs
    # relative to a decode step as the engine measures it (SmolLM2 on 2 CPU threads: ~0.5), backs off.
    min_acceptance: float = 0.3
    # ... and below the acceptance at which a draft of draft_min tokens is expected to emit this much more per
    # step than its cost in step time (break_even_acceptance). 0.1 of margin, because drafting also costs what
    # the model of a verified token's cost leaves out: with the bare break-even (acceptance > cost) the chat
    # prompts of bench/speculation.py ran at acceptance 0.6 and 0.88-0.95x of speculation off, single stream.
    min_gain: float = 0.1
    # No drafting in a step where a draft of draft_min tokens pays only above this acceptance: with many busy
    # slots every one of them waits for a verification (16 streams of SmolLM2 on 2 CPU threads: ~0.99), and
    # the probes that would find a rare draft good enough cost more than it gains.
    max_break_even: float = 0.9
    backoff_max_steps: int = 32  # longest pause after repeated misses before the slot probes again
    ema_weight: float = 0.2  # weight of the newest verification in a slot's running acceptance
    # The k-th draft token is only worth verifying while it is likely to be reached: acceptance ** k above this,
    # or above the measured relative cost of a verified token when that is higher (acceptance 0.9: 13 tokens at
    # 0.25; 0.7: 3; 0.5: 2). A reached token saves a step; every verified one costs its share of a step.
    min_reach: float = 0.25

    def __post_init__(self) -> None:
        if self.draft_max < 1 or not 1 <= self.draft_min <= self.draft_max:
            raise ValueError(f"need 1 <= draft_min <= draft_max, got {self.draft_min}, {self.draft_max}")
        if self.max_step_tokens < 2:
            raise ValueError(f"max_step_tokens must be >= 2, got {self.max_step_tokens}")


@dataclass
class SpecStats:
    """One sequence's speculation record: totals, and the state of its back-off."""

    n_drafted: int = 0
    n_accepted: int = 0
    acceptance: float = 1.0  # running average of accepted / drafted, optimistic until measured
    n_misses: int = 0  # verifications in a row that did not pay
    skip_steps: int = 0  # steps to wait before drafting again

    def record(self, n_drafted: int, n_accepted: int, config: SpeculationConfig, token_cost: float = 0.0) -> None:
        """A verification: n_accepted of n_drafted tokens. `token_cost`: what a verified token costs, as a share
        of a decode step (measured by the engine; 0 when unknown)."""
        self.n_drafted += n_drafted
        self.n_accepted += n_accepted
        rate = n_accepted / n_drafted
        self.acceptance += config.ema_weight * (rate - self.acceptance)
        bar = max(config.min_acceptance, break_even_acceptance(token_cost, config.draft_min, config.min_gain))
        if n_accepted == 0 or self.acceptance < bar:
            # Exponential back-off, then a re-probe: the text may turn repetitive later (a quoted passage).
            self.n_misses += 1
            self.skip_steps = min(config.backoff_max_steps, 2**self.n_misses)
            # the re-probe starts from the bar (at most 1: an infinite bar, never paying, would poison the average)
            self.acceptance = max(self.acceptance, min(bar, 1.0))
        else:
            self.n_misses = 0

    def draft_length(self, config: SpeculationConfig, token_cost: float = 0.0) -> int:
        """How many tokens to draft now: those likely enough to be reached to pay for their verification."""
        if self.acceptance >= 1.0:
            return config.draft_max
        if self.acceptance <= 0.0:
            return config.draft_min
        bar = min(0.95, max(config.min_reach, token_cost))
        reach = math.floor(math.log(bar) / math.log(self.acceptance))
        return max(config.draft_min, min(config.draft_max, reach))

    def wants_draft(self) -> bool:
        """Whether to draft this step (counts a waiting step down)."""
        if self.skip_steps > 0:
            self.skip_steps -= 1
            return False
        return True


def draft_pays(acceptance: float, token_cost: float, n_draft: int, min_gain: float) -> bool:
    """Whether drafting n_draft tokens at this acceptance pays by min_gain (see break_even_acceptance)."""
    emitted = sum(acceptance**i for i in range(n_draft + 1))
    return emitted >= (1.0 + min_gain) * (1.0 + n_draft * token_cost)


def break_even_acceptance(token_cost: float, n_draft: int, min_gain: float) -> float:
    """The acceptance a above which drafting n_draft tokens pays by min_gain: the tokens it emits per step,
    1 + a + ... + a^n (each draft token is reached only if all before it were accepted, and the step always
    emits one), against the step time it takes, 1 + n * token_cost, must reach 1 + min_gain. inf: it never pays."""
    if not draft_pays(1.0, token_cost, n_draft, min_gain):
        return math.inf
    low, high = 0.0, 1.0
    for _ in range(30):  # what a draft emits rises with the acceptance: bisect to ~1e-9
        middle = (low + high) / 2
        low, high = (low, middle) if draft_pays(middle, token_cost, n_draft, min_gain) else (middle, high)
    return high


def verify_draft(draft: Sequence[int], sample_at: Callable[[int], SampledToken]) -> list[SampledToken]:
    """The acceptance rule (see the module docstring): sample position 0, go on while the sampled token equals
    the draft token at that position; return the sampled tokens (accepted drafts, then the correction or the
    bonus token after a fully accepted draft). `sample_at(i)` samples and accepts position i's token."""
    run = [sample_at(0)]
    for i, token in enumerate(draft):
        if run[-1].token != token:
            break
        run.append(sample_at(i + 1))
    return run


@dataclass
class _NgramIndex:
    """A sequence's n-grams: for every n, each n-gram → where the tokens after its latest occurrences are
    (oldest first, at most NgramDrafter.MAX_OCCURRENCES)."""

    n_seen: int = 0
    tokens: list[int] = field(default_factory=list)
    follower: list[dict[tuple[int, ...], list[int]]] = field(default_factory=list)


def _context_agreement(tokens: Sequence[int], here: int, there: int, longest: int) -> int:
    """How many tokens (at most `longest`) right before `here` equal those right before `there`: the evidence
    that an occurrence is the text being copied, not a chance repeat. Slice compares, doubling then bisecting
    (if k tokens agree, so do fewer)."""
    longest = min(longest, there, here)
    agreed, length = 0, 1
    while length <= longest and tokens[here - length : here] == tokens[there - length : there]:
        agreed, length = length, 2 * length
    low, high = agreed, min(length, longest + 1)  # agreed tokens match; `high` does not (or is past the limit)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if tokens[here - middle : here] == tokens[there - middle : there] else (low, middle)
    return low


class NgramDrafter:
    """N-gram self-speculation (prompt lookup): find the latest earlier occurrence of the sequence's last n
    tokens in its own prompt and output and propose what followed it, longest n first (n_max down to n_min).

    llama.cpp's ngram-simple looks up one 12-gram and drafts up to 48 tokens (common/ngram-map.cpp): it fires
    only on long verbatim repeats. vLLM's prompt-lookup proposer tries n from a maximum down to a minimum, as
    here; n_max 4, n_min 2 catch a quoted phrase after two tokens, and a unigram (n = 1) is too weak a hint
    (it proposes after every common token). The adaptive rule in the scheduler pays for misses by backing off.

    Of several occurrences of the n-gram, the one whose earlier context agrees longest with the sequence's wins
    (the latest on a tie): copying a passage or code from the prompt, the aligned copy agrees all the way back,
    while a latest occurrence is often a chance repeat (code's `result.append(` an output line earlier) whose
    continuation misses after a few tokens and wastes the rest of a long draft.
    The index is incremental (each new token adds n_max entries), so a step costs O(n_max + draft) per slot,
    plus a few slice compares per kept occurrence.
    """

    name = "ngram"
    MAX_OCCURRENCES = 8  # kept per n-gram: the most recent ones (a passage quoted more often is rare)
    CONTEXT_LIMIT = 64  # tokens of context compared; beyond it, occurrences tie (and the latest wins)

    def __init__(self, n_max: int = 4, n_min: int = 2) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.n_max = n_max
        self.n_min = n_min
        self._indexes: dict[int, _NgramIndex] = {}

    def draft(self, requests: Sequence[DraftRequest]) -> list[tuple[int, ...]]:
        return [self._draft_one(request) for request in requests]

    def forget(self, key: int) -> None:
        self._indexes.pop(key, None)

    def observe(self, entries: Sequence[BatchEntry]) -> None:
        """Nothing to take: the history comes with each DraftRequest."""

    def close(self) -> None:
        self._indexes.clear()

    def _draft_one(self, request: DraftRequest) -> tuple[int, ...]:
        index = self._indexes.get(request.key)
        if index is None:
            index = self._indexes[request.key] = _NgramIndex(follower=[{} for _ in range(self.n_max + 1)])
        self._extend(index, request)
        tokens = index.tokens
        n_tokens = len(tokens)
        for n in range(min(self.n_max, n_tokens - 1), self.n_min - 1, -1):
            starts = index.follower[n].get(tuple(tokens[n_tokens - n :]))
            if starts:
                start = self._best_start(tokens, starts, n)
                return tuple(tokens[start : start + request.n_max])
        return ()

    def _best_start(self, tokens: Sequence[int], starts: Sequence[int], n: int) -> int:
        """Of the n-gram's occurrences (their followers, oldest first), the one whose context before the n-gram
        agrees longest with the sequence's; the latest on a tie."""
        here = len(tokens) - n
        best, best_agreement = starts[-1], -1
        for start in reversed(starts):
            agreement = _context_agreement(tokens, here, start - n, self.CONTEXT_LIMIT)
            if agreement > best_agreement:
                best, best_agreement = start, agreement
        return best

    def _extend(self, index: _NgramIndex, request: DraftRequest) -> None:
        """Add the tokens that arrived since the last call; each makes the n-grams ending just before it known,
        with it as their follower (so a lookup finds only occurrences that something followed)."""
        n_prompt = len(request.prompt)
        n_total = n_prompt + len(request.output)
        tokens = index.tokens
        for position in range(index.n_seen, n_total):
            tokens.append(request.prompt[position] if position < n_prompt else request.output[position - n_prompt])
            for n in range(1, min(self.n_max, position) + 1):
                starts = index.follower[n].setdefault(tuple(tokens[position - n : position]), [])
                starts.append(position)
                if len(starts) > self.MAX_OCCURRENCES:
                    del starts[0]
        index.n_seen = n_total
