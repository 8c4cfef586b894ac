"""`tool_choice: "required"` or a named function: the answer constrained to Gemma 4 tool calls.

The grammar (Lark, as llguidance reads it) is `<|tool_call>call:NAME{args}<tool_call|>`, once or (with
`parallel_tool_calls`) several times, NAME one of the allowed functions, and `args` written in Gemma 4's value
syntax: unquoted keys, strings between `<|"|>` tokens, bare numbers, booleans and null, `{...}` and `[...]`.
Gemma's value syntax is not JSON, so no JSON-schema compiler applies; the arguments follow the function's
`parameters` where they are plain (properties in declared order with the required ones present, enums,
strings, integers, numbers, booleans, null, arrays, nested objects) and any Gemma value elsewhere. The engine
reads every canvas under it (engine/grammar.py), so the call is well formed whatever the weights.
"""

from __future__ import annotations

import json

from server.errors import bad_request
from server.protocol import ChatCompletionRequest

MARKERS = ("<|tool_call>", "<tool_call|>", '<|"|>')
MAX_DEPTH = 4


class _Rules:
    def __init__(self, quote: int) -> None:
        self.q = f"<[{quote}]>"
        self.rules: dict[str, str] = {}

    def add(self, name: str, body: str) -> str:
        self.rules[name] = body
        return name

    def string_literal(self, text: str) -> str:
        return f"{self.q} {json.dumps(text)} {self.q}"

    def value(self, schema: object, name: str, depth: int = 0) -> str:
        """A rule for a value following `schema` (any Gemma value where the schema is not plain)."""
        if not isinstance(schema, dict) or depth > MAX_DEPTH:
            return "value"
        if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
            alternatives = [self.literal(v) for v in schema["enum"]]
            if all(a is not None for a in alternatives):
                return self.add(name, " | ".join(alternatives))
        kind = schema.get("type")
        if kind == "string":
            return "string"
        if kind == "integer":
            return "INT"
        if kind == "number":
            return "NUMBER"
        if kind == "boolean":
            return "BOOL"
        if kind == "null":
            return '"null"'
        if kind == "array":
            item = self.value(schema.get("items"), f"{name}_item", depth + 1)
            return self.add(name, f'"[" [{item} ("," {item})*] "]"')
        if kind == "object":
            return self.add(name, self.object_body(schema, name, depth))
        return "value"

    def object_body(self, schema: dict, name: str, depth: int) -> str:
        """`{...}` with the schema's properties in declared order, the required ones always present. Built back
        to front: `first_k` is what may follow when nothing was written yet, `more_k` when something was (so
        it starts with a comma); None stands for nothing at all."""
        props = schema.get("properties") or {}
        if not props or not all(k.isidentifier() for k in props):
            return "object"
        required = set(schema.get("required") or [])
        first: str | None = None
        more: str | None = None
        for i, (key, sub) in reversed(list(enumerate(props.items()))):
            pair = f'"{key}:" {self.value(sub, f"{name}_{i}", depth + 1)}'
            with_pair = _seq(pair, more)
            after_comma = _seq('","', with_pair)
            if key in required:
                new_first, new_more = with_pair, after_comma
            else:
                new_first = _alt(with_pair, first)
                new_more = _alt(after_comma, more)
            first = self.add(f"{name}_f{i}", new_first) if new_first else None
            more = self.add(f"{name}_m{i}", new_more) if new_more else None
        return _seq('"{"', _seq(first, '"}"'))

    def literal(self, value: object) -> str | None:
        if isinstance(value, str):
            return self.string_literal(value)
        if isinstance(value, bool):
            return '"true"' if value else '"false"'
        if value is None:
            return '"null"'
        if isinstance(value, int | float):
            return json.dumps(json.dumps(value))
        return None


def _seq(a: str | None, b: str | None) -> str | None:
    return b if a is None else a if b is None else f"{a} {b}"


def _alt(a: str, b: str | None) -> str:
    return f"[{a}]" if b is None else f"({a}) | ({b})"


def tool_call_grammar(req: ChatCompletionRequest, tokenizer) -> str | None:
    """The Lark grammar that forces the answer to be tool calls, or None when the request does not force one."""
    choice = req.tool_choice
    if choice in (None, "none", "auto"):
        return None
    ids = [tokenizer.convert_tokens_to_ids(m) for m in MARKERS]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise bad_request(
            "This model's tokenizer has no Gemma 4 tool-call tokens, so a tool call cannot be forced.",
            param="tool_choice",
        )
    open_id, close_id, quote_id = ids
    tools = [t.function for t in req.tools or []]
    if not isinstance(choice, str):
        tools = [f for f in tools if f.name == choice.function.name]
    rules = _Rules(quote_id)
    calls = []
    for i, fn in enumerate(tools):
        params = fn.parameters if isinstance(fn.parameters, dict) else {}
        args = rules.add(f"args_{i}", rules.object_body(params, f"args_{i}", 0))
        calls.append(f'"call:{fn.name}" {args}')
    several = req.parallel_tool_calls and isinstance(choice, str)
    lines = [
        f"start: call{'+' if several else ''}",
        f"call: <[{open_id}]> ({' | '.join(calls)}) <[{close_id}]>",
        *(f"{name}: {body}" for name, body in rules.rules.items()),
        'object: "{" [pair ("," pair)*] "}"',
        'pair: KEY ":" value',
        'value: string | INT | NUMBER | BOOL | "null" | object | "[" [value ("," value)*] "]"',
        f"string: {rules.q} TEXT {rules.q}",
        "KEY: /[A-Za-z_][A-Za-z0-9_]*/",
        "TEXT: /[^<]*/",
        "INT: /-?(0|[1-9][0-9]{0,17})/",
        "NUMBER: /-?(0|[1-9][0-9]{0,17})(\\.[0-9]{1,17})?/",
        'BOOL: "true" | "false"',
    ]
    return "\n".join(lines)
