"""POST /v1/embeddings, as OpenAI's: L2-normalized pooled vectors of a second llama.cpp context on the served
model (bindings/embedder.py), computed on the engine thread between chat steps (server/engine/engine.py).

Served when embeddings are on (--embeddings, or `embedding: true` in models.yaml). When they are off the route
answers 400 `embeddings_disabled` saying how to turn them on. llama-server answers 501 here, but clients treat
a 5xx as a passing server fault: the official `openai` SDK retries 501 twice with back-off before giving up,
and retry layers in RAG pipelines keep trying. Whether a server embeds is a fixed fact of its configuration,
which a 4xx says; OpenAI itself answers 400 when a model cannot do what the route asks.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Depends, Request

from server.api.auth import require_api_key
from server.api.openai import OFFLOAD_PROMPT_CHARS
from server.api.schemas import EmbeddingRequest
from server.api.sse import until_disconnected
from server.api.state import server_state
from server.audit.capture import request_audit
from server.audit.record import AuditRecord
from server.engine.engine import Engine
from server.errors import InvalidRequestError, RequestTimeoutError
from server.fleet.slot import ModelSlot

router = APIRouter(dependencies=[Depends(require_api_key)])

EMBEDDINGS_OFF = (
    "This server does not serve embeddings. Start it with --embeddings (QWEN3_LOCAL_EMBEDDINGS=1), or set "
    "`embedding: true` for the model in models.yaml."
)


@router.post("/v1/embeddings", response_model=None)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    state = server_state(request)
    audit = request_audit(request)
    if audit is not None:
        audit.model, audit.user = body.model or state.served_model_id, body.user
    lease = await state.acquire(body.model, body.keep_alive)  # loads the model on demand; held while embedding
    try:
        return await _embeddings(body, request, lease.slot, audit)
    finally:
        lease.release()


async def _embeddings(
    body: EmbeddingRequest, request: Request, slot: ModelSlot, audit: AuditRecord | None
) -> dict[str, Any]:
    engine, _ = slot.ready()
    info = engine.embedder_info
    if info is None:
        raise InvalidRequestError(EMBEDDINGS_OFF, param="model", code="embeddings_disabled")
    if body.dimensions is not None and body.dimensions != info.n_embd:
        raise InvalidRequestError(
            f"dimensions={body.dimensions} is not supported: this model's embeddings have {info.n_embd} "
            f"dimensions and it cannot shorten them (only models trained for it, such as OpenAI's "
            f"text-embedding-3, can); leave dimensions out or set it to {info.n_embd}",
            param="dimensions",
        )
    token_lists = await _tokenized(body.inputs(), engine)
    if audit is not None:  # the output is vectors: the record keeps the input and its token count
        audit.keep_prompt(json.dumps(body.inputs(), ensure_ascii=False))
        audit.prompt_tokens = sum(len(tokens) for tokens in token_lists)
    future = engine.embed(token_lists)
    vectors = await until_disconnected(
        request, _within(asyncio.wrap_future(future), slot.spec.settings.request_timeout_s)
    )
    data = [
        {"object": "embedding", "index": index, "embedding": _encoded(_normalized(vector), body.encoding_format)}
        for index, vector in enumerate(vectors)
    ]
    n_tokens = sum(len(tokens) for tokens in token_lists)
    return {
        "object": "list",
        "data": data,
        "model": slot.id,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }


async def _tokenized(inputs: list[str | list[int]], engine: Engine) -> list[list[int]]:
    """Texts tokenized as llama-server does for embeddings (BOS/EOS as the model wants, special tokens
    parsed); token-id inputs as given. Long texts are tokenized off the event loop."""

    def tokenize() -> list[list[int]]:
        return [
            engine.vocab.tokenize(item, add_special=True, parse_special=True) if isinstance(item, str) else item
            for item in inputs
        ]

    n_chars = sum(len(item) for item in inputs if isinstance(item, str))
    return await asyncio.to_thread(tokenize) if n_chars > OFFLOAD_PROMPT_CHARS else tokenize()


async def _within(work: asyncio.Future[list[bytes]], timeout_s: float) -> list[bytes]:
    try:
        return await asyncio.wait_for(work, timeout_s)
    except TimeoutError:
        raise RequestTimeoutError(f"the embeddings were not computed within {timeout_s:g} s") from None


def _normalized(vector: bytes) -> npt.NDArray[np.float32]:
    """L2-normalized, as llama-server (and OpenAI) return them; a zero vector stays zero."""
    values = np.frombuffer(vector, dtype="<f4").astype(np.float64)
    norm = float(np.linalg.norm(values))
    return (values / norm if norm > 0 else values).astype("<f4")


def _encoded(vector: npt.NDArray[np.float32], encoding_format: str) -> list[float] | str:
    """float: a JSON list; base64: the little-endian float32 bytes, as OpenAI sends them (the `openai` SDK asks
    for base64 by default and decodes it with numpy's frombuffer, float32)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.tobytes()).decode("ascii")
    return [float(value) for value in vector.tolist()]
