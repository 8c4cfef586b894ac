"""Tool calls and reasoning: the Gemma 4 answer parser (units), and an agent loop over HTTP with the SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from server.chat import ChatFormat

FAST = {"denoising_steps": 4}
THINK = {**FAST, "chat_template_kwargs": {"enable_thinking": True}}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                     "unit": {"type": "string", "enum": ["c", "f"]},
                                                     "days": {"type": "integer"}},
                    "required": ["city"]}}},
    {"type": "function", "function": {"name": "lookup_order", "description": "Find an order.",
     "parameters": {"type": "object", "properties": {"order_id": {"type": "integer"}, "verbose": {"type": "boolean"}},
                    "required": ["order_id", "verbose"]}}},
]  # fmt: skip
Q = '<|"|>'


@pytest.fixture(scope="module")
def fmt(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer, "diffusion_gemma")


PROMPT = "<bos><|turn>user\nhi<turn|>\n<|turn>model\n"


def parse_in_pieces(fmt: ChatFormat, text: str, size: int, tools=None) -> tuple[str, str | None, list[dict]]:
    """What a stream of `text` fed `size` characters at a time assembles to."""
    stream = fmt.stream(PROMPT, tools)
    deltas = []
    for i in range(0, len(text), size):
        deltas += stream.feed(text[i : i + size])
    deltas += stream.feed("", final=True)
    content = "".join(d.get("content", "") for d in deltas)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas) or None
    calls: list[dict] = []
    for d in deltas:
        for c in d.get("tool_calls", []):
            if "id" in c:
                calls.append({"name": c["function"]["name"], "arguments": ""})
            calls[c["index"]]["arguments"] += c["function"]["arguments"]
    return content, reasoning, [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls]


ANSWERS = [
    # (model output, content, reasoning, calls)
    ("Plain answer.", "Plain answer.", None, []),
    ("<|channel>thought\nFirst think.<channel|>Then answer.", "Then answer.", "First think.", []),
    (f"<|channel>thought\nNeed weather.<channel|><|tool_call>call:get_weather{{city:{Q}Paris{Q},days:3}}<tool_call|>",
     "", "Need weather.", [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]),
    (f"<|tool_call>call:get_weather{{city:{Q}Oslo{Q}}}<tool_call|><|tool_call>call:lookup_order{{order_id:7,"
     "verbose:true}<tool_call|>", "", None,
     [{"name": "get_weather", "arguments": {"city": "Oslo"}},
      {"name": "lookup_order", "arguments": {"order_id": 7, "verbose": True}}]),
    (f"<|tool_call>call:save{{note:{Q}a {{brace}} and \"quotes\" and <|\"|-ish{Q},nested:{{a:[1,2.5,{{b:null}}]}},"
     "ok:false}<tool_call|>", "", None,
     [{"name": "save", "arguments": {"note": 'a {brace} and "quotes" and <|"|-ish',
                                     "nested": {"a": [1, 2.5, {"b": None}]}, "ok": False}}]),
    # Key-like text inside a string stays text.
    (f"<|tool_call>call:save{{note:{Q}call me later,when:5pm{Q}}}<tool_call|>", "", None,
     [{"name": "save", "arguments": {"note": "call me later,when:5pm"}}]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "content", "reasoning", "calls"), ANSWERS)
@pytest.mark.parametrize("size", [10_000, 7, 1])
def test_parser_reads_gemma4_answers(fmt, text, content, reasoning, calls, size):
    assert parse_in_pieces(fmt, text, size) == (content, reasoning, calls)
    whole = fmt.parse(text, PROMPT, None)
    assert (whole.content, whole.reasoning) == (content, reasoning)
    assert [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
            for c in whole.tool_calls] == calls  # fmt: skip
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in whole.tool_calls)


def test_a_call_split_across_two_canvases(fmt):
    first = "Checking.<|tool_call>call:lookup_order{order_id:"
    second = "42,verbose:false}<tool_call|>"
    stream = fmt.stream(PROMPT, TOOLS)
    deltas = stream.feed(first) + stream.feed(second) + stream.feed("", final=True)
    assert "".join(d.get("content", "") for d in deltas) == "Checking."
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "lookup_order" and "id" in calls[0]
    assert json.loads(calls[1]["function"]["arguments"]) == {"order_id": 42, "verbose": False}


def test_malformed_calls_stay_content_and_special_tokens_never_leak(fmt):
    text = f"Before <|turn>stray <|tool_call>call:oops{{a:{Q}unterminated<tool_call|> after"
    parsed = fmt.parse(text, PROMPT, None)
    assert parsed.tool_calls == []
    assert "<|" not in parsed.content and "|>" not in parsed.content
    assert parsed.content.startswith("Before") and "unterminated" in parsed.content
    content, _, calls = parse_in_pieces(fmt, text, 5)
    assert calls == [] and "<|" not in content and "unterminated" in content


def test_tool_arguments_are_typed_by_the_declared_schema(fmt):
    text = f"<|tool_call>call:lookup_order{{order_id:{Q}17{Q},verbose:true}}<tool_call|>"
    parsed = fmt.parse(text, PROMPT, TOOLS)
    assert json.loads(parsed.tool_calls[0]["function"]["arguments"]) == {"order_id": 17, "verbose": True}


# ----------------------------------------------------------------------------------------------- over HTTP


def prompt_tokens(tokenizer, messages, tools=None, **kwargs) -> int:
    """What a user computes with transformers for the same conversation: the server must bill exactly this."""
    rendered = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]  # fmt: skip
        rendered.append(m)
    text = tokenizer.apply_chat_template(rendered, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_agent_loop_forced_call_tool_result_final_answer(client, tokenizer):
    messages = [{"role": "system", "content": "You are a weather bot."},
                {"role": "user", "content": "What is the weather in Paris?"}]  # fmt: skip
    # 1. A forced call, streamed and assembled by the SDK's stream helper.
    with client.chat.completions.stream(model="tiny-random", messages=messages, tools=TOOLS, tool_choice="required",
                                        seed=1, max_tokens=160, extra_body=FAST,
                                        stream_options={"include_usage": True}) as stream:  # fmt: skip
        for _ in stream:
            pass
        first = stream.get_final_completion()
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name in ("get_weather", "lookup_order")
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert args["city"] in ("Paris", "Oslo")
    assert first.usage.prompt_tokens == prompt_tokens(tokenizer, messages, TOOLS)
    # The same request, not streamed, gives the same call (same seed).
    again = client.chat.completions.create(model="tiny-random", messages=messages, tools=TOOLS, tool_choice="required",
                                           seed=1, max_tokens=160, extra_body=FAST)  # fmt: skip
    assert again.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    assert again.usage.completion_tokens == first.usage.completion_tokens
    # 2. The tool's result goes back; the model answers (free text on this random model).
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function",
          "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})},
    ]  # fmt: skip
    final = client.chat.completions.create(model="tiny-random", messages=messages, tools=TOOLS, tool_choice="none",
                                           seed=2, max_tokens=40, extra_body=FAST)  # fmt: skip
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.usage.prompt_tokens == prompt_tokens(tokenizer, messages)  # tool_choice none: no declarations
    assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens


def test_named_tool_choice_and_no_parallel_calls(client):
    named = {"type": "function", "function": {"name": "lookup_order"}}
    for seed in range(3):
        r = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "order?"}],
                                           tools=TOOLS, tool_choice=named, parallel_tool_calls=False, seed=seed,
                                           max_tokens=64, extra_body=FAST)  # fmt: skip
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        args = json.loads(calls[0].function.arguments)
        assert calls[0].function.name == "lookup_order" and isinstance(args["order_id"], int)
        assert isinstance(args["verbose"], bool)


def test_auto_answers_never_leak_special_tokens(client, tokenizer):
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    for seed in range(4):
        for stream in (False, True):
            kwargs = dict(model="tiny-random", messages=[{"role": "user", "content": "hello"}], tools=TOOLS,
                          seed=seed, max_tokens=96, extra_body=FAST)  # fmt: skip
            if stream:
                parts = [c.delta.content or "" for ch in client.chat.completions.create(**kwargs, stream=True)
                         for c in ch.choices]  # fmt: skip
                content = "".join(parts)
            else:
                content = client.chat.completions.create(**kwargs).choices[0].message.content or ""
            assert not any(s in content for s in specials), content


def test_thinking_switch_reaches_the_template(client, tokenizer):
    messages = [{"role": "user", "content": "think first"}]
    r = client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=8, seed=0, extra_body=THINK)
    assert r.usage.prompt_tokens == prompt_tokens(tokenizer, messages, enable_thinking=True)
    assert r.usage.prompt_tokens != prompt_tokens(tokenizer, messages)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400s(server, extra, param):
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **extra}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tool_arguments_that_are_not_json_are_sent_as_text(server, tokenizer):
    """OpenAI takes any string as an earlier call's arguments; the template writes one that is not a JSON object
    as the text it is (an object is written in Gemma's call syntax)."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]  # fmt: skip
    body = {"model": "tiny-random", "messages": messages, "max_tokens": 4, "denoising_steps": 2}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    rendered = tokenizer.apply_chat_template(
        [messages[0], {**messages[1], "tool_calls": [{**call, "function": {"name": "f", "arguments": "{not json"}}]},
         messages[2]], add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert "<|tool_call>call:f{not json<tool_call|>" in rendered
    assert r.json()["usage"]["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_conversation_ending_in_calls_with_non_object_arguments_is_answered(server, stream):
    """The answer parser reads the prompt before the answer; calls it could not read back (arguments `0` or
    not JSON, which the template writes as they are) once broke the stream after its first chunk (found by the
    long fuzz run). The answer now comes whole, streamed or not."""
    calls = [{"id": "", "type": "function", "function": {"name": "", "arguments": args}} for args in ("", "0", "[")]
    body = {"model": "tiny-random", "messages": [{"role": "assistant", "content": None, "tool_calls": calls}],
            "max_tokens": 8, "denoising_steps": 2, "stream": stream}  # fmt: skip
    if not stream:
        r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks[-1]
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


def test_sdk_types_reasoning_fields(client):
    # Whatever the random model writes, the message has both reasoning names or neither.
    r = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "x"}], max_tokens=32,
                                       seed=3, extra_body=THINK)  # fmt: skip
    extra = r.choices[0].message.model_extra or {}
    assert extra.get("reasoning") == extra.get("reasoning_content")
    assert isinstance(r, openai.types.chat.ChatCompletion)
