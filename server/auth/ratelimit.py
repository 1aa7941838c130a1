"""Per-principal requests and tokens per minute (the `limits` library, moving window, memory storage).

Tokens are charged when a request is admitted, as OpenAI does: the larger part of the estimate is
`max_tokens` (or `max_completion_tokens`, `max_output_tokens`), plus the prompt at ~4 characters a token
(a token id in a token-list prompt counts one). Charging up front means a burst cannot overrun the budget
while its answers are still being generated, and a 429 costs the engine nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from server.auth.principal import Principal
from server.errors import RateLimitExceededError

CHARS_PER_TOKEN = 4
_PROMPT_FIELDS = ("messages", "prompt", "input", "instructions", "text", "content", "tokens")
_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def estimated_tokens(body: Any) -> int:
    """What a request body will cost against tokens per minute (see the module's docstring)."""
    if not isinstance(body, dict):
        return 0
    prompt = sum(_prompt_tokens(body.get(field)) for field in _PROMPT_FIELDS)
    output = next((body[f] for f in _OUTPUT_FIELDS if isinstance(body.get(f), int) and body[f] > 0), 0)
    return prompt + int(output)


def _prompt_tokens(value: Any) -> int:
    if isinstance(value, str):
        return math.ceil(len(value) / CHARS_PER_TOKEN)
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_prompt_tokens(item) for item in value)
    if isinstance(value, dict):
        return sum(_prompt_tokens(value.get(field)) for field in (*_PROMPT_FIELDS, "arguments"))
    return 0


def reset_text(seconds: float) -> str:
    """OpenAI's duration format for x-ratelimit-reset-*: '1s', '6m0s', '250ms'."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


@dataclass(frozen=True)
class _Budget:
    kind: str  # "requests" or "tokens"
    item: RateLimitItem
    cost: int


class RateLimiter:
    """One per app: the counters outlive a SIGHUP reload (a principal's new limit applies to its history)."""

    def __init__(self) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def admit(self, principal: Principal, tokens: int) -> tuple[dict[str, str], RateLimitExceededError | None]:
        """Charge one request and `tokens` if both budgets have room (nothing is charged otherwise): the
        x-ratelimit-* headers to answer with, and the 429 to answer when a budget had no room."""
        budgets = self._budgets(principal, tokens)
        short = [budget for budget in budgets if not self._has_room(principal, budget)]
        if not short:
            for budget in budgets:
                self._limiter.hit(budget.item, *self._ids(principal, budget), cost=budget.cost)
        headers = self._headers(principal, budgets)
        return headers, (self._exceeded(principal, short[0]) if short else None)

    def _budgets(self, principal: Principal, tokens: int) -> list[_Budget]:
        budgets = []
        if principal.limits.rpm is not None:
            budgets.append(_Budget("requests", RateLimitItemPerMinute(principal.limits.rpm), 1))
        if principal.limits.tpm is not None:
            budgets.append(_Budget("tokens", RateLimitItemPerMinute(principal.limits.tpm), max(tokens, 1)))
        return budgets

    @staticmethod
    def _ids(principal: Principal, budget: _Budget) -> tuple[str, ...]:
        return (budget.kind, principal.kind, principal.name)

    def _has_room(self, principal: Principal, budget: _Budget) -> bool:
        return self._limiter.test(budget.item, *self._ids(principal, budget), cost=budget.cost)

    def _headers(self, principal: Principal, budgets: list[_Budget]) -> dict[str, str]:
        headers: dict[str, str] = {}
        now = time.time()
        for budget in budgets:
            stats = self._limiter.get_window_stats(budget.item, *self._ids(principal, budget))
            headers[f"x-ratelimit-limit-{budget.kind}"] = str(budget.item.amount)
            headers[f"x-ratelimit-remaining-{budget.kind}"] = str(max(0, stats.remaining))
            headers[f"x-ratelimit-reset-{budget.kind}"] = reset_text(max(0.0, stats.reset_time - now))
        return headers

    def _exceeded(self, principal: Principal, budget: _Budget) -> RateLimitExceededError:
        stats = self._limiter.get_window_stats(budget.item, *self._ids(principal, budget))
        if budget.cost > budget.item.amount:
            message = (
                f"This request needs ~{budget.cost} tokens, more than the {budget.item.amount} tokens per minute "
                f"allowed for '{principal.name}'; lower max_tokens or the prompt."
            )
        else:
            message = f"Rate limit reached for '{principal.name}': {budget.item.amount} {budget.kind} per minute."
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        return RateLimitExceededError(message, retry_after_s=retry_after)
