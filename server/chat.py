"""The chat format: OpenAI messages and tools into a prompt (the checkpoint's chat template), and the model's
answer back into content, reasoning and tool calls (transformers' ResponseParser with a response template).

Nothing here parses the Gemma 4 format by hand: the checkpoint's `response_template` (or, for a DiffusionGemma
checkpoint without one, the Gemma 4 template below) drives transformers' parser, which also streams.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from transformers.utils.chat_parsing import ResponseParser

from server.errors import bad_request
from server.protocol import ChatCompletionRequest

# Gemma 4's answer layout in transformers' declarative response-template format, used for DiffusionGemma
# checkpoints whose tokenizer config carries none (and shipped in tiny-random's). It follows transformers' own
# fallback for model_type "gemma4" (transformers/cli/serving/utils.py). Differences: function names may hold "-" and "."
# (OpenAI allows them), and whitespace before a tool call or an end marker belongs to the marker, so a
# newline between two calls or before <|tool_response> cannot open an empty content region whose close
# would overwrite the real content.
GEMMA4_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    # The answer starts after the model turn opens, or after the tool responses inside it.
    "start_anchor": ["<|turn>model\n", "<tool_response|>"],
    "fields": {
        "reasoning_content": {"open": "<|channel>thought\n", "close": "<channel|>", "content": "text"},
        "tool_calls": {
            "open_pattern": r"\s*<\|tool_call>call:(?P<name>[\w.\-]+)",
            "close": "<tool_call|>",
            "repeats": True,
            "content": "json",
            "content_args": {"unquoted_keys": True, "string_delims": [['<|"|>', '<|"|>']]},
            "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}},
        },
        "content": {"close_pattern": r"\s*(?:<turn\|>|<\|tool_response>|<eos>)", "content": "text"},
    },
}
CHAT_FORMAT_MODEL_TYPES = ("diffusion_gemma", "gemma4")


@dataclass
class ParsedAnswer:
    content: str
    reasoning: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI shape, arguments as a JSON string


def join_text_parts(parts: list, param: str, sep: str) -> str:
    """Content parts as one text; a part that is not text is a 400 naming it."""
    texts = []
    for j, part in enumerate(parts):
        if part.type != "text":
            raise bad_request(f"Content part type '{part.type}' is not supported here; send text parts only.",
                              param=f"{param}[{j}].type")  # fmt: skip
        texts.append(part.text)
    return sep.join(texts)


def template_parts(parts: list, param: str) -> list[dict]:
    """Text and image parts as chat templates take them ({"type": "image"} marks where an image goes); any other
    part is a 400 naming it."""
    out = []
    for j, part in enumerate(parts):
        if part.type == "text":
            out.append({"type": "text", "text": part.text})
        elif part.type == "image_url":
            out.append({"type": "image"})
        else:
            raise bad_request(f"Content part type '{part.type}' is not supported; send text and image_url parts.",
                              param=f"{param}[{j}].type")  # fmt: skip
    return out


def image_urls(req: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(param, url) of every image part, in prompt order."""
    return [
        (f"messages[{i}].content[{j}]", part.image_url.url)
        for i, m in enumerate(req.messages)
        if isinstance(m.content, list)
        for j, part in enumerate(m.content)
        if part.type == "image_url"
    ]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def openai_tool_call(parsed: dict) -> dict:
    fn = parsed["function"]
    args = fn["arguments"]
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
    }


