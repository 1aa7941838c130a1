"""What authentication knows at one moment: the keys, the JWT verifier and the default limits, as one
immutable snapshot. SIGHUP builds a new one and swaps it in with one assignment: a request (or a stream)
keeps the principal it was admitted with, and the next request sees the new keys."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from server.auth.jwt import JwtVerifier, load_verifier
from server.auth.keys import BUILTIN_KEY_NAME, KeyRecord, key_digest, load_keys, match_key
from server.auth.principal import SCOPES, AuthConfigError, Limits, Principal, anonymous
from server.auth.ratelimit import RateLimiter
from server.errors import AuthenticationError, PermissionDeniedError
from server.settings import Settings

log = logging.getLogger(__name__)

# AuthConfigError is re-exported for settings.exposure_error
__all__ = ["Auth", "AuthConfigError", "AuthSnapshot", "auth_configured", "load_snapshot", "require_scope"]

MISSING = "Missing API key: send it as 'Authorization: Bearer YOUR_KEY'."
INCORRECT = "Incorrect API key provided."


@dataclass(frozen=True)
class AuthSnapshot:
    keys: tuple[KeyRecord, ...]  # --api-key's built-in key first, then the key file's (revoked ones too)
    jwt: JwtVerifier | None
    defaults: Limits

    @property
    def enabled(self) -> bool:
        """Whether callers must authenticate: any key (even a revoked one: fail closed) or a JWT key."""
        return bool(self.keys) or self.jwt is not None

    def authenticate(self, authorization: str) -> Principal:
        """The principal an Authorization header stands for; AuthenticationError (401) otherwise."""
        if not self.enabled:
            return anonymous(self.defaults)
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError(MISSING)
        record = match_key(self.keys, token)  # always compares against every key
        if record is not None:
            return record.principal(self.defaults)
        if self.jwt is not None and token.count(".") == 2:
            return self.jwt.verify(token)
        raise AuthenticationError(INCORRECT)


def require_scope(principal: Principal, scope: str) -> None:
    if scope not in principal.scopes:
        raise PermissionDeniedError(f"'{principal.name}' may not call this route: it needs the '{scope}' scope.")


def load_snapshot(settings: Settings) -> AuthSnapshot:
    """Read the key file and JWT key files; AuthConfigError names the one that cannot be used."""
    defaults = Limits(settings.rate_limit_rpm, settings.rate_limit_tpm)
    builtin: tuple[KeyRecord, ...] = ()
    if settings.api_key:
        builtin = (KeyRecord(BUILTIN_KEY_NAME, key_digest(settings.api_key), SCOPES, created=0.0),)
    keys = builtin + load_keys(settings.effective_keys_file())
    return AuthSnapshot(keys, load_verifier(settings, defaults), defaults)


def auth_configured(settings: Settings) -> bool:
    """Whether the server will demand credentials (for settings.exposure_error)."""
    return load_snapshot(settings).enabled


class Auth:
    """One per app (app.state.auth): the current snapshot and the rate limiter, whose counts survive reloads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.snapshot = load_snapshot(settings)
        self.limiter = RateLimiter()

    def reload(self) -> None:
        """Re-read the keys and JWT keys; a file that cannot be used keeps the previous snapshot."""
        try:
            snapshot = load_snapshot(self.settings)
        except AuthConfigError as exc:
            log.error("auth reload failed, the previous keys stay in force: %s", exc)
            return
        self.snapshot = snapshot
        active = sum(1 for record in snapshot.keys if record.revoked is None)
        log.info("auth reloaded: %d active keys, JWT %s", active, "on" if snapshot.jwt else "off")

    def reload_on_sighup(self) -> Callable[[], object]:
        """Install the SIGHUP handler on the running loop; returns what removes it. Where signals cannot be
        handled (not the main thread, Windows), nothing is installed."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):
            return lambda: None
        return partial(loop.remove_signal_handler, signal.SIGHUP)
