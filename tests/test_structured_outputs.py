"""Structured outputs over HTTP: the random-weight model's answers validate, so only the grammar can make them.

Real server, official openai SDK. Every answer that ends with `stop` must parse and validate (jsonschema);
answers cut by max_tokens end with `length`. Bad or unsupported schemas are 400s naming the field.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

FAST = {"denoising_steps": 4}
SEEDS = (0, 1, 2)
MESSAGES = [{"role": "user", "content": "Fill in the form."}]


def obj(properties: dict, required: list[str] | None = None) -> dict:
    """A closed object: every listed property required unless said otherwise, nothing else allowed."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


SHORT = {"type": "string", "maxLength": 6}
# fmt: off
SCHEMAS: dict[str, dict] = {
    "flat": obj({"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "nested": obj({"user": obj({"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                "profile": obj({"nick": SHORT, "verified": {"type": "boolean"}})})}),
    "int_array": obj({"xs": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
                             "minItems": 2, "maxItems": 4}}),
    "enum": obj({"color": {"enum": ["red", "green", "blue"]}}),
    "number_range": obj({"score": {"type": "number", "minimum": 0, "maximum": 1}}),
    "boolean": {"type": "boolean"},
    "nullable": obj({"note": {"type": ["string", "null"], "maxLength": 4}}),
    "optional": obj({"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": SHORT}, required=["a"]),
    "pattern": obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    "any_of": obj({"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, SHORT, {"type": "boolean"}]}}),
    "object_array": obj({"items": {"type": "array", "minItems": 1, "maxItems": 3,
                                   "items": obj({"k": {"enum": ["x", "y"]},
                                                 "v": {"type": "integer", "minimum": 0, "maximum": 99}})}}),
    "top_enum": {"enum": ["yes", "no", "maybe"]},
    "const": obj({"version": {"const": 2}, "kind": {"const": "report"}}),
    "exclusive": obj({"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5}}),
    "nested_arrays": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2,
                                                                  "items": {"type": "boolean"}}},
    "refs": {"$defs": {"pt": obj({"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                  "y": {"type": "integer", "minimum": -9, "maximum": 9}})},
             **obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})},
    "string_lengths": obj({"s": {"type": "string", "minLength": 2, "maxLength": 4}}),
    "one_of_disjoint": obj({"v": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]}}),
    "many_fields": obj({"id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"},
                        "tier": {"enum": ["gold", "silver"]}, "ratio": {"type": "number", "minimum": -1, "maximum": 1},
                        "tag": SHORT, "none": {"type": "null"}}),
    "tags": obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}),
    "deep": obj({"l1": obj({"l2": obj({"l3": obj({"leaf": {"type": "integer", "minimum": 0, "maximum": 3}})})})}),
    "all_of": {"allOf": [obj({"a": {"type": "integer", "minimum": 0, "maximum": 5}}), {"required": ["a"]}]},
    "prefix_items": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                      {"type": "boolean"}], "items": False, "minItems": 2},
}
# fmt: on


def body(schema: dict, seed: int, **extra) -> dict:
    return {
        "model": "tiny-random",
        "messages": MESSAGES,
        "seed": seed,
        "max_tokens": 256,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        **FAST,
        **extra,
    }


SDK_FIELDS = ("model", "messages", "seed", "max_tokens", "response_format")


def sdk_kwargs(b: dict) -> dict:
    """A raw request body as openai SDK arguments: Press's extensions travel in extra_body."""
    return {**{k: b[k] for k in SDK_FIELDS}, "extra_body": {k: v for k, v in b.items() if k not in SDK_FIELDS}}


