"""Validate responses against the official OpenAI schemas (a subset of openai/openai-openapi).

The schema file lives outside the repository (../shared/openai-schemas.json, or $PRESS_OPENAI_SCHEMAS);
when it is absent the schema checks are skipped and everything else still runs.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path


@cache
def _root() -> dict | None:
    candidates = [os.environ.get("PRESS_OPENAI_SCHEMAS", "")]
    candidates.append(str(Path(__file__).resolve().parents[2] / "shared" / "openai-schemas.json"))
    for c in candidates:
        if c and Path(c).is_file():
            return json.loads(Path(c).read_text())
    return None


def have_schemas() -> bool:
    return _root() is not None


def validate(obj: dict, name: str) -> None:
    import jsonschema

    root = _root()
    if root is None:  # checked by tests/test_conformance.py, which skips visibly
        return
    schema = {**root, "$ref": f"#/components/schemas/{name}"}
    jsonschema.Draft202012Validator(schema).validate(obj)
