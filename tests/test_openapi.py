"""/openapi.json says what the server does: the statuses and bodies it really sends, streams as text/event-stream,
bounds that match the validation, and the loaded model's limits."""

from __future__ import annotations

import httpx
import pytest

GENERATION = ("/v1/chat/completions", "/v1/completions", "/infill")


def _doc(server) -> dict:
    return httpx.get(server.base_url + "/openapi.json", timeout=30).json()


def test_no_422_and_errors_in_the_openai_envelope(server):
    doc = _doc(server)
    assert "422" not in str(doc["paths"]) and "HTTPValidationError" not in doc["components"]["schemas"]
    for path in GENERATION:
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "500", "503", "504"} <= set(responses)
        error = {"$ref": "#/components/schemas/ErrorResponse"}
        for status, response in responses.items():
            if status != "200":
                assert response["content"]["application/json"]["schema"] == error


def test_streams_are_documented_as_server_sent_events(server):
    doc = _doc(server)
    for path, chunk in zip(GENERATION, ("ChatCompletionChunk", "CompletionChunk", "InfillChunk"), strict=True):
        sse = doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        data = sse["properties"]["data"]["anyOf"]
        assert {"const": "[DONE]"} in data
        refs = [o["$ref"] for o in data[1]["contentSchema"]["anyOf"]]
        assert refs == [f"#/components/schemas/{chunk}", "#/components/schemas/ErrorResponse"]
        assert chunk in doc["components"]["schemas"]


def test_types_and_bounds_match_validation(server):
    doc = _doc(server)
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    seed = next(o for o in chat["seed"]["anyOf"] if o.get("type") == "integer")
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**63 - 1)  # exact int64, not a rounded float
    assert next(o for o in chat["confidence_threshold"]["anyOf"] if o.get("type") == "number") == {
        "type": "number", "exclusiveMinimum": 0.0}  # fmt: skip
    # The loaded model's limits: token ids under its vocabulary, answers within its context.
    models = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]
    prompt = str(schemas["CompletionRequest"]["properties"]["prompt"])
    assert "'maximum': 1023" in prompt and "'minimum': 0" in prompt  # tiny-random's vocabulary is 1024
    max_tokens = next(o for o in chat["max_tokens"]["anyOf"] if o.get("type") == "integer")
    assert max_tokens["maximum"] == models["max_model_len"]
    # Cross-field rules the server enforces are in the document.
    assert {"if": {"required": ["stream_options"], "properties": {"stream_options": {"not": {"type": "null"}}}},
            "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}} in schemas[
        "ChatCompletionRequest"]["allOf"]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "valid"),
    [
        ({}, True),
        ({"response_format": {"type": "text"}}, True),
        ({"response_format": {"type": "json_object"}}, False),
        ({"structured_outputs": {"regex": "a+"}}, False),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, False),
    ],
)  # fmt: skip
def test_the_document_refuses_what_the_server_refuses_ignore_eos_with_a_grammar(server, extra, valid):
    """A grammar ends at EOS, so `ignore_eos` cannot take one; the document says so (found by the long fuzz run)."""
    import jsonschema

    doc = _doc(server)
    schema = {"$ref": "#/components/schemas/ChatCompletionRequest", "components": doc["components"]}
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "denoising_steps": 2, "ignore_eos": True, **extra}  # fmt: skip
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(body))
    assert (not errors) == valid, errors
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert (r.status_code == 200) == valid, r.text


def test_messages_offer_text_and_image_parts_and_predictions_text_only(server):
    schemas = _doc(server)["components"]["schemas"]
    parts = schemas["ChatMessage"]["properties"]["content"]["anyOf"][1]["items"]
    assert [o["$ref"].rsplit("/", 1)[1] for o in parts["oneOf"]] == ["TextPart", "ImagePart"]
    assert set(parts["discriminator"]["mapping"]) == {"text", "image_url"}
    assert schemas["ImagePart"]["properties"]["image_url"] == {"$ref": "#/components/schemas/ImageURL"}
    assert schemas["Prediction"]["properties"]["content"]["anyOf"][1]["items"] == {
        "$ref": "#/components/schemas/TextPart"
    }
    assert "OtherPart" not in schemas
