"""Canvas constraints from requests: infill templates (`infill`), predicted outputs (`prediction`) and
fill-in-the-middle (`suffix` on /v1/completions, llama.cpp's /infill), and picking a middle among candidate
lengths.

Fill-in-the-middle does not know the middle's length. Each choice is denoised as several rows of the same
batched passes, one per candidate length: the template is [a hole of that length, the suffix fixed], and the
winner is the candidate whose hole the model filled most confidently (the highest mean log-probability of the
tokens it committed in the hole, fillers included: a model that leaves a hole short says so with confident
filler). See the README's Fill-in-the-middle section for the measurement behind the default lengths.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from sse_starlette.sse import EventSourceResponse

from engine.constraints import CanvasConstraints
from engine.events import CommitEvent, FinishEvent, PassEvent
from engine.request import DenoiseState
from server.chat import join_text_parts
from server.errors import APIError, RequestCut, bad_request, engine_error
from server.protocol import Infill, Prediction
from server.sse import dump

MAX_CANDIDATES = 4


@dataclass
class Variant:
    """One row per choice: its constraints, the max_tokens they need, and the hole length (fill-in-the-middle)."""

    constraints: CanvasConstraints
    max_tokens: int | None = None
    hole: int | None = None


def default_middle_lengths(max_middle: int) -> list[int]:
    """max_tokens, then halves: up to four candidate lengths, longest first."""
    lengths: list[int] = []
    n = max_middle
    while n >= 1 and len(lengths) < MAX_CANDIDATES:
        lengths.append(n)
        n //= 2
    return lengths


class CanvasRequests:
    """Translates request fields into engine canvas constraints for one loaded model."""

    def __init__(self, engine) -> None:
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        eos = list(engine.defaults.eos_token_ids)
        pad = engine.loaded.model.config.get_text_config().pad_token_id
        self.eos = eos[0] if eos else None
        self.fillers = {t for t in [pad, *eos] if t is not None}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def template(self, spec: Infill) -> Variant:
        segments: list[list[int] | int] = []
        for i, seg in enumerate(spec.template):
            if isinstance(seg, str):
                ids = self.encode(seg)
                if ids:
                    segments.append(ids)
            elif isinstance(seg, dict) and set(seg) == {"hole"}:
                n = seg["hole"]
                if isinstance(n, float) and n.is_integer():  # a JSON integer may be written 66.0
                    n = int(n)
                if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                    raise bad_request(
                        f"A hole is a whole number of tokens, at least 1 (got {n!r}).",
                        param=f"infill.template[{i}].hole",
                    )
                segments.append(n)
            else:
                raise bad_request(
                    'A template segment is a string (fixed text) or {"hole": N} (up to N tokens to fill).',
                    param=f"infill.template[{i}]",
                )
        if not segments:
            raise bad_request("The template has no tokens: give it text or holes.", param="infill.template")
        self._check_fits(segments, "infill.template")
        constraints = CanvasConstraints.template(segments, self.eos, self.fillers)
        return Variant(constraints, max_tokens=constraints.end)

    def _check_fits(self, segments: list[list[int] | int], param: str) -> None:
        """A template longer than the context is refused before it is built (its holes are sets of positions)."""
        size = sum(seg if isinstance(seg, int) else len(seg) for seg in segments)
        if size > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens; the template needs {size}.",
                param=param,
                code="context_length_exceeded",
            )

    def prediction(self, spec: Prediction) -> Variant | None:
        if isinstance(spec.content, str):
            text = spec.content
        else:
            text = join_text_parts(spec.content, "prediction.content", "")
        tokens = self.encode(text)
        return Variant(CanvasConstraints.prediction(tokens, self.eos)) if tokens else None

    def middles(self, suffix: str, max_middle: int, lengths: list[int] | None) -> list[Variant]:
        """One variant per candidate middle length: [hole, suffix fixed]."""
        suffix_ids = self.encode(suffix)
        out = []
        for n in sorted(set(lengths or default_middle_lengths(max_middle)), reverse=True):
            segments: list[list[int] | int] = [n, suffix_ids] if suffix_ids else [n]
            self._check_fits(segments, "middle_lengths" if lengths else "suffix")
            constraints = CanvasConstraints.template(segments, self.eos, self.fillers)
            out.append(Variant(constraints, max_tokens=constraints.end, hole=n))
        return out


# ------------------------------------------------------------------ picking a middle


@dataclass
class Middle:
    """The winning candidate of one choice: its middle's text and tokens, and how it ended."""

    text: str
    tokens: int
    finish: FinishEvent
    candidate: int
    hole: int | None
    logprobs: list
    stopped_by: str = ""  # the stop string that cut the middle, if one did


def pick(group: list[tuple[DenoiseState, FinishEvent, list]], variants: list[Variant], tokenizer, stop) -> Middle:
    """The most confident candidate (ties: the longer hole); its middle is the answer without the suffix."""
    best = max(
        range(len(group)),
        key=lambda i: (group[i][1].template_logprob if group[i][1].template_logprob is not None else float("-inf"), -i),
    )
    state, finish, logprobs = group[best]
    fixed = finish.fixed_tokens or 0
    ids = state.answer_ids[: len(state.answer_ids) - fixed]  # the suffix's tokens come after the hole's
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stopped_by = ""
    for s in stop:  # stop strings apply to the middle: the earliest one cuts it
        cut = text.find(s)
        if cut != -1:
            text, stopped_by = text[:cut], s
    return Middle(text, len(ids), finish, best, variants[best].hole, logprobs[: len(ids)], stopped_by)


