"""JWT bearer tokens: HS256 secrets, RS256 public keys and JWKS files; exp, nbf, iss and aud are checked and
failures answer a fixed OpenAI-shaped 401 that carries none of PyJWT's exception text."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.api.helpers import assert_openai_error, serve
from tests.auth.conftest import bearer

pytestmark = pytest.mark.anyio

SECRET = "a-test-secret-of-at-least-32-bytes!!"
ISSUER = "https://idp.example"
AUDIENCE = "qwen3-local"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "svc-batch",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "scope": "inference",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256(**overrides: Any) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


def jwt_settings(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"data_dir": tmp_path / "data", "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE, **extra}


async def test_a_valid_hs256_token_is_accepted_as_its_subject(tmp_path: Path) -> None:
    async with serve(**jwt_settings(tmp_path, jwt_secret=SECRET)) as served:
        assert (await served.client.get("/v1/models", headers=bearer(hs256()))).status_code == 200
        both = hs256(scope="inference admin")
        assert (await served.client.get("/metrics", headers=bearer(both))).status_code == 200
        assert_openai_error(
            await served.client.get("/metrics", headers=bearer(hs256())), 403, code="insufficient_scope"
        )


@pytest.mark.parametrize(
    ("token_claims", "key", "message"),
    [
        ({"exp": int(time.time()) - 3600}, SECRET, "expired"),
        ({"nbf": int(time.time()) + 3600}, SECRET, "not valid yet"),
        ({"aud": "someone-else"}, SECRET, "not issued for this server"),
        ({"iss": "https://evil.example"}, SECRET, "not issued for this server"),
        ({"aud": None}, SECRET, "Invalid bearer token"),  # aud configured: it is required
        ({"exp": None}, SECRET, "Invalid bearer token"),  # a token that never expires is refused
        ({"sub": None}, SECRET, "Invalid bearer token"),
        ({}, "another-secret-of-at-least-32-bytes!!", "Invalid bearer token"),
    ],
    ids=["expired", "nbf-future", "wrong-aud", "wrong-iss", "no-aud", "no-exp", "no-sub", "wrong-key"],
)
async def test_bad_tokens_get_a_fixed_401(tmp_path: Path, token_claims: dict[str, Any], key: str, message: str) -> None:
    token = jwt.encode(claims(**token_claims), key, algorithm="HS256")
    async with serve(**jwt_settings(tmp_path, jwt_secret=SECRET)) as served:
        response = await served.client.get("/v1/models", headers=bearer(token))
        error = assert_openai_error(response, 401)
        assert message in error["message"]
        # PyJWT's own words (and the token) never reach the client
        for leak in ("Signature", "signature", "Traceback", "jwt.", "PyJWT", token[:20]):
            assert leak not in response.text


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


async def test_rs256_with_a_public_key_file(tmp_path: Path) -> None:
    signer, stranger = rsa_key(), rsa_key()
    (tmp_path / "idp.pem").write_bytes(public_pem(signer))
    async with serve(**jwt_settings(tmp_path, jwt_public_key=tmp_path / "idp.pem")) as served:
        good = jwt.encode(claims(), signer, algorithm="RS256")
        assert (await served.client.get("/v1/models", headers=bearer(good))).status_code == 200
        forged = jwt.encode(claims(), stranger, algorithm="RS256")
        assert_openai_error(await served.client.get("/v1/models", headers=bearer(forged)), 401)
        # the public key used as an HS256 secret (algorithm confusion) must not pass
        confused = jwt.encode(claims(), SECRET, algorithm="HS256")
        assert_openai_error(await served.client.get("/v1/models", headers=bearer(confused)), 401)


async def test_rs256_with_a_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    first, second = rsa_key(), rsa_key()
    jwks = {"keys": []}
    for kid, key in (("k1", first), ("k2", second)):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwks["keys"].append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    async with serve(**jwt_settings(tmp_path, jwt_jwks_file=tmp_path / "jwks.json")) as served:
        for kid, key in (("k1", first), ("k2", second)):
            token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": kid})
            assert (await served.client.get("/v1/models", headers=bearer(token))).status_code == 200
        swapped = jwt.encode(claims(), first, algorithm="RS256", headers={"kid": "k2"})
        assert_openai_error(await served.client.get("/v1/models", headers=bearer(swapped)), 401)
        unknown = jwt.encode(claims(), first, algorithm="RS256", headers={"kid": "k9"})
        assert_openai_error(await served.client.get("/v1/models", headers=bearer(unknown)), 401)


async def test_scopes_come_from_the_configured_claim_as_a_list(tmp_path: Path) -> None:
    settings = jwt_settings(tmp_path, jwt_secret=SECRET, jwt_scopes_claim="permissions")
    async with serve(**settings) as served:
        token = hs256(scope=None, permissions=["admin"])
        assert (await served.client.get("/slots", headers=bearer(token))).status_code == 200
        assert_openai_error(await served.client.get("/v1/models", headers=bearer(token)), 403)
        assert_openai_error(await served.client.get("/v1/models", headers=bearer(hs256())), 403)  # `scope` ignored
