"""JWT bearer tokens (PyJWT): an HS256 shared secret, or RS256 with a PEM public key or a JWKS file.

`exp` is required; `nbf`, `iss` and `aud` are checked (iss/aud when configured, and then required). The
subject (`sub`) is the principal's name; scopes come from a configurable claim, a space-separated string
(OAuth's `scope`) or a list. Failures map to fixed messages: nothing from PyJWT's exception text reaches
the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from server.auth.principal import AuthConfigError, Limits, Principal
from server.errors import AuthenticationError
from server.settings import Settings

LEEWAY_S = 30  # clock skew tolerated on exp/nbf between the issuer and this machine


class JwtConfigError(AuthConfigError):
    """A configured key file cannot be read; the message names it."""


@dataclass(frozen=True)
class JwtVerifier:
    """Verification keys read once (at start and on SIGHUP): a secret, a public key, or a JWKS by `kid`."""

    algorithms: tuple[str, ...]
    key: Any  # the HS256 secret or the RS256 public key; None when the JWKS is used
    jwks: jwt.PyJWKSet | None
    issuer: str | None
    audience: str | None
    scopes_claim: str
    limits: Limits

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                key=self._key_for(token),
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_S,
                options={"require": self._required_claims()},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("The bearer token has expired.", code="token_expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("The bearer token is not valid yet (nbf).", code="invalid_token") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise AuthenticationError(
                "The bearer token was not issued for this server.", code="invalid_token"
            ) from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthenticationError("Invalid bearer token.", code="invalid_token") from None
        return Principal(str(claims["sub"]), frozenset(_scopes(claims.get(self.scopes_claim))), "jwt", self.limits)

    def _required_claims(self) -> list[str]:
        required = ["exp", "sub"]
        required += ["iss"] if self.issuer else []
        required += ["aud"] if self.audience else []
        return required

    def _key_for(self, token: str) -> Any:
        if self.jwks is None:
            return self.key
        kid = jwt.get_unverified_header(token).get("kid")
        for candidate in self.jwks.keys:
            if candidate.key_id == kid or (kid is None and len(self.jwks.keys) == 1):
                return candidate.key
        raise jwt.InvalidKeyError("no key with this kid")


def _scopes(claim: Any) -> list[str]:
    if isinstance(claim, str):
        return claim.split()
    if isinstance(claim, list):
        return [str(scope) for scope in claim]
    return []


def _read(path: Path) -> str:
    try:
        return path.expanduser().read_text()
    except OSError as exc:
        raise JwtConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _verifier(settings: Settings, limits: Limits, algorithm: str, key: Any, jwks: jwt.PyJWKSet | None) -> JwtVerifier:
    return JwtVerifier(
        (algorithm,), key, jwks, settings.jwt_issuer, settings.jwt_audience, settings.jwt_scopes_claim, limits
    )


def load_verifier(settings: Settings, limits: Limits) -> JwtVerifier | None:
    """The verifier the settings describe, or None when JWT is off. Only one key kind is accepted at a time,
    each with its own algorithm, so an RS256 public key can never be used as an HS256 secret."""
    if settings.jwt_secret:
        return _verifier(settings, limits, "HS256", settings.jwt_secret.encode(), None)
    if settings.jwt_public_key is not None:
        text = _read(settings.jwt_public_key)
        try:
            source = jwt.algorithms.RSAAlgorithm.from_jwk(text) if text.lstrip().startswith("{") else text
            key = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).prepare_key(source)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise JwtConfigError(f"{settings.jwt_public_key} is not an RSA public key") from exc
        return _verifier(settings, limits, "RS256", key, None)
    if settings.jwt_jwks_file is not None:
        try:
            jwks = jwt.PyJWKSet.from_json(_read(settings.jwt_jwks_file))
        except (ValueError, jwt.PyJWTError) as exc:
            raise JwtConfigError(f"{settings.jwt_jwks_file} is not a JWKS document: {exc}") from exc
        return _verifier(settings, limits, "RS256", None, jwks)
    return None
