"""Structured outputs: OpenAI's `response_format` and vLLM's `structured_outputs`, turned into a grammar.

The translation is the only thing done here: llguidance compiles JSON schemas, regexes, choices and Lark/GBNF
grammars, and the engine reads every canvas under the result (engine/grammar.py). Anything the grammar engine
rejects or cannot honour becomes a 400 naming the request field, never an unconstrained answer.

JSON is generated in one fixed layout, `{"key": value, "key": value}` (llguidance's separators with flexible
whitespace off): a diffusion canvas spends no passes on indentation, the grammar forces more positions, and a
weak model cannot wander into endless whitespace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llguidance import LLMatcher, grammar_from

from engine.engine import LLMEngine
from engine.grammar import GrammarError
from server.errors import bad_request
from server.protocol import ChatCompletionRequest, DiffusionParams
from server.tool_grammar import tool_call_grammar

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class GrammarSource:
    grammar: str  # llguidance's grammar text
    param: str  # the request field it came from, named in errors
    what: str  # "JSON schema", "regex", ... for messages


def _json_schema(schema: object, param: str) -> GrammarSource:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise bad_request(
                f"The JSON schema is not valid JSON: {exc}", param=param, code="invalid_json_schema"
            ) from exc
    if not isinstance(schema, dict):
        raise bad_request("The JSON schema must be a JSON object.", param=param, code="invalid_json_schema")
    try:
        return GrammarSource(LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT), param, "JSON schema")
    except ValueError as exc:
        raise bad_request(f"The JSON schema cannot be used: {exc}", param=param, code="invalid_json_schema") from exc


def grammar_source(req: DiffusionParams) -> GrammarSource | None:
    """What the request asks its output to follow, or None for free text."""
    fmt, so = req.response_format, req.structured_outputs
    if fmt is not None and fmt.type != "text" and so is not None:
        raise bad_request(
            "Give either 'response_format' or 'structured_outputs', not both.", param="structured_outputs"
        )
    if fmt is not None and fmt.type == "json_object":
        return _json_schema(ANY_JSON_OBJECT, "response_format")
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise bad_request(
                "Missing required parameter: 'response_format.json_schema'.", param="response_format.json_schema"
            )
        # OpenAI makes `schema` optional: without one, any JSON object.
        schema = ANY_JSON_OBJECT if fmt.json_schema.schema_ is None else fmt.json_schema.schema_
        return _json_schema(schema, "response_format.json_schema.schema")
    if so is None:
        return None
    given = [
        name
        for name, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice), ("grammar", so.grammar))
        if value is not None
    ]
    if so.json_object:
        given.append("json_object")
    if len(given) != 1:
        raise bad_request(
            "Give exactly one of 'json', 'regex', 'choice', 'grammar' or 'json_object' "
            f"(got {', '.join(given) or 'none'}).",
            param="structured_outputs",
        )
    kind = given[0]
    param = f"structured_outputs.{kind}"
    if kind == "json":
        return _json_schema(so.json_, param)
    if kind == "json_object":
        return _json_schema(ANY_JSON_OBJECT, param)
    if kind == "regex":
        return GrammarSource(LLMatcher.grammar_from_regex(so.regex), param, "regex")
    if kind == "choice":
        return GrammarSource(grammar_from("choice", so.choice), param, "choice")
    try:  # Lark as llguidance reads it; a GBNF grammar (llama.cpp) is converted to Lark first
        return GrammarSource(grammar_from("grammar", so.grammar), param, "grammar")
    except ValueError as exc:
        raise bad_request(f"The grammar cannot be used: {exc}", param=param, code="invalid_grammar") from exc


def compile_request(engine: LLMEngine, req: DiffusionParams):
    """The request's grammar matcher (llguidance), or None. Runs in a worker thread: building a grammar can
    take long for a complex schema, and neither the event loop nor the engine thread may wait for it."""
    source = grammar_source(req)
    if isinstance(req, ChatCompletionRequest):
        tools = tool_call_grammar(req, engine.tokenizer)
        if tools is not None and source is not None:
            raise bad_request(
                "A forced tool call ('tool_choice') cannot be combined with a structured output format.",
                param="tool_choice",
            )
        if tools is not None:
            source = GrammarSource(LLMatcher.grammar_from_lark(tools), "tool_choice", "tool-call grammar")
    if source is None:
        return None
    try:
        return engine.compile_grammar(source.grammar)
    except GrammarError as exc:
        raise bad_request(
            f"The {source.what} cannot be used: {exc}", param=source.param, code="invalid_grammar"
        ) from exc
