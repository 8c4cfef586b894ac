"""Schemathesis hooks for fuzzing Press (`make fuzz` and tests/test_fuzz.py).

Only two things are adjusted, both because the document cannot say them:
- a schema-valid `model` string is replaced by the served model's name (any other name is a correct 404);
- a schema-valid request refused with `context_length_exceeded` is not a failure: whether prompt plus
  `max_tokens` fit the context depends on how the prompt tokenizes, which no JSON schema can express.
"""

from __future__ import annotations

import os

import schemathesis

MODEL = os.environ.get("PRESS_FUZZ_MODEL", "tiny-random")


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = MODEL
    return body


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure except a context-length refusal of a schema-valid request."""
    if response is not None and response.status_code == 400:
        try:
            code = response.json()["error"]["code"]
        except Exception:
            return True
        return code != "context_length_exceeded"
    return True
