"""The browser playground: static files shipped in the package (no build step, nothing from the internet),
served at `/` and `/playground/*`. The page talks to the public API only (`/v1/models`, streaming
`/v1/chat/completions` and `/v1/completions` with drafts)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "playground"


def install_playground(app: FastAPI) -> None:
    app.mount("/playground", StaticFiles(directory=STATIC), name="playground")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")
