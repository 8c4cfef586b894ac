"""FastAPI application: lifespan (model loading), thin routes, readiness."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import LLMEngine
from server.errors import APIError, install_error_handlers
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from server.serving import Serving

log = logging.getLogger("press.server")


@dataclass
class ServerSettings:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000


class ModelHolder:
    """Loads the engine on a background thread so /health and /ready answer while weights load."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.serving: Serving | None = None
        self.error: str | None = None
        self.started = time.time()
        self._thread = threading.Thread(target=self._load, name="press-loader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _load(self) -> None:
        try:
            cfg = self.settings.engine
            engine = AsyncEngine(LLMEngine(cfg))
            name = cfg.served_model_name or cfg.model
            self.serving = Serving(engine, name, aliases=(cfg.model, engine.engine.loaded.path))
            log.info("model %s ready", name)
        except Exception as exc:
            log.exception("model failed to load")
            self.error = f"{type(exc).__name__}: {exc}"

    def require(self) -> Serving:
        if self.serving is None:
            if self.error:
                raise APIError(
                    503, f"The model failed to load: {self.error}", type="server_error", code="model_load_failed"
                )
            raise APIError(
                503,
                "The model is still loading; retry shortly.",
                type="server_error",
                code="model_loading",
                headers={"Retry-After": "5"},
            )
        return self.serving

    def shutdown(self) -> None:
        if self.serving is not None:
            self.serving.engine.shutdown()


ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    holder = ModelHolder(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.start()
        yield
        holder.shutdown()

    app = FastAPI(
        title="Press",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible server for block-diffusion language models.",
    )
    app.state.holder = holder
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        """Liveness; also reports the engine's load so operators and tests can see work drain."""
        body: dict = {"status": "ok"}
        if holder.serving is not None:
            engine = holder.serving.engine
            body.update(running=engine.num_running, waiting=engine.num_waiting)
        return body

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def ready() -> JSONResponse:
        if holder.serving is None:
            body = APIError(503, holder.error or "model loading", type="server_error", code="not_ready").body()
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready", "model": holder.serving.model_name})

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        serving = holder.require()
        loaded = serving.engine.engine.loaded
        card = ModelCard(
            id=serving.model_name,
            created=int(holder.started),
            max_model_len=loaded.max_model_len,
            canvas_length=loaded.canvas_length,
        )
        return ModelList(data=[card])

    @app.post("/v1/chat/completions", response_model=None, responses={200: {"model": ChatCompletionResponse}, **ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        serving = holder.require()
        serving.check_model(body.model)
        serving.reject_unsupported(body)
        prompt = await asyncio.to_thread(serving.chat_prompt, body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        states = serving.make_states(body, [prompt], max_tokens, prompt_param="messages")
        return await serving.respond(body, states, len(prompt), request, chat=True)

    @app.post("/v1/completions", response_model=None, responses={200: {"model": CompletionResponse}, **ERRORS})
    async def completions(body: CompletionRequest, request: Request):
        serving = holder.require()
        serving.check_model(body.model)
        serving.reject_unsupported(body)
        prompts = await asyncio.to_thread(serving.completion_prompts, body)
        states = serving.make_states(body, prompts, body.max_tokens, prompt_param="prompt")
        return await serving.respond(body, states, sum(len(p) for p in prompts), request, chat=False)

    return app
