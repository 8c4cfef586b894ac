"""llama.cpp's `POST /infill`, which editor plugins (llama.vim, llama.vscode) call for code completion.

The request is translated into a fill-in-the-middle completion (server/infill.py): the prompt is the extra
context, then `input_prefix`, then `prompt` (the part of the middle already typed, which the answer does not
repeat); the canvas holds the middle and `input_suffix` fixed after it. The answer has llama.cpp's /completion
shape; with `stream: true` it arrives as llama.cpp streams it (`data: {...}` lines, the last with `stop: true`).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError
from sse_starlette.sse import EventSourceResponse

from server.errors import bad_request
from server.infill import FillInTheMiddle, Middle
from server.protocol import JSON_INTEGER, SEED_MAX, CompletionRequest, Integer, StopString

# Request fields passed through unchanged to the completion (the diffusion extensions among them).
PASSTHROUGH = (
    "temperature",
    "top_p",
    "denoising_steps",
    "entropy_bound",
    "t_min",
    "t_max",
    "stability_threshold",
    "confidence_threshold",
    "reasoning_effort",
    "middle_lengths",
)


class ExtraChunk(BaseModel):
    model_config = ConfigDict(extra="allow")
    filename: StrictStr = ""
    text: StrictStr = ""


class InfillRequest(BaseModel):
    """llama.cpp's /infill fields that Press honours; its other /completion options are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    input_prefix: StrictStr = ""
    input_suffix: StrictStr = ""
    input_extra: list[ExtraChunk] = []
    prompt: StrictStr = ""
    n_predict: Integer = -1  # -1: no limit (here: one canvas)
    seed: Annotated[int, Field(ge=-1, le=SEED_MAX), JSON_INTEGER] = -1  # -1: random
    stop: Annotated[list[StopString], Field(max_length=16)] = []
    stream: StrictBool = False
    model: StrictStr | None = None
    n_probs: Annotated[int, Field(ge=0, le=20), JSON_INTEGER] = 0


def completion_request(body: InfillRequest, model: str) -> CompletionRequest:
    extra = "".join(f"{c.filename}\n{c.text}\n" for c in body.input_extra)
    fields: dict[str, Any] = {
        "model": model,
        "prompt": extra + body.input_prefix + body.prompt,
        "suffix": body.input_suffix,
        "stop": body.stop or None,
        "logprobs": body.n_probs or None,
    }
    if body.n_predict > 0:
        fields["max_tokens"] = body.n_predict
    if body.seed >= 0:
        fields["seed"] = body.seed
    fields.update({k: v for k, v in (body.model_extra or {}).items() if k in PASSTHROUGH})
    try:
        return CompletionRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"Invalid value for '{param}': {first['msg']}.", param=param) from None


def stop_type(middle: Middle) -> str:
    if middle.stopped_by:
        return "word"
    return "limit" if middle.finish.finish_reason == "length" else "eos"


def response(body: InfillRequest, req: CompletionRequest, fim: FillInTheMiddle, middle: Middle, took: float) -> dict:
    ms = took * 1000
    return {
        "content": middle.text,
        "id_slot": 0,
        "stop": True,
        "model": fim.serving.model_name,
        "tokens_predicted": middle.tokens,
        "tokens_evaluated": fim.prompt_tokens,
        "generation_settings": {
            "n_predict": body.n_predict,
            "seed": body.seed,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stop": body.stop,
        },
        "prompt": req.prompt,
        "has_new_line": "\n" in middle.text,
        "truncated": False,
        "stop_type": stop_type(middle),
        "stopping_word": middle.stopped_by,
        "tokens_cached": 0,
        # Press does not split a diffusion request into prompt and generation time: it reports the whole
        # request as predicted_ms (prompt_ms 0).
        "timings": {
            "prompt_n": fim.prompt_tokens,
            "prompt_ms": 0.0,
            "predicted_n": middle.tokens,
            "predicted_ms": ms,
            "predicted_per_token_ms": ms / middle.tokens if middle.tokens else 0.0,
            "predicted_per_second": middle.tokens / took if took > 0 else 0.0,
        },
        "diffusion": {**fim.serving.stats(middle.finish), "chosen": middle.candidate, "hole": middle.hole},
    }


async def infill(serving, body: InfillRequest, request: Request):
    serving.check_model(body.model or serving.model_name)
    req = completion_request(body, serving.model_name)
    serving.reject_unsupported(req)
    start = time.perf_counter()
    prompts = serving.completion_prompts(req)
    variants, _ = serving.variants(req, req.max_tokens)
    states = serving.make_states(req, prompts, req.max_tokens, prompt_param="input_prefix", variants=variants,
                                 variant_param="input_suffix")  # fmt: skip
    fim = FillInTheMiddle(serving, req, states, variants, len(prompts[0]))
    middles, _ = await fim.middles(request)
    answer = response(body, req, fim, middles[0], time.perf_counter() - start)
    if not body.stream:
        return answer

    async def events():
        # The middle is chosen when every candidate is done: one content event, then the final one.
        yield {"data": json.dumps({"content": answer["content"], "stop": False, "id_slot": 0})}
        yield {"data": json.dumps({**answer, "content": ""})}

    return EventSourceResponse(events(), sep="\n")
