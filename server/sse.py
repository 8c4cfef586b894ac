"""Server-sent event payloads: JSON on one line, whatever text it carries."""

from __future__ import annotations

import json

# Unicode line boundaries that JSON leaves raw but line-splitting clients (httpx's iter_lines, str.splitlines)
# break an SSE event on; escaped, a random-token draft cannot split its own event.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dump(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).translate(_LINE_BREAKS)
