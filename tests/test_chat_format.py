"""tiny-random speaks Gemma 4's chat format (DiffusionGemma's): the chat template renders conversations with
reasoning, tool declarations, tool calls and tool results exactly as the format defines them, every control token
is one id, and the shipped response template parses a model answer back into reasoning, content and typed tool
calls, whole or streamed. The sources of the format are in engine/assets/tiny_tokenizer/chat_template.jinja."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer
from transformers.utils.chat_parsing import ResponseParser, parse_response

from engine import tiny_random
from engine.tiny_random import _ASSETS

Q = '<|"|>'  # Gemma 4's string delimiter, one token

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search notes.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {
                    "type": "object",
                    "properties": {
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "limit": {"type": "integer"},
                    },
                },
                "exact": {"type": "boolean", "nullable": True},
            },
            "required": ["query"],
        },
    },
}
WEATHER_DECL = (
    f"<|tool>declaration:get_weather{{description:{Q}Current weather in a city.{Q},parameters:{{properties:{{"
    f"city:{{description:{Q}City name{Q},type:{Q}STRING{Q}}},"
    f"unit:{{enum:[{Q}celsius{Q},{Q}fahrenheit{Q}],type:{Q}STRING{Q}}}}},"
    f"required:[{Q}city{Q}],type:{Q}OBJECT{Q}}}}}<tool|>"
)
SEARCH_DECL = (
    f"<|tool>declaration:search{{description:{Q}Search notes.{Q},parameters:{{properties:{{"
    f"query:{{type:{Q}STRING{Q}}},"
    f"filters:{{properties:{{tags:{{items:{{type:{Q}STRING{Q}}},type:{Q}ARRAY{Q}}},limit:{{type:{Q}INTEGER{Q}}}}},"
    f"type:{Q}OBJECT{Q}}},"
    f"exact:{{nullable:true,type:{Q}BOOLEAN{Q}}}}},"
    f"required:[{Q}query{Q}],type:{Q}OBJECT{Q}}}}}<tool|>"
)
# Two calls in one answer; string arguments with braces and quotes in them, nested objects, lists, numbers, booleans.
TRICKY = 'a {"b": [1, 2]} } { "c'
CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    },
    {
        "id": "call_2",
        "type": "function",
        "function": {
            "name": "search",
            "arguments": {
                "query": TRICKY,
                "filters": {"tags": ["x", "y z"], "limit": 42, "nested": {"a": 1, "b": [True, None, 2.5]}},
                "exact": False,
                "list": [1, 2],
            },
        },
    },
]
CALLS_TEXT = (
    f"<|tool_call>call:get_weather{{city:{Q}Paris{Q},unit:{Q}celsius{Q}}}<tool_call|>"
    f"<|tool_call>call:search{{query:{Q}{TRICKY}{Q},"
    f"filters:{{tags:[{Q}x{Q},{Q}y z{Q}],limit:42,nested:{{a:1,b:[true,null,2.5]}}}},exact:false,list:[1,2]}}"
    "<tool_call|>"
)
NO_THINKING = "<|channel>thought\n<channel|>"  # what the generation prompt ends in with thinking off


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(_ASSETS)


def render(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------- tokenizer


SPECIAL = {
    "<pad>": tiny_random.PAD,
    "<eos>": tiny_random.EOS,
    "<bos>": tiny_random.BOS,
    "<unk>": tiny_random.UNK,
    "<|turn>": tiny_random.START_OF_TURN,
    "<turn|>": tiny_random.END_OF_TURN,
    "<|think|>": tiny_random.THINK,
    "<|channel>": tiny_random.CHANNEL_START,
    "<channel|>": tiny_random.CHANNEL_END,
    "<|tool>": tiny_random.TOOL_START,
    "<tool|>": tiny_random.TOOL_END,
    "<|tool_call>": tiny_random.TOOL_CALL_START,
    "<tool_call|>": tiny_random.TOOL_CALL_END,
    "<|tool_response>": tiny_random.TOOL_RESPONSE_START,
    "<tool_response|>": tiny_random.TOOL_RESPONSE_END,
    Q: tiny_random.STRING_DELIM,
    "<|image|>": tiny_random.IMAGE,
    "<|image>": tiny_random.BOI,
    "<image|>": tiny_random.EOI,
}


def test_control_tokens_are_single_special_ids(tok):
    for text, token_id in SPECIAL.items():
        assert ids(tok, text) == [token_id], text
        assert ids(tok, f"x{text}y")[1:-1] == [token_id], text  # never merged with their neighbours
        assert tok.convert_ids_to_tokens(token_id) == text
    assert set(SPECIAL.values()) <= set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    assert all(tok.added_tokens_decoder[i].special for i in SPECIAL.values())
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    # The BPE around them is still a real one, and the model's embedding covers the whole vocabulary.
    assert len(ids(tok, "Return the list of values")) < len("Return the list of values") / 2
    assert len(tok) == tiny_random.tiny_config_kwargs()["text_config"]["vocab_size"] == 1024


def test_checkpoint_ships_the_format_and_stops_like_diffusiongemma(tiny_path):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    assert tok.response_template == AutoTokenizer.from_pretrained(_ASSETS).response_template
    assert tok.chat_template and "<|tool_call>call:" in tok.chat_template
    gen = json.loads((tiny_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(["<eos>", "<turn|>", "<|tool_response>"])
    assert gen["eos_token_id"] == tiny_random.EOS_TOKEN_IDS


# ------------------------------------------------------------------------------------------- template


def test_system_and_user(tok):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello."}]
    assert render(tok, messages, add_generation_prompt=True) == (
        "<bos><|turn>system\nYou are terse.<turn|>\n<|turn>user\nHello.<turn|>\n<|turn>model\n" + NO_THINKING
    )
    assert render(tok, messages[1:]) == "<bos><|turn>user\nHello.<turn|>\n"


def test_developer_renders_as_system_and_text_parts_join(tok):
    messages = [
        {"role": "developer", "content": " Answer in French. "},
        {"role": "user", "content": [{"type": "text", "text": "Hello."}, {"type": "text", "text": "Who are you?"}]},
        {"role": "assistant", "content": "Bonjour."},
        {"role": "system", "content": "Now in German."},
        {"role": "user", "content": "Again?"},
    ]
    assert render(tok, messages, add_generation_prompt=True) == (
        "<bos><|turn>system\nAnswer in French.<turn|>\n"
        "<|turn>user\nHello.\nWho are you?<turn|>\n"
        "<|turn>model\nBonjour.<turn|>\n"
        "<|turn>system\nNow in German.<turn|>\n"
        "<|turn>user\nAgain?<turn|>\n"
        "<|turn>model\n" + NO_THINKING
    )


def test_thinking_on(tok):
    user = [{"role": "user", "content": "What is 2+2?"}]
    assert render(tok, user, add_generation_prompt=True, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n"
    )
    system = [{"role": "system", "content": "Be exact."}, *user]
    assert render(tok, system, add_generation_prompt=True, enable_thinking=True).startswith(
        "<bos><|turn>system\n<|think|>Be exact.<turn|>\n"
    )
    assert render(tok, user, add_generation_prompt=True, enable_thinking=False).endswith("<|turn>model\n" + NO_THINKING)


def test_tools_declared_in_the_system_turn(tok):
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Hi"}]
    assert render(tok, messages, tools=[WEATHER, SEARCH], add_generation_prompt=True, enable_thinking=True) == (
        f"<bos><|turn>system\n<|think|>Use tools.{WEATHER_DECL}{SEARCH_DECL}<turn|>\n"
        "<|turn>user\nHi<turn|>\n<|turn>model\n"
    )
    # Without a system message the declarations still get a system turn.
    assert render(tok, messages[1:], tools=[WEATHER]) == (
        f"<bos><|turn>system\n{WEATHER_DECL}<turn|>\n<|turn>user\nHi<turn|>\n"
    )


def test_assistant_reasoning_and_content(tok):
    user = {"role": "user", "content": "What is 2+2?"}
    # Both keys clients use for reasoning are read; the answer of the turn in progress keeps its reasoning.
    for key in ("reasoning_content", "reasoning"):
        answer = {"role": "assistant", key: "Two and two.", "content": " 4 "}
        assert render(tok, [user, answer]) == (
            "<bos><|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n<|channel>thought\nTwo and two.<channel|>4<turn|>\n"
        )
    # An earlier turn's thoughts are dropped from the history, also when left in its content.
    answer = {"role": "assistant", "reasoning_content": "Two and two.", "content": "<|channel>thought\nhm<channel|>4"}
    assert render(tok, [user, answer, {"role": "user", "content": "And 3+3?"}], add_generation_prompt=True) == (
        "<bos><|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n4<turn|>\n"
        "<|turn>user\nAnd 3+3?<turn|>\n<|turn>model\n" + NO_THINKING
    )


def test_assistant_tool_calls(tok):
    messages = [
        {"role": "user", "content": "Weather in Paris, and my notes?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": CALLS},
    ]
    # The model stopped at <|tool_response>: that is where the render ends.
    assert render(tok, messages, tools=[WEATHER, SEARCH]) == (
        f"<bos><|turn>system\n{WEATHER_DECL}{SEARCH_DECL}<turn|>\n"
        "<|turn>user\nWeather in Paris, and my notes?<turn|>\n"
        f"<|turn>model\nChecking.{CALLS_TEXT}<|tool_response>"
    )
    # OpenAI's JSON-string arguments are written as they are (Jinja cannot parse JSON): still one call each.
    as_json = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}} for c in CALLS]
    text = render(tok, [messages[0], {"role": "assistant", "content": None, "tool_calls": as_json}])
    assert '<|tool_call>call:get_weather{"city": "Paris", "unit": "celsius"}<tool_call|>' in text
    assert text.count("<|tool_call>") == 2 and text.endswith("<tool_call|><|tool_response>")


def test_tool_results(tok):
    calls = [CALLS[0], {**CALLS[1], "function": {"name": "search", "arguments": {"query": "x"}}}]
    base = [{"role": "user", "content": "Go"}, {"role": "assistant", "tool_calls": calls}]
    expected = (
        "<|turn>user\nGo<turn|>\n<|turn>model\n"
        f"<|tool_call>call:get_weather{{city:{Q}Paris{Q},unit:{Q}celsius{Q}}}<tool_call|>"
        f"<|tool_call>call:search{{query:{Q}x{Q}}}<tool_call|>"
        f"<|tool_response>response:get_weather{{value:{Q}15 C, sunny{Q}}}<tool_response|>"
        f'<|tool_response>response:search{{value:{Q}{{"hits": 2}}{Q}}}<tool_response|>'
    )
    by_id = [  # the id finds the name
        {"role": "tool", "tool_call_id": "call_1", "content": "15 C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": '{"hits": 2}'}]},
    ]
    by_name = [
        {"role": "tool", "name": "get_weather", "content": "15 C, sunny"},
        {"role": "tool", "name": "search", "content": '{"hits": 2}'},
    ]
    by_position = [{"role": "tool", "content": "15 C, sunny"}, {"role": "tool", "content": '{"hits": 2}'}]
    for results in (by_id, by_name, by_position):
        # The model continues its own turn after the results: no new turn is opened.
        thinking = "<bos><|turn>system\n<|think|><turn|>\n" + expected
        assert render(tok, base + results, add_generation_prompt=True, enable_thinking=True) == thinking
        assert render(tok, base + results, add_generation_prompt=True) == "<bos>" + expected + NO_THINKING
    # Answered out of order: the ids, not the positions, name the functions.
    swapped = render(tok, base + by_id[::-1])
    assert swapped.index("response:search{") < swapped.index("response:get_weather{")
    # A mapping result is written as a Gemma 4 object.
    result = {"role": "tool", "tool_call_id": "call_1", "content": {"temp": 15, "sky": "sunny", "ok": True}}
    assert render(tok, [*base, result]).endswith(
        f"<|tool_response>response:get_weather{{temp:15,sky:{Q}sunny{Q},ok:true}}<tool_response|>"
    )


def test_multi_turn_agent_loop(tok):
    messages = [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "reasoning_content": "I need the weather tool.",
            "content": "",
            "tool_calls": [CALLS[0]],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "15 C"},
        {"role": "assistant", "reasoning_content": "Got it.", "content": "It is 15 C in Paris."},
        {"role": "user", "content": "And my notes?"},
        {"role": "assistant", "reasoning_content": "Search them.", "content": "Searching.", "tool_calls": [CALLS[1]]},
        {"role": "tool", "tool_call_id": "call_2", "content": "2 notes"},
    ]
    assert render(tok, messages, tools=[WEATHER, SEARCH], add_generation_prompt=True, enable_thinking=True) == (
        f"<bos><|turn>system\n<|think|>You are an agent.{WEATHER_DECL}{SEARCH_DECL}<turn|>\n"
        "<|turn>user\nWeather in Paris?<turn|>\n"
        # The first turn is history: its thoughts are gone, its calls and results stay, in one model turn.
        f"<|turn>model\n<|tool_call>call:get_weather{{city:{Q}Paris{Q},unit:{Q}celsius{Q}}}<tool_call|>"
        f"<|tool_response>response:get_weather{{value:{Q}15 C{Q}}}<tool_response|>"
        "It is 15 C in Paris.<turn|>\n"
        "<|turn>user\nAnd my notes?<turn|>\n"
        # The turn in progress keeps its thoughts between tool calls, and stays open for the model to continue.
        "<|turn>model\n<|channel>thought\nSearch them.<channel|>Searching."
        f"<|tool_call>call:search{{query:{Q}{TRICKY}{Q},"
        f"filters:{{tags:[{Q}x{Q},{Q}y z{Q}],limit:42,nested:{{a:1,b:[true,null,2.5]}}}},exact:false,list:[1,2]}}"
        "<tool_call|>"
        f"<|tool_response>response:search{{value:{Q}2 notes{Q}}}<tool_response|>"
    )
    # Results left unanswered by a final message are closed when the user speaks again.
    unanswered = [*messages[:4], {"role": "user", "content": "Stop."}]
    assert render(tok, unanswered).endswith(f"{Q}15 C{Q}}}<tool_response|><turn|>\n<|turn>user\nStop.<turn|>\n")


def test_unknown_role_is_rejected(tok):
    with pytest.raises(Exception, match="Unknown message role"):
        render(tok, [{"role": "narrator", "content": "Once upon a time"}])


# ------------------------------------------------------------------------------------------- parsing


def _answer(tok, messages, **kwargs) -> tuple[str, str]:
    """(prompt, the model's answer): the template's rendering of the last assistant message, after the prompt."""
    prompt = render(tok, messages[:-1], add_generation_prompt=True, **kwargs)
    full = render(tok, messages, **kwargs)
    assert full.startswith(prompt)
    return prompt, full[len(prompt) :]


def _expected_calls(calls):
    return [{"type": "function", "function": c["function"]} for c in calls]


def test_parse_a_rendered_answer(tok):
    messages = [
        {"role": "user", "content": "Weather in Paris, and my notes?"},
        {"role": "assistant", "reasoning_content": "Two tools.", "content": "Checking.", "tool_calls": CALLS},
    ]
    prompt, answer = _answer(tok, messages, tools=[WEATHER, SEARCH], enable_thinking=True)
    assert answer == f"<|channel>thought\nTwo tools.<channel|>Checking.{CALLS_TEXT}<|tool_response>"
    parsed = tok.parse_response(ids(tok, answer), prefix=prompt)
    assert parsed == {
        "role": "assistant",
        "reasoning_content": "Two tools.",
        "content": "Checking.",
        "tool_calls": _expected_calls(CALLS),
    }
    args = parsed["tool_calls"][1]["function"]["arguments"]
    assert args["query"] == TRICKY and args["filters"]["limit"] == 42 and args["exact"] is False
    assert args["filters"]["nested"]["b"] == [True, None, 2.5]
    # The module-level function with the shipped template gives the same message from the text.
    assert parse_response(answer, tok.response_template, prefix=prompt) == parsed


def test_parse_plain_answers(tok):
    user = [{"role": "user", "content": "Hi"}]
    # Thinking off: the prompt's empty thought block yields no reasoning.
    prompt = render(tok, user, add_generation_prompt=True)
    assert tok.parse_response("Hello there.<turn|>", prefix=prompt) == {"role": "assistant", "content": "Hello there."}
    assert tok.parse_response("Hello there.<eos>", prefix=prompt) == {"role": "assistant", "content": "Hello there."}
    # Thinking on, no tool call.
    prompt = render(tok, user, add_generation_prompt=True, enable_thinking=True)
    text = "<|channel>thought\nA greeting.\n<channel|>Hello!<turn|>"
    assert tok.parse_response(text, prefix=prompt) == {
        "role": "assistant",
        "reasoning_content": "A greeting.",
        "content": "Hello!",
    }
    # After tool results, the answer continues the model turn: parsing starts after the last result.
    messages = [
        *user,
        {"role": "assistant", "tool_calls": [CALLS[0]]},
        {"role": "tool", "tool_call_id": "call_1", "content": "15 C"},
    ]
    prompt = render(tok, messages, add_generation_prompt=True, enable_thinking=True)
    assert prompt.endswith("<tool_response|>")
    assert tok.parse_response("It is 15 C.<turn|>", prefix=prompt) == {"role": "assistant", "content": "It is 15 C."}


def test_parse_model_whitespace_between_calls(tok):
    # A model may put newlines between its calls and before <|tool_response>; the content stays what it wrote.
    calls = CALLS_TEXT.replace("<tool_call|><|tool_call>", "<tool_call|>\n<|tool_call>")
    text = f"Checking.\n{calls}\n<|tool_response>"
    parsed = tok.parse_response(text, prefix="<|turn>model\n")
    assert parsed["content"] == "Checking."
    assert parsed["tool_calls"] == _expected_calls(CALLS)


@pytest.mark.parametrize("step", [1, 2, 3, 7, "token"])
def test_streamed_parse_equals_whole(tok, step):
    messages = [
        {"role": "user", "content": "Weather in Paris, and my notes?"},
        {"role": "assistant", "reasoning_content": "Two tools.", "content": "Checking.", "tool_calls": CALLS},
    ]
    prompt, answer = _answer(tok, messages, enable_thinking=True)
    whole = parse_response(answer, tok.response_template, prefix=prompt)
    if step == "token":  # what a server streams: one token's text at a time
        pieces = [tok.decode([t]) for t in ids(tok, answer)]
        assert "".join(pieces) == answer
    else:
        pieces = [answer[i : i + step] for i in range(0, len(answer), step)]
    parser = ResponseParser(tok.response_template, prefix=prompt)
    events = list(parser.initial_events)
    for piece in pieces:
        events += parser.feed(piece)
    streamed, final_events = parser.finalize()
    events += final_events
    assert streamed == whole
    assert whole["tool_calls"] == _expected_calls(CALLS) and whole["reasoning_content"] == "Two tools."
    # The reasoning and content arrive as text chunks while they stream; each call arrives whole when it closes.
    text = {f: "".join(e["text"] for e in events if e["type"] == "region_chunk" and e["field"] == f) for f in whole}
    assert text["reasoning_content"].strip() == "Two tools." and text["content"].strip() == "Checking."
    closed_calls = [e["value"] for e in events if e["type"] == "region_close" and e["field"] == "tool_calls"]
    assert closed_calls == _expected_calls(CALLS)
