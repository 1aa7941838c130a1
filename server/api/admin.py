"""Operational routes: /health (no key needed, for load balancers), /slots, /plan and /metrics (`admin`), and
the served models' POST /models/{id}/load and /models/{id}/unload (`admin`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.api.auth import require_admin
from server.api.errors import error_body
from server.api.state import ServerState, server_state
from server.errors import InvalidRequestError
from server.fleet.slot import ModelSlot
from server.metrics import CONTENT_TYPE
from server.rpc.failover import app_failover

health_router = APIRouter()
router = APIRouter(dependencies=[Depends(require_admin)])  # the `admin` scope


@health_router.get("/health", response_model=None)
async def health(request: Request) -> JSONResponse:
    """One model: 200 {"status": "ok"} once it serves; 503 {"status": "downloading", "progress": {"bytes_done",
    "bytes_total"}} while it downloads; 503 with an OpenAI error body (and the status) otherwise. Several: 200
    while at least one is ready, 503 when none is; either way the body's `models` gives each one's status."""
    state = server_state(request)
    failover = app_failover(request.app)
    if failover is not None and (lost := failover.health()) is not None:  # an RPC worker died: 503 naming it
        return JSONResponse(lost, status_code=503)
    if len(state.fleet.slots) > 1:
        return _fleet_health(state)
    return _model_health(state.default)


def _model_health(slot: ModelSlot) -> JSONResponse:
    if slot.status == "ready":
        return JSONResponse({"status": "ok"})
    if (progress := slot.download_progress()) is not None:
        bytes_done, bytes_total = progress
        body = {"status": "downloading", "progress": {"bytes_done": bytes_done, "bytes_total": bytes_total}}
        return JSONResponse(body, status_code=503)
    code = {"loading": "model_loading", "failed": "model_load_failed"}.get(slot.status, "shutting_down")
    body = {"status": slot.status, **error_body(slot.unavailable_reason(), error_type="server_error", code=code)}
    return JSONResponse(body, status_code=503)


def _fleet_health(state: ServerState) -> JSONResponse:
    models: dict[str, Any] = {}
    for slot in state.fleet.slots.values():
        entry: dict[str, Any] = {"status": slot.status}
        if (progress := slot.download_progress()) is not None:
            entry["progress"] = {"bytes_done": progress[0], "bytes_total": progress[1]}
        if slot.load_error is not None:
            entry["error"] = slot.load_error
        models[slot.id] = entry
    if any(slot.status == "ready" for slot in state.fleet.slots.values()):
        return JSONResponse({"status": "ok", "models": models})
    body = {
        "status": "unavailable",
        "models": models,
        **error_body("No model is ready to serve.", error_type="server_error", code="no_model_ready"),
    }
    return JSONResponse(body, status_code=503)


@router.get("/slots", response_model=None)
async def slots(request: Request, model: str | None = None) -> list[dict[str, Any]]:
    """`?model=` picks a served model (default: the default model)."""
    engine, _ = server_state(request).model(model).ready()
    return [
        {
            "id": slot.slot,
            "state": slot.state,
            "request_id": slot.request_id,
            "choice_index": slot.choice_index,
            "n_cached_tokens": slot.n_cached_tokens,
            "n_prompt_tokens": slot.n_prompt_tokens,
            "n_generated_tokens": slot.n_generated_tokens,
            # speculative decoding in this slot since start: drafted and accepted tokens (acceptance null: none)
            "n_drafted": slot.n_drafted,
            "n_accepted": slot.n_accepted,
            "acceptance": slot.acceptance,
        }
        for slot in engine.slots()
    ]


@router.get("/plan", response_model=None)
async def load_plan(request: Request, model: str | None = None) -> dict[str, Any]:
    """How the model (`?model=`, default: the default model) was loaded: the extra-buffer-type verdict and,
    with --auto-offload, the offload plan (offload/README.md documents its JSON) and each buffer's predicted vs
    allocated size."""
    engine, _ = server_state(request).model(model).ready()
    return dict(engine.load_report or {})


@router.get("/metrics", response_model=None)
async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE)


def _model_status(slot: ModelSlot) -> dict[str, Any]:
    return {"id": slot.id, "state": slot.public_state, "status": slot.status, "error": slot.load_error}


@router.post("/models/{model_id:path}/load", response_model=None, include_in_schema=False)
async def load_model(model_id: str, request: Request) -> dict[str, Any]:
    """Load the model now (evicting idle models if it does not fit) and answer once it serves; a model whose
    load failed tries again."""
    slot = await server_state(request).fleet.load(model_id)
    return _model_status(slot)


@router.post("/models/{model_id:path}/unload", response_model=None, include_in_schema=False)
async def unload_model(model_id: str, request: Request) -> dict[str, Any]:
    """Unload the model now and free its memory; requests it is serving fail. It loads again on demand."""
    fleet = server_state(request).fleet
    slot = fleet.resolve(model_id)
    await fleet.unload(slot)
    return _model_status(slot)


@router.post("/admin/reload", response_model=None, include_in_schema=False)
async def reload_server(request: Request) -> dict[str, Any]:
    """After an RPC worker was lost (GET /health names it): replace this process with one over the workers left,
    which re-plans; answered before the process goes (server/rpc/failover.py). 400 when no worker is lost."""
    failover = app_failover(request.app)
    if failover is None or failover.lost is None:
        raise InvalidRequestError("no RPC worker is lost: there is nothing to reload", code="nothing_to_reload")
    return failover.reload_without_lost()
