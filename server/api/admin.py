"""Operational routes: /health (no key needed, for load balancers), /slots, /plan and /metrics (`admin`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.api.auth import require_admin
from server.api.errors import error_body
from server.api.state import server_state
from server.metrics import CONTENT_TYPE

health_router = APIRouter()
router = APIRouter(dependencies=[Depends(require_admin)])  # the `admin` scope


@health_router.get("/health", response_model=None)
async def health(request: Request) -> JSONResponse:
    """200 {"status": "ok"} once the model serves; 503 {"status": "downloading", "progress": {"bytes_done",
    "bytes_total"}} while it downloads; 503 with an OpenAI error body (and the status) otherwise."""
    state = server_state(request)
    if state.status == "ready":
        return JSONResponse({"status": "ok"})
    if (progress := state.download_progress()) is not None:
        bytes_done, bytes_total = progress
        body = {"status": "downloading", "progress": {"bytes_done": bytes_done, "bytes_total": bytes_total}}
        return JSONResponse(body, status_code=503)
    code = {"loading": "model_loading", "failed": "model_load_failed"}.get(state.status, "shutting_down")
    body = {"status": state.status, **error_body(state.unavailable_reason(), error_type="server_error", code=code)}
    return JSONResponse(body, status_code=503)


@router.get("/slots", response_model=None)
async def slots(request: Request) -> list[dict[str, Any]]:
    engine, _ = server_state(request).ready()
    return [
        {
            "id": slot.slot,
            "state": slot.state,
            "request_id": slot.request_id,
            "choice_index": slot.choice_index,
            "n_cached_tokens": slot.n_cached_tokens,
            "n_prompt_tokens": slot.n_prompt_tokens,
            "n_generated_tokens": slot.n_generated_tokens,
        }
        for slot in engine.slots()
    ]


@router.get("/plan", response_model=None)
async def load_plan(request: Request) -> dict[str, Any]:
    """How the model was loaded: the extra-buffer-type verdict and, with --auto-offload, the offload plan
    (offload/README.md documents its JSON) and each buffer's predicted vs allocated size."""
    engine, _ = server_state(request).ready()
    return dict(engine.load_report or {})


@router.get("/metrics", response_model=None)
async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE)
