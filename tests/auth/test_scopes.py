"""Scopes per route, the built-in --api-key, the principal the audit log reads, and 401s that say nothing
about which keys exist."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi import Depends, Request

from server.api.auth import require_api_key
from server.auth.keys import revoke_key
from server.settings import Settings, exposure_error
from tests.api.helpers import assert_openai_error, serve
from tests.auth.conftest import bearer, make_key

pytestmark = pytest.mark.anyio

ADMIN_ROUTES = ("/metrics", "/slots", "/plan")
INFERENCE_ROUTES = ("/v1/models", "/v1/models/fake-model")


async def test_each_route_needs_its_scope(tmp_path: Path, keys_file: Path) -> None:
    user = make_key(keys_file, "user", "inference")
    ops = make_key(keys_file, "ops", "admin")
    both = make_key(keys_file, "both", "inference", "admin")
    async with serve(data_dir=tmp_path / "data") as served:
        client = served.client
        assert (await client.get("/health")).status_code == 200  # open: for load balancers
        for path in ADMIN_ROUTES + INFERENCE_ROUTES:
            assert_openai_error(await client.get(path), 401, code="invalid_api_key")
            assert (await client.get(path, headers=bearer(both))).status_code == 200, path
        for path in ADMIN_ROUTES:
            assert_openai_error(await client.get(path, headers=bearer(user)), 403, code="insufficient_scope")
            assert (await client.get(path, headers=bearer(ops))).status_code == 200
        for path in INFERENCE_ROUTES:
            assert_openai_error(await client.get(path, headers=bearer(ops)), 403, code="insufficient_scope")
            assert (await client.get(path, headers=bearer(user))).status_code == 200
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert_openai_error(await client.post("/v1/chat/completions", json=chat, headers=bearer(ops)), 403)
        assert (await client.post("/v1/chat/completions", json=chat, headers=bearer(user))).status_code == 200


async def test_the_api_key_flag_is_a_built_in_key_with_every_scope(tmp_path: Path, keys_file: Path) -> None:
    named = make_key(keys_file, "named")
    async with serve(data_dir=tmp_path / "data", api_key="sekret") as served:
        for path in ADMIN_ROUTES + INFERENCE_ROUTES:
            assert (await served.client.get(path, headers=bearer("sekret"))).status_code == 200
        assert (await served.client.get("/v1/models", headers=bearer(named))).status_code == 200  # both work


async def test_the_principal_is_on_the_request_for_the_audit_log(tmp_path: Path, keys_file: Path) -> None:
    key = make_key(keys_file, "alice", "inference")
    async with serve(data_dir=tmp_path / "data") as served:

        async def whoami(request: Request) -> dict[str, object]:
            principal = request.state.principal
            return {"name": principal.name, "scopes": sorted(principal.scopes), "kind": principal.kind}

        served.app.add_api_route("/whoami", whoami, dependencies=[Depends(require_api_key)])
        answer = (await served.client.get("/whoami", headers=bearer(key))).json()
        assert answer == {"name": "alice", "scopes": ["inference"], "kind": "key"}


async def test_no_auth_configured_is_an_anonymous_principal_with_every_scope(tmp_path: Path) -> None:
    async with serve(data_dir=tmp_path / "data") as served:
        assert (await served.client.get("/metrics")).status_code == 200
        assert (await served.client.get("/v1/models")).status_code == 200


async def test_bad_credentials_all_look_alike_and_never_reach_the_logs(
    tmp_path: Path, keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unknown, revoked and one-character-off keys get the same answer: nothing says which keys exist."""
    live = make_key(keys_file, "live")
    revoked = make_key(keys_file, "gone")
    revoke_key(keys_file, "gone")
    near_miss = live[:-1] + ("A" if live[-1] != "A" else "B")
    caplog.set_level(logging.DEBUG)
    async with serve(data_dir=tmp_path / "data") as served:
        bodies = []
        for presented in ("sk-q3l-unknown", revoked, near_miss, "gone", "live"):
            response = await served.client.get("/v1/models", headers=bearer(presented))
            assert_openai_error(response, 401, code="invalid_api_key")
            assert not any(h.startswith("x-ratelimit") for h in response.headers)
            bodies.append(response.json())
        assert all(body == bodies[0] for body in bodies)
        assert (await served.client.get("/v1/models", headers=bearer(live))).status_code == 200
    for secret in (live, revoked, near_miss, live[7:20]):
        assert secret not in caplog.text


def test_named_keys_or_jwt_count_as_auth_beyond_loopback(tmp_path: Path, keys_file: Path) -> None:
    data = tmp_path / "data"
    assert exposure_error(Settings(host="0.0.0.0", data_dir=data)) is not None
    assert exposure_error(Settings(host="0.0.0.0", data_dir=data, jwt_secret="s" * 32)) is None
    make_key(keys_file, "alice")
    assert exposure_error(Settings(host="0.0.0.0", data_dir=data)) is None
    revoke_key(keys_file, "alice")  # a file of revoked keys still demands a key: it fails closed
    assert exposure_error(Settings(host="0.0.0.0", data_dir=data)) is None