def finish_reason(middle: Middle) -> str:
    return "length" if middle.finish.finish_reason == "length" and not middle.stopped_by else "stop"


class FillInTheMiddle:
    """Runs a fill-in-the-middle request (k candidate rows per choice) and answers with the winners."""

    def __init__(self, serving, req, states: list[DenoiseState], variants: list[Variant], prompt_tokens: int):
        self.serving = serving
        self.req = req
        self.states = states
        self.variants = variants
        self.k = len(variants)
        self.prompt_tokens = prompt_tokens
        self.stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

    def choose(self, g: int, finishes: list[FinishEvent], logprobs: list[list]) -> tuple[Middle, list[dict]]:
        """Choice `g`'s winning middle among its candidate rows, and what each candidate scored."""
        rows = range(g * self.k, (g + 1) * self.k)
        group = [(self.states[r], finishes[r], logprobs[r]) for r in rows]
        candidates = [
            {"hole": v.hole, "template_logprob": f.template_logprob, "passes": f.passes}
            for v, (_, f, _) in zip(self.variants, group, strict=True)
        ]
        return pick(group, self.variants, self.serving.tokenizer, self.stop), candidates

    def choice_fields(self, m: Middle, candidates: list[dict]) -> tuple[dict | None, dict]:
        """A chosen middle's `logprobs` (when asked for) and `diffusion` fields."""
        logprobs = (
            self.serving.logprob_formatter.completion(m.logprobs, 0)[0] if self.req.logprobs is not None else None
        )
        return logprobs, {**self.serving.stats(m.finish), "candidates": candidates, "chosen": m.candidate}

    def usage(self, middles: list[Middle]) -> dict:
        completion = sum(m.tokens for m in middles)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    async def middles(self, request: Request) -> tuple[list[Middle], list[list[dict]]]:
        results = await self.serving.collect(self.states, request)
        finishes, logprobs = [r.finish for r in results], [r.logprobs for r in results]
        self.serving.log_details(request, self.req, self.prompt_tokens, finishes)
        chosen = [self.choose(g, finishes, logprobs) for g in range(len(self.states) // self.k)]
        return [m for m, _ in chosen], [c for _, c in chosen]

    async def respond(self, request: Request) -> dict | EventSourceResponse:
        if self.req.stream:
            return EventSourceResponse(self.stream(request), sep="\n", ping=15, headers={"X-Accel-Buffering": "no"})
        middles, candidates = await self.middles(request)
        choices = []
        for i, (m, cands) in enumerate(zip(middles, candidates, strict=True)):
            logprobs, diffusion = self.choice_fields(m, cands)
            choices.append(
                {"index": i, "text": m.text, "finish_reason": finish_reason(m), "logprobs": logprobs,
                 "diffusion": diffusion}
            )  # fmt: skip
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.serving.model_name,
            "choices": choices,
            "usage": self.usage(middles),
        }

    async def stream(self, request: Request) -> AsyncIterator[dict]:
        """Drafts of every candidate as they come (`draft.candidate`, `draft.hole`), then each choice's middle
        in one chunk when its candidates are done, its finish, usage and [DONE]."""
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        tokens = bool(self.req.stream_options and self.req.stream_options.include_draft_tokens)

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            body = {"id": cid, "object": "text_completion", "created": created, "model": self.serving.model_name,
                    "choices": choices}  # fmt: skip
            if include_usage:
                body["usage"] = usage
            return {"data": dump(body)}

        finishes: list[FinishEvent | None] = [None] * len(self.states)
        logprobs: list[list] = [[] for _ in self.states]
        middles: list[Middle | None] = [None] * (len(self.states) // self.k)
        try:
            async for index, event in self.serving.merged_events(self.states):
                g, c = divmod(index, self.k)
                if isinstance(event, PassEvent) and event.draft_text is not None:
                    draft = self.serving.draft(event, tokens=tokens, candidate=c, hole=self.variants[c].hole)
                    yield chunk([{"index": g, "text": "", "finish_reason": None, "logprobs": None, "draft": draft}])
                elif isinstance(event, FinishEvent):
                    finishes[index] = event
                    if event.finish_reason == "error":
                        raise engine_error(event.error)
                    if all(finishes[g * self.k + i] is not None for i in range(self.k)):
                        m, candidates = self.choose(g, finishes, logprobs)
                        middles[g] = m
                        lp, diffusion = self.choice_fields(m, candidates)
                        yield chunk([{"index": g, "text": m.text, "finish_reason": None, "logprobs": lp}])
                        yield chunk([{"index": g, "text": "", "finish_reason": finish_reason(m), "logprobs": None,
                                      "diffusion": diffusion}])  # fmt: skip
                elif isinstance(event, CommitEvent) and event.logprobs:
                    logprobs[index].extend(event.logprobs)
        except RequestCut as cut:
            yield {"data": dump(cut.error.body())}
            yield {"data": "[DONE]"}
            return
        except APIError as exc:
            yield {"data": dump(exc.body())}
            yield {"data": "[DONE]"}
            return
        finally:
            self.serving.log_details(request, self.req, self.prompt_tokens, finishes)
        if include_usage:
            yield chunk([], self.usage([m for m in middles if m is not None]))
        yield {"data": "[DONE]"}
