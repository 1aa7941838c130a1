"""The authenticated caller a request runs as: what the routes, the rate limiter and the audit log see."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["inference", "admin"]
SCOPES: tuple[Scope, ...] = ("inference", "admin")

PrincipalKind = Literal["key", "jwt", "anonymous"]


class AuthConfigError(ValueError):
    """The key file or a JWT key file cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class Limits:
    """Requests and tokens per minute; None: unlimited."""

    rpm: int | None = None
    tpm: int | None = None

    def over(self, defaults: Limits) -> Limits:
        """These limits, with `defaults` where these have none."""
        return Limits(
            self.rpm if self.rpm is not None else defaults.rpm, self.tpm if self.tpm is not None else defaults.tpm
        )


@dataclass(frozen=True)
class Principal:
    """A key's name or a token's subject, never the credential itself."""

    name: str
    scopes: frozenset[str]
    kind: PrincipalKind
    limits: Limits = Limits()


def anonymous(limits: Limits) -> Principal:
    """The caller when no authentication is configured (loopback or --allow-no-auth): may do everything."""
    return Principal(name="anonymous", scopes=frozenset(SCOPES), kind="anonymous", limits=limits)