class ChatFormat:
    def __init__(self, tokenizer, model_type: str) -> None:
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "response_template", None)
        if template is None and model_type in CHAT_FORMAT_MODEL_TYPES:
            template = GEMMA4_RESPONSE_TEMPLATE
        self.response_template = template
        specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len)
        self._specials = re.compile("|".join(re.escape(s) for s in reversed(specials))) if specials else None

    def strip_special(self, text: str) -> str:
        """Special tokens never reach a client's content or reasoning."""
        return self._specials.sub("", text) if self._specials else text

    # ------------------------------------------------------------------ prompt

    @staticmethod
    def messages(req: ChatCompletionRequest, object_arguments: bool = False) -> list[dict]:
        """OpenAI messages as the chat template takes them: text parts joined (a message with images keeps its
        parts, each image as {"type": "image"} for the template to place), tool-call arguments as objects (with
        `object_arguments`, arguments that are not a JSON object become an empty one)."""
        out = []
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list) and any(part.type == "image_url" for part in m.content):
                content = template_parts(m.content, f"messages[{i}].content")
            elif isinstance(m.content, list):
                content = join_text_parts(m.content, f"messages[{i}].content", "\n")
            else:
                content = m.content
            message: dict = {"role": m.role, "content": content or ""}
            extra = m.model_extra or {}
            for key in ("reasoning_content", "reasoning"):
                if isinstance(extra.get(key), str):
                    message["reasoning_content"] = extra[key]
            if m.tool_calls:
                calls = []
                for call in m.tool_calls:
                    # The template writes an object in Gemma's call syntax; anything else (OpenAI accepts any
                    # string here) is written as the text it is.
                    raw = call.function.arguments or "{}"
                    try:
                        arguments = json.loads(raw)
                    except ValueError:
                        arguments = raw
                    if not isinstance(arguments, dict):
                        arguments = {} if object_arguments else raw
                    calls.append(
                        {"id": call.id, "type": "function",
                         "function": {"name": call.function.name, "arguments": arguments}}
                    )  # fmt: skip
                message["tool_calls"] = calls
            if m.role == "tool":
                message["tool_call_id"] = m.tool_call_id
            if m.name:
                message["name"] = m.name
            out.append(message)
        return out

    @staticmethod
    def declared_tools(req: ChatCompletionRequest) -> list[dict] | None:
        """The tools the prompt declares and an answer's calls are typed against (their parameter schemas cast
        the arguments); none with `tool_choice: "none"`."""
        if not req.tools or req.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in req.tools]

    def prompt(self, req: ChatCompletionRequest, object_arguments: bool = False) -> str:
        tools = self.declared_tools(req)
        kwargs = dict(req.chat_template_kwargs or {})
        messages = self.messages(req, object_arguments)
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs
            )
        except Exception as exc:  # jinja raises for role orders or kwargs a template does not allow
            raise bad_request(
                f"The chat template rejected the messages: {exc}", param="messages", code="invalid_messages"
            ) from exc

    def parser_prefix(self, req: ChatCompletionRequest, prompt: str) -> str:
        """The text the answer parser reads before the answer: the prompt, unless the history holds a tool call
        whose arguments are not a JSON object (OpenAI accepts any string; the template writes it as it is). The
        parser cannot read such a call back, so it reads the same prompt with those arguments as `{}`: the same
        state (a call written, the turn going on) for the answer that follows."""
        for m in req.messages:
            for call in m.tool_calls or []:
                try:
                    ok = isinstance(json.loads(call.function.arguments or "{}"), dict)
                except ValueError:
                    ok = False
                if not ok:
                    return self.prompt(req, object_arguments=True)
        return prompt

    # ----------------------------------------------------------------- answer

    def parse(self, text: str, prompt: str, tools: list[dict] | None) -> ParsedAnswer:
        """A whole answer (decoded with its special tokens) as content, reasoning and tool calls: the deltas a
        stream of it would send, joined, so a streamed answer and a whole one always agree. (The parser's own
        region values strip whitespace that its streamed chunks keep.)"""
        parsed = ParsedAnswer("")
        reasoning: list[str] = []
        for delta in self.stream(prompt, tools).feed(text, final=True):
            parsed.content += delta.get("content", "")
            if "reasoning" in delta:
                reasoning.append(delta["reasoning"])
            for call in delta.get("tool_calls", []):
                if "id" in call:
                    parsed.tool_calls.append({"id": call["id"], "type": "function", "function": dict(call["function"])})
                else:
                    parsed.tool_calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
        parsed.reasoning = "".join(reasoning) if reasoning else None
        return parsed

    def stream(self, prompt: str, tools: list[dict] | None) -> AnswerStream:
        return AnswerStream(self, prompt, tools)


class AnswerStream:
    """Streaming parse of one choice: feed the answer's new text (special tokens kept), get OpenAI deltas."""

    def __init__(self, fmt: ChatFormat, prompt: str, tools: list[dict] | None) -> None:
        self.fmt = fmt
        self.parser = (
            ResponseParser(fmt.response_template, prefix=prompt, tools=tools) if fmt.response_template else None
        )
        self.tool_calls = 0
        self.failed = False
        self.open_call = ""  # raw text of a tool call still open: content if the call turns out malformed

    def _deltas(self, events: list[dict]) -> list[dict]:
        out = []
        for ev in events:
            name = ev.get("field")
            if ev["type"] == "region_chunk" and ev.get("dirty") and name == "tool_calls":
                self.open_call += ev.get("text") or ""
            elif ev["type"] == "region_chunk" and not ev.get("dirty"):
                text = self.fmt.strip_special(ev.get("text") or "")
                if not text:
                    continue
                if name == "content":
                    out.append({"content": text})
                elif name in ("reasoning_content", "thinking"):
                    out.append({"reasoning_content": text, "reasoning": text})
            elif ev["type"] == "region_close" and name == "tool_calls":
                self.open_call = ""
                call = openai_tool_call(ev["value"])
                index = self.tool_calls
                self.tool_calls += 1
                # As OpenAI streams a call: index, id and name first, then the arguments.
                out.append(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": ""},
                            }
                        ]
                    }
                )
                out.append({"tool_calls": [{"index": index,
                                            "function": {"arguments": call["function"]["arguments"]}}]})  # fmt: skip
        return out

    def feed(self, text: str, final: bool = False) -> list[dict]:
        if self.parser is None or self.failed:
            cleaned = self.fmt.strip_special(text)
            return [{"content": cleaned}] if cleaned else []
        try:
            events = self.parser.feed(text)
            if final:
                events += self.parser.finalize()[1]
            return self._deltas(events)
        except Exception:  # a malformed call: it, and what follows, go out as content
            self.failed = True
            cleaned = self.fmt.strip_special(self.open_call + text)
            return [{"content": cleaned}] if cleaned else []
