"""The OpenAPI document, made to say what the server really does.

FastAPI derives the document from the routes' pydantic models, which gets the request bodies right but not the
answers: it lists a 422 `HTTPValidationError` that Press never sends (invalid requests get a 400 in the OpenAI
error envelope), and only `application/json` for endpoints that stream `text/event-stream` when asked to. This
module rewrites those parts once, when the document is first built; tests/test_openapi.py checks the result and
the Schemathesis run holds the server to it.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.protocol import SEED_MAX, SEED_MIN, ChatCompletionChunk, CompletionChunk, ErrorResponse

# Every status an operation can answer with besides 200, and why.
ERROR_STATUSES = {
    400: "Invalid request (the OpenAI error envelope; `param` names the field).",
    401: "Missing or wrong API key (when the server has one).",
    404: "Unknown model, or unknown path.",
    408: "The request body did not arrive within the server's body timeout.",
    413: "Request body over the server's limit.",
    500: "The generation failed in the engine (the server keeps serving).",
    503: "The model is loading, the queue is full (with Retry-After) or the server is shutting down.",
    504: "The request ran past the server's request timeout.",
}
GENERATION_PATHS = {
    "/v1/chat/completions": "ChatCompletionChunk",
    "/v1/completions": "CompletionChunk",
    "/infill": "InfillChunk",
}
# llama.cpp's /infill stream chunk: the text so far and whether this is the last one (its other fields vary).
INFILL_CHUNK = {
    "type": "object",
    "required": ["content", "stop"],
    "properties": {"content": {"type": "string"}, "stop": {"type": "boolean"}},
}
SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events, one `data: <JSON>` line per event, ending with `data: [DONE]`. "
    "Each JSON is a `{name}` (per refinement pass a chunk carries a `draft`; errors after the stream started come "
    "as one error-envelope event). U+0085, U+2028 and U+2029 are escaped in the JSON, so line-based clients can "
    "split the stream safely."
)


def install_openapi(app: FastAPI, limits: Callable[[], dict | None]) -> None:
    """`limits()` gives the loaded model's `vocab_size` and `max_model_len` (None while it loads): the document then
    bounds prompt token ids and answer lengths by them. It is cached once the model is loaded."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            doc = _truthful(doc)
            model = limits()
            if model is None:
                return doc
            _model_bounds(doc, **model)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def _subschemas(node: object):
    """Every object in a JSON tree, each before what it holds (so one rewritten when yielded is walked as
    rewritten)."""
    if isinstance(node, dict):
        yield node
        for value in list(node.values()):
            yield from _subschemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _subschemas(value)


def _model_bounds(doc: dict, vocab_size: int, max_model_len: int) -> None:
    schemas = doc["components"]["schemas"]

    def bound_integers(node: object, maximum: int, minimum: int | None = None) -> None:
        for schema in _subschemas(node):
            if schema.get("type") == "integer":
                schema["maximum"] = min(schema.get("maximum", maximum), maximum)
                if minimum is not None:
                    schema["minimum"] = max(schema.get("minimum", minimum), minimum)

    bound_integers(schemas["CompletionRequest"]["properties"]["prompt"], vocab_size - 1, 0)
    for name, fields in {
        "CompletionRequest": ("max_tokens", "middle_lengths"),
        "ChatCompletionRequest": ("max_tokens", "max_completion_tokens"),
        "InfillRequest": ("n_predict",),
    }.items():
        for field in fields:
            bound_integers(schemas[name]["properties"][field], max_model_len)
    bound_integers(schemas["Infill"]["properties"]["template"], max_model_len)


def _sse_event(chunk: str) -> dict:
    """One server-sent event: its `data` is `[DONE]` or JSON, a chunk or (after a failure) the error envelope."""
    return {
        "type": "object",
        "description": SSE_DESCRIPTION.format(name=chunk),
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {
                            "anyOf": [
                                {"$ref": f"#/components/schemas/{chunk}"},
                                {"$ref": "#/components/schemas/ErrorResponse"},
                            ]
                        },
                    },
                ]
            }
        },
    }


def _exact_int64_bounds(node: object) -> None:
    """int64 bounds (seeds) come out of the document's generation as floats, 2**63 instead of 2**63 - 1, one past
    the limit: write them as the exact integers."""
    for schema in _subschemas(node):
        if schema.get("type") == "integer":
            for key, exact in (("maximum", SEED_MAX), ("minimum", SEED_MIN)):
                if isinstance(schema.get(key), float) and abs(schema[key]) >= 2**53:
                    schema[key] = exact
                elif isinstance(schema.get(key), float) and schema[key].is_integer():
                    schema[key] = int(schema[key])


_TRUE = {"const": True}
_NOT_FORCED = [None, "none", "auto"]
_FORCED_TOOL = {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"enum": _NOT_FORCED}}}}
_IGNORE_EOS = {"required": ["ignore_eos"], "properties": {"ignore_eos": {"const": True}}}


def _present(*fields: str) -> dict:
    """JSON Schema for: each of `fields` is in the body and not null."""
    return {"required": list(fields), "properties": {f: {"not": {"type": "null"}} for f in fields}}


