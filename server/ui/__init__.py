"""The web UI: static files (plain ES modules, HTML and CSS, no build step) served at /ui.

The page talks to the server's own API from the browser (/v1/models, /v1/chat/completions, /tokenize, /slots,
/plan, /ui/api/*) with the key the user types, kept in sessionStorage; the files themselves need no key."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"


def mount_ui(app: FastAPI) -> None:
    """Serve the UI at /ui/ (index.html for the directory) and redirect /ui to it."""

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui", StaticFiles(directory=STATIC_DIR, html=True), name="ui")
