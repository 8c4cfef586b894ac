"""Schemathesis hooks for fuzzing Press (`make fuzz` and tests/test_fuzz.py).

Only what the document cannot say is adjusted:
- a schema-valid `model` string is replaced by the served model's name (any other name is a correct 404);
- a schema-valid request refused for a reason no JSON schema can express is not a failure. Each such refusal has
  its own error code (SEMANTIC), so nothing else is excused;
- a request that ran past the server's request_timeout is a documented 504, not a server error, and a full queue
  a documented 503 `server_overloaded` with Retry-After (requests cut by the short fuzz timeout leave the queue
  at the next pass).
"""

from __future__ import annotations

import os

import schemathesis

MODEL = os.environ.get("PRESS_FUZZ_MODEL", "tiny-random")
SEMANTIC = {
    "context_length_exceeded",  # prompt + max_tokens against the context: depends on how the prompt tokenizes
    "invalid_schedule",  # t_min above t_max, which may come from the checkpoint's defaults
    "template_too_long",  # max_tokens under an infill template's length
    "unknown_tool",  # a named tool_choice missing from `tools`
    "invalid_json_schema",  # a JSON schema the grammar engine cannot compile
    "invalid_grammar",  # a regex or grammar it cannot compile
    "invalid_messages",  # messages in an order the chat template refuses
    "too_many_choices",  # prompts x n over 64: a product of two fields
}


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = MODEL
    return body


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure except the refusals and timeouts above."""
    if response is None or response.status_code not in (400, 503, 504):
        return True
    try:
        code = response.json()["error"]["code"]
    except Exception:
        return True
    return code not in SEMANTIC and code not in ("request_timeout", "server_overloaded")
