"""FastAPI application: lifespan (model loading), middleware, auth, thin routes, readiness and metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.async_engine import AsyncEngine
from engine.engine import LLMEngine
from server import llama_cpp
from server.config import Settings
from server.errors import APIError, install_error_handlers
from server.infill import FillInTheMiddle
from server.llama_cpp import InfillRequest
from server.middleware import RequestContext, ServerState, check_api_key
from server.openapi import install_openapi
from server.playground import install_playground
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
from server.structured_outputs import compile_request

log = logging.getLogger("press.server")


class ModelHolder:
    """Loads the engine on a background thread so /health and /ready answer while weights load."""

    def __init__(self, settings: Settings, state: ServerState) -> None:
        self.settings = settings
        self.state = state
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
            self.serving = Serving(engine, name, self.settings.server, aliases=(cfg.model, engine.engine.loaded.path),
                                   state=self.state)  # fmt: skip
            log.info("model %s ready", name)
        except Exception as exc:
            log.exception("model failed to load")
            self.error = f"{type(exc).__name__}: {exc}"

    def limits(self) -> dict | None:
        """The loaded model's vocabulary size and context length (None while it loads)."""
        if self.serving is None:
            return None
        engine = self.serving.engine.engine
        return {"vocab_size": engine.vocab_size, "max_model_len": engine.max_model_len}

    def require(self) -> Serving:
        if self.serving is None:
            if self.error:
                raise APIError(503, f"The model failed to load: {self.error}", type="server_error",
                               code="model_load_failed")  # fmt: skip
            raise APIError(503, "The model is still loading; retry shortly.", type="server_error",
                           code="model_loading", headers={"Retry-After": "5"})  # fmt: skip
        return self.serving

    def shutdown(self) -> None:
        if self.serving is not None:
            self.serving.engine.shutdown()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    server_state = ServerState()
    holder = ModelHolder(settings, server_state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.start()
        yield
        holder.shutdown()

    app = FastAPI(title="Press", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for block-diffusion language models.")  # fmt: skip
    app.state.holder = holder
    app.state.server_state = server_state
    install_error_handlers(app)
    install_openapi(app, holder.limits)
    if settings.server.cors_origins:
        origins = [o.strip() for o in settings.server.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["x-request-id"])  # fmt: skip
    # Added last, so it runs first: every response, errors and CORS preflights included, gets an id.
    app.add_middleware(RequestContext, config=settings.server, state=server_state)

    def require_key(request: Request) -> None:
        check_api_key(request.headers, settings.server.api_key)

    @app.get("/health")
    async def health() -> dict:
        """Liveness; also reports the engine's load so operators and tests can see work drain."""
        body: dict = {"status": "ok"}
        if holder.serving is not None:
            engine = holder.serving.engine
            loaded = engine.engine.loaded
            body.update(running=engine.num_running, waiting=engine.num_waiting, quantization=loaded.quantization,
                        kv_budget_bytes=loaded.kv_budget)  # fmt: skip
        return body

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def ready() -> JSONResponse:
        if holder.serving is None or server_state.draining:
            reason = "shutting down" if server_state.draining else holder.error or "model loading"
            body = APIError(503, reason, type="server_error", code="not_ready").body()
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready", "model": holder.serving.model_name})

    metrics_deps = [Depends(require_key)] if settings.server.metrics_require_key else []

    @app.get("/metrics", dependencies=metrics_deps, response_class=Response)
    async def metrics() -> Response:
        if holder.serving is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        registry = holder.serving.engine.engine.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_key)])
    async def models() -> ModelList:
        serving = holder.require()
        loaded = serving.engine.engine.loaded
        card = ModelCard(id=serving.model_name, created=int(holder.started), max_model_len=loaded.max_model_len,
                         canvas_length=loaded.canvas_length)  # fmt: skip
        return ModelList(data=[card])

    @app.post("/v1/chat/completions", response_model=None, dependencies=[Depends(require_key)],
              responses={200: {"model": ChatCompletionResponse}})  # fmt: skip
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        serving = holder.require()
        serving.check_model(body.model)
        serving.reject_unsupported(body)
        images = await serving.load_images(body)
        prompt_text, prompt, prompt_images = await asyncio.to_thread(serving.chat_prompt, body, images)
        grammar = await asyncio.to_thread(compile_request, serving.engine.engine, body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        variants, field = await asyncio.to_thread(serving.variants, body, max_tokens)
        states = serving.make_states(body, [prompt], max_tokens, prompt_param="messages", grammar=grammar,
                                     variants=variants, variant_param=field, images=prompt_images)  # fmt: skip
        return await serving.respond(body, states, len(prompt), request, chat=True, prompt_text=prompt_text)

    @app.post("/v1/completions", response_model=None, dependencies=[Depends(require_key)],
              responses={200: {"model": CompletionResponse}})  # fmt: skip
    async def completions(body: CompletionRequest, request: Request):
        serving = holder.require()
        serving.check_model(body.model)
        serving.reject_unsupported(body)
        prompts = await asyncio.to_thread(serving.completion_prompts, body)
        grammar = await asyncio.to_thread(compile_request, serving.engine.engine, body)
        variants, field = await asyncio.to_thread(serving.variants, body, body.max_tokens)
        states = serving.make_states(body, prompts, body.max_tokens, prompt_param="prompt", grammar=grammar,
                                     variants=variants, variant_param=field)  # fmt: skip
        prompt_tokens = sum(len(p) for p in prompts)
        if body.suffix is not None:  # fill-in-the-middle: candidate lengths per choice, the best one answers
            return await FillInTheMiddle(serving, body, states, variants, prompt_tokens).respond(request)
        return await serving.respond(body, states, prompt_tokens, request, chat=False)

    @app.post("/infill", response_model=None, dependencies=[Depends(require_key)])
    async def llama_infill(body: InfillRequest, request: Request):
        """llama.cpp's fill-in-the-middle endpoint (editor plugins)."""
        return await llama_cpp.infill(holder.require(), body, request)

    if settings.server.playground:
        install_playground(app)
    return app
