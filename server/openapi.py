"""The OpenAPI document, made to say what the server really does.

FastAPI derives the document from the routes' pydantic models, which gets the request bodies right but not the
answers: it lists a 422 `HTTPValidationError` that Press never sends (invalid requests get a 400 in the OpenAI
error envelope), and only `application/json` for endpoints that stream `text/event-stream` when asked to. This
module rewrites those parts once, when the document is first built; tests/test_openapi.py checks the result and
the Schemathesis run holds the server to it.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.protocol import ChatCompletionChunk, CompletionChunk, ErrorResponse

# Every status an operation can answer with besides 200, and why.
ERROR_STATUSES = {
    400: "Invalid request (the OpenAI error envelope; `param` names the field).",
    401: "Missing or wrong API key (when the server has one).",
    404: "Unknown model, or unknown path.",
    413: "Request body over the server's limit.",
    500: "The generation failed in the engine (the server keeps serving).",
    503: "The model is loading, the queue is full (with Retry-After) or the server is shutting down.",
    504: "The request ran past the server's request timeout.",
}
GENERATION_PATHS = {
    "/v1/chat/completions": ChatCompletionChunk,
    "/v1/completions": CompletionChunk,
    "/infill": None,
}
SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events, one `data: <JSON>` line per event, ending with `data: [DONE]`. "
    "Each JSON is a {name} (per refinement pass a chunk carries a `draft`; errors after the stream started come "
    "as one error-envelope event). U+0085, U+2028 and U+2029 are escaped in the JSON, so line-based clients can "
    "split the stream safely."
)


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = _truthful(doc)
        return app.openapi_schema

    app.openapi = openapi


def _truthful(doc: dict) -> dict:
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for model in (ErrorResponse, ChatCompletionChunk, CompletionChunk):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = schema
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if not path.startswith("/v1/") and path != "/infill":
                continue
            for status, description in ERROR_STATUSES.items():
                if method == "get" and status in (400, 413, 500, 504):
                    continue  # GET /v1/models takes no body and runs nothing
                responses[str(status)] = {"description": description, "content": error}
            if path in GENERATION_PATHS:
                chunk = GENERATION_PATHS[path]
                ok = responses.setdefault("200", {"description": "Successful Response"})
                name = f"`{chunk.__name__}`" if chunk is not None else "llama.cpp-style chunk"
                ok.setdefault("content", {})["text/event-stream"] = {
                    "schema": {"type": "string", "description": SSE_DESCRIPTION.format(name=name)},
                    **({"x-event-data": {"$ref": f"#/components/schemas/{chunk.__name__}"}} if chunk else {}),
                }
    return doc