async def ask_all(aclient: openai.AsyncOpenAI, stream: bool) -> list[tuple[str, dict, str, str]]:
    """Every schema x seed at once (the server batches them); (name, schema, finish_reason, content)."""
    sem = asyncio.Semaphore(8)

    async def one(name: str, schema: dict, seed: int):
        kwargs = sdk_kwargs(body(schema, seed))
        async with sem:
            if not stream:
                r = await aclient.chat.completions.create(**kwargs)
                return name, schema, r.choices[0].finish_reason, r.choices[0].message.content
            parts, finish = [], None
            async for chunk in await aclient.chat.completions.create(**kwargs, stream=True):
                for c in chunk.choices:
                    parts.append(c.delta.content or "")
                    finish = c.finish_reason or finish
            return name, schema, finish, "".join(parts)

    return await asyncio.gather(*(one(n, s, seed) for n, s in SCHEMAS.items() for seed in SEEDS))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_every_stop_answer_validates(aclient, stream):
    results = asyncio.run(ask_all(aclient, stream))
    stops = [r for r in results if r[2] == "stop"]
    for name, schema, _, content in stops:
        try:
            jsonschema.validate(json.loads(content), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            pytest.fail(f"schema {name!r}: {content!r} does not validate: {exc}")
    assert all(r[2] in ("stop", "length") for r in results)
    # The schemas are bounded, so nearly every answer completes: the check above is not vacuous.
    assert len(stops) >= 0.9 * len(results), [(r[0], r[2], r[3][:60]) for r in results if r[2] != "stop"]
    assert len(SCHEMAS) >= 20


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


class Owner(BaseModel):
    name: str = Field(max_length=8)
    pets: list[Pet] = Field(max_length=2)
    verified: bool


def test_sdk_parse_returns_the_pydantic_object(client):
    r = client.chat.completions.parse(
        model="tiny-random", messages=MESSAGES, response_format=Owner, seed=4, max_tokens=256, extra_body=FAST
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Owner)
    assert choice.message.parsed == Owner.model_validate_json(choice.message.content)


def test_too_few_tokens_for_the_schema_end_with_length(client):
    schema = SCHEMAS["many_fields"]
    r = client.chat.completions.create(**sdk_kwargs(body(schema, seed=0, max_tokens=8)))
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="tiny-random", messages=MESSAGES, response_format=Owner, seed=0,
                                      max_tokens=6, extra_body=FAST)  # fmt: skip


@pytest.mark.parametrize("seed", SEEDS)
def test_regex_choice_grammar_and_json_object(client, seed):
    def ask(**extra) -> tuple[str, str]:
        r = client.chat.completions.create(model="tiny-random", messages=MESSAGES, seed=seed, max_tokens=64,
                                           extra_body={**FAST, **extra})  # fmt: skip
        return r.choices[0].finish_reason, r.choices[0].message.content

    finish, text = ask(structured_outputs={"regex": r"[0-9]{3}-[a-z]{2,4}"})
    assert finish == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
    choices = ["refund", "exchange", "talk to a human"]
    finish, text = ask(structured_outputs={"choice": choices})
    assert finish == "stop" and text in choices
    lark = 'start: "order " ID " is " STATUS\nID: /[0-9]{4}/\nSTATUS: "open" | "shipped" | "lost"'
    finish, text = ask(structured_outputs={"grammar": lark})
    assert finish == "stop" and re.fullmatch(r"order [0-9]{4} is (open|shipped|lost)", text), text
    finish, text = ask(structured_outputs={"grammar": 'root ::= "v" [0-9] "." [0-9]'})  # GBNF
    assert finish == "stop" and re.fullmatch(r"v[0-9]\.[0-9]", text), text
    r = client.chat.completions.create(model="tiny-random", messages=MESSAGES, seed=seed, max_tokens=256,
                                       response_format={"type": "json_object"}, extra_body=FAST)  # fmt: skip
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_completions_endpoint_takes_both_spellings(client):
    schema = SCHEMAS["flat"]
    r = client.completions.create(model="tiny-random", prompt="Person:", seed=1, max_tokens=128,
                                  extra_body={**FAST, "response_format": {"type": "json_schema",
                                              "json_schema": {"name": "p", "schema": schema}}})  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    r = client.completions.create(model="tiny-random", prompt="Person:", seed=1, max_tokens=128, n=2,
                                  extra_body={**FAST, "structured_outputs": {"json": json.dumps(schema)}})  # fmt: skip
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), schema)


def test_streamed_drafts_show_constrained_text(server):
    choices = ["alpha beta", "gamma"]
    b = {"model": "tiny-random", "messages": MESSAGES, "seed": 5, "max_tokens": 32, "stream": True,
         "structured_outputs": {"choice": choices}, **FAST}  # fmt: skip
    drafts, content = [], []
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=b, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    if "draft" in c:
                        drafts.append(c["draft"]["text"])
                    content.append(c["delta"].get("content") or "")
    assert drafts and all(d in choices for d in drafts), drafts
    assert "".join(content) in choices


# fmt: off
BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array",
      "uniqueItems": True}}}}, "response_format.json_schema.schema", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format.json_schema.schema", "wat"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"oneOf": [
      {"type": "integer"}, {"type": "number"}]}}}}, "response_format.json_schema.schema", "oneOf"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
    ({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs.regex", "regex"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs.grammar", "nowhere"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "choice"),
    ({"structured_outputs": {"json": "{oops"}}, "structured_outputs.json", "JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
]
# fmt: on


@pytest.mark.parametrize(("extra", "param", "mentions"), BAD)
def test_bad_and_unsupported_constraints_are_400s(server, extra, param, mentions):
    for path, base in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})):
        r = httpx.post(server.base_url + path, json={"model": "tiny-random", "max_tokens": 8, **base, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error"
        assert mentions in err["message"]
    assert httpx.get(server.base_url + "/health").json()["status"] == "ok"
