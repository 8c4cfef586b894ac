"""The OpenAI error envelope, built in one place, and the handlers that turn failures into it."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("press.server")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 whose message names the offending field, so a user can fix the request without the docs."""
    if param and f"'{param}'" not in message and f"`{param}`" not in message and code != "context_length_exceeded":
        message = f"Invalid value for '{param}': {message}"
    return APIError(400, message, param=param, code=code)


def body_too_large(limit: int, length: str | None = None) -> APIError:
    """413 for a body over `limit` bytes: by its Content-Length when given, else found while reading it."""
    if length is not None:
        return APIError(413, f"The request body is {length} bytes; the limit is {limit} bytes.",
                        code="request_too_large")  # fmt: skip
    return APIError(413, f"The request body exceeds the limit of {limit} bytes.", code="request_too_large")


class RequestCut(Exception):
    """A request the server stopped waiting for: past request_timeout, or still running when the shutdown timeout
    ran out. Raised while its events are awaited; `error` is what its client gets (a response, or a stream's
    last event)."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


def timeout_error(seconds: float) -> APIError:
    return APIError(
        504, f"The request did not finish within {seconds:g} s.", type="timeout_error", code="request_timeout"
    )


def shutdown_error() -> APIError:
    return APIError(503, "The server shut down before the request finished; retry on another instance.",
                    type="server_error", code="shutting_down", headers={"Retry-After": "1"})  # fmt: skip


def engine_error(detail: str | None) -> APIError:
    """A generation that failed in the engine (the server keeps serving)."""
    return APIError(500, f"Generation failed: {detail}", type="server_error", code="engine_error")


# pydantic's names for the branches of a union (and for constrained or validated types) in an error's location.
_BRANCH_LABELS = {
    "str", "int", "float", "bool", "none", "nullable", "constrained-str", "constrained-int", "constrained-float",
    "function-after", "function-before", "function-wrap", "function-plain",
}  # fmt: skip


def _param_of(loc: tuple) -> str | None:
    # Drop the "body" root and pydantic's union-branch labels such as "str" or "list[int]".
    parts = [str(p) for p in loc if p != "body"]
    cleaned = [p for p in parts if not any(ch in p for ch in "[]") and p not in _BRANCH_LABELS]
    if not cleaned:
        return None
    out = cleaned[0]
    for p in cleaned[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def _most_relevant(errors: list[dict]) -> dict:
    """For a union field (stop: str | list[str]) pydantic reports one error per branch; report the branch
    that matches the JSON type the client actually sent, e.g. the list's length for a list."""
    first = errors[0]
    same_field = [e for e in errors if _param_of(tuple(e.get("loc", ()))) == _param_of(tuple(first.get("loc", ())))]
    value = first.get("input")
    wanted = "list[" if isinstance(value, list) else None
    if wanted:
        for e in same_field:
            if any(wanted in str(p) for p in e.get("loc", ())):
                return e
    return first


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = _most_relevant(errors)
    if first.get("type") == "json_invalid":
        return bad_request("The request body is not valid JSON.", code="invalid_json")
    if first.get("type") == "missing" and first.get("loc") == ("body",):
        return bad_request("The request body is missing; send a JSON object.", code="invalid_json")
    if first.get("type") == "model_attributes_type":
        return bad_request("The request body must be a JSON object.", code="invalid_json")
    param = _param_of(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
        return bad_request(message, param=param, code="missing_required_parameter")
    value = first.get("input")
    shown = json.dumps(value, default=str)[:80] if value is not None else "null"
    return bad_request(f"Invalid value for '{param}': {msg} (got {shown}).", param=param, code="invalid_value")


def internal_error() -> APIError:
    return APIError(500, "Internal server error.", type="server_error", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return APIError(
            exc.status_code,
            str(exc.detail),
            type=kind.get(exc.status_code, "invalid_request_error"),
            code=code.get(exc.status_code),
            headers=getattr(exc, "headers", None),
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return internal_error().response()