def _request_rules(components: dict) -> None:
    """The server's cross-field rules (serving.reject_unsupported) written into the request schemas, so that a
    request the document calls valid is one the server takes. Rules JSON Schema cannot state (t_min <= t_max, a
    named tool among `tools`, a JSON schema or grammar the grammar engine can compile) stay in the descriptions
    and their errors carry their own codes."""
    structured = {"type": "object", "required": ["type"], "properties": {"type": {"not": {"const": "text"}}}}
    json_format = {"required": ["response_format"], "properties": {"response_format": structured}}
    common = [
        {"if": _present("stream_options"), "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}},
        {
            "not": {
                "required": ["response_format", "structured_outputs"],
                "properties": {"response_format": structured, "structured_outputs": {"type": "object"}},
            }
        },
        {"not": _present("infill", "prediction")},
        {"not": _present("infill", "response_format")},
        {"not": _present("infill", "structured_outputs")},
        # A grammar ends at EOS, which ignore_eos would remove.
        {"if": _IGNORE_EOS, "then": {"allOf": [{"not": _present("structured_outputs")}, {"not": json_format}]}},
    ]
    chat = [
        {
            "if": _present("top_logprobs"),
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
        },
        {
            "if": _FORCED_TOOL,
            "then": {
                "required": ["tools"],
                "properties": {"tools": {"type": "array", "minItems": 1}},
                "allOf": [
                    {"not": _present("infill")},
                    {"not": _present("structured_outputs")},
                    {"not": json_format},
                ],
            },
        },
    ]
    chat.append({"if": _IGNORE_EOS, "then": {"not": _FORCED_TOOL}})  # a forced call is a grammar too
    completion = [
        {"not": _present("suffix", "infill")},
        {"not": _present("suffix", "response_format")},
        {"not": _present("suffix", "structured_outputs")},
        {"if": _present("middle_lengths"), "then": _present("suffix")},
    ]
    # structured_outputs: exactly one kind (json_object counts when true); response_format json_schema needs one.
    kinds = [_present(k) for k in ("json", "regex", "choice", "grammar")] + [
        {"required": ["json_object"], "properties": {"json_object": {"const": True}}}
    ]
    components["StructuredOutputs"]["allOf"] = [
        {"anyOf": kinds},
        *({"not": {"allOf": [a, b]}} for i, a in enumerate(kinds) for b in kinds[i + 1 :]),
    ]
    components["ResponseFormat"]["allOf"] = [
        {"if": {"properties": {"type": {"const": "json_schema"}}}, "then": _present("json_schema")}
    ]
    for name, rules in (("ChatCompletionRequest", common + chat), ("CompletionRequest", common + completion)):
        schema = components[name]
        schema["allOf"] = [*schema.get("allOf", []), *rules]
        props = schema["properties"]
        props["logit_bias"] = {"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}],
                               "description": "Not supported: only an empty object or null."}  # fmt: skip
        if "echo" in props:
            props["echo"] = {"anyOf": [{"const": False}, {"type": "null"}], "description": "Not supported."}


def _supported_parts(components: dict) -> None:
    """Audio, file and refusal parts are parsed only to be refused with an error naming them: the document offers
    text and image parts in messages, and text parts alone in a prediction."""
    components.pop("OtherPart", None)

    def is_part_union(schema: dict) -> bool:
        return any(isinstance(o, dict) and o.get("$ref", "").endswith("/OtherPart") for o in schema.get("oneOf", []))

    for schema in _subschemas(components["ChatMessage"]):
        if is_part_union(schema):
            schema["oneOf"] = [o for o in schema["oneOf"] if not o.get("$ref", "").endswith("/OtherPart")]
            mapping = schema.get("discriminator", {}).get("mapping", {})
            for key in [k for k, ref in mapping.items() if ref.endswith("/OtherPart")]:
                del mapping[key]
    for schema in _subschemas(components):
        if is_part_union(schema):
            schema.clear()
            schema.update({"$ref": "#/components/schemas/TextPart"})


def _truthful(doc: dict) -> dict:
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for model in (ErrorResponse, ChatCompletionChunk, CompletionChunk):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = schema
    components["InfillChunk"] = INFILL_CHUNK
    _exact_int64_bounds(components)
    _request_rules(components)
    _supported_parts(components)
    components["Infill"]["properties"]["template"]["items"] = {
        "anyOf": [
            {"type": "string", "description": "Fixed text."},
            {
                "type": "object",
                "description": "A hole: up to N tokens for the model to fill.",
                "required": ["hole"],
                "properties": {"hole": {"type": "integer", "minimum": 1}},
                "additionalProperties": False,
            },
        ]
    }
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if not path.startswith("/v1/") and path != "/infill":
                continue
            for status, description in ERROR_STATUSES.items():
                if method == "get" and status in (400, 408, 413, 500, 504):
                    continue  # GET /v1/models takes no body and runs nothing
                responses[str(status)] = {"description": description, "content": error}
            if path in GENERATION_PATHS:
                name = GENERATION_PATHS[path]
                ok = responses.setdefault("200", {"description": "Successful Response"})
                ok.setdefault("content", {})["text/event-stream"] = {"schema": _sse_event(name)}
    return doc
