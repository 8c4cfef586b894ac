"""Turns validated OpenAI requests into engine requests, and engine events into OpenAI responses.

One class serves both endpoints: chat and text completions differ only in how the prompt is built and
in the shape of a choice, so those are the two places they branch.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from sse_starlette.sse import EventSourceResponse

from engine.async_engine import AsyncEngine
from engine.engine import ContextLengthError
from engine.events import CommitEvent, Event, FinishEvent, PassEvent, TokenLogprob
from engine.images import ImageInputError, PromptImages
from engine.request import DenoiseState
from engine.sampling_params import (
    BEST_OF_VERIFY_PASSES,
    REASONING_EFFORT_BEST_OF,
    REASONING_EFFORT_PRESETS,
    SamplingParams,
    SamplingParamsError,
)
from server.best_of import BestOf
from server.chat import ChatFormat, ParsedAnswer, image_urls
from server.config import ServerConfig
from server.errors import (
    APIError,
    RequestCut,
    bad_request,
    engine_error,
    internal_error,
    shutdown_error,
    timeout_error,
)
from server.images import load_image
from server.infill import CanvasRequests, Variant
from server.logprobs import LogprobFormatter
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DiffusionParams,
    DiffusionStats,
    Draft,
)
from server.sse import dump
from server.vision import VisionPrompt, vision_prompt

log = logging.getLogger("press.server")
MAX_CHOICES = 128  # engine rows per request: n x 64 candidates at reasoning_effort high for n up to 2
# How often a request waiting for its events looks at whether the shutdown timeout has run out.
CUT_POLL_S = 0.25


@dataclass
class ChoiceResult:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishEvent | None = None


class Serving:
    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        config: ServerConfig | None = None,
        aliases: tuple[str, ...] = (),
        state=None,
    ) -> None:
        """`state`: the server's ServerState, whose `cutting` ends requests at the shutdown timeout."""
        self.engine = engine
        self.state = state
        self.config = config or ServerConfig()
        self.model_name = model_name
        self.aliases = {model_name, *aliases}
        self.tokenizer = engine.engine.tokenizer
        self.logprob_formatter = LogprobFormatter(engine.engine)
        self.chat_format = ChatFormat(self.tokenizer, engine.engine.loaded.model.config.model_type)
        self.canvas_requests = CanvasRequests(engine.engine)
        self.image_limits = self.config.image_limits()
        vision = vision_prompt(engine.engine)
        self.vision, self.no_images = (vision, None) if isinstance(vision, VisionPrompt) else (None, vision)
        self._token_texts: dict[int, str] = {}

    # ------------------------------------------------------------ validation

    def check_model(self, model: str) -> None:
        if model not in self.aliases:
            raise APIError(
                404,
                f"The model '{model}' does not exist. This server serves '{self.model_name}'.",
                param="model",
                code="model_not_found",
            )

    @staticmethod
    def reject_unsupported(req: DiffusionParams) -> None:
        """Known OpenAI features Press cannot honour: refuse them loudly instead of ignoring them."""
        if req.logit_bias:
            raise bad_request("'logit_bias' is not supported by this diffusion server.", param="logit_bias")
        if req.stream_options is not None and not req.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
        if isinstance(req, ChatCompletionRequest):
            if req.top_logprobs is not None and not req.logprobs:
                raise bad_request("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
            names = [t.function.name for t in req.tools or []]
            forced_call = req.tool_choice not in (None, "none", "auto")
            if forced_call and not names:
                raise bad_request("'tool_choice' needs 'tools' to choose from.", param="tool_choice")
            if forced_call and req.infill is not None:
                raise bad_request("An 'infill' template cannot be combined with a forced tool call.", param="infill")
            choice = req.tool_choice
            if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
                raise bad_request(
                    f"'tool_choice' names the function '{choice.function.name}', which is not among 'tools'.",
                    param="tool_choice.function.name",
                    code="unknown_tool",
                )
        structured = req.response_format is not None or req.structured_outputs is not None
        if req.infill is not None and req.prediction is not None:
            raise bad_request("'prediction' cannot be combined with an 'infill' template.", param="prediction")
        if req.infill is not None and structured:
            raise bad_request("An 'infill' template cannot be combined with structured outputs.", param="infill")
        if isinstance(req, CompletionRequest):
            if req.echo:
                raise bad_request("'echo' is not supported by this diffusion server.", param="echo")
            if req.suffix is not None and req.infill is not None:
                raise bad_request("'suffix' and 'infill' both shape the answer; send one.", param="suffix")
            if req.suffix is not None and structured:
                raise bad_request("'suffix' cannot be combined with structured outputs.", param="suffix")
            if req.middle_lengths is not None and req.suffix is None:
                raise bad_request("'middle_lengths' applies to 'suffix' requests only.", param="middle_lengths")
            if req.suffix is not None and (req.best_of or req.n) > req.n:
                raise bad_request("'best_of' cannot be combined with 'suffix': fill-in-the-middle already picks "
                                  "among candidate lengths.", param="best_of")  # fmt: skip
        if req.best_of is not None and req.best_of < req.n:
            raise bad_request(f"'best_of' ({req.best_of}) must be at least 'n' ({req.n}).", param="best_of")

    def sampling_params(self, req: DiffusionParams, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        """Resolve request fields over the checkpoint's defaults into concrete SamplingParams."""
        d = self.engine.engine.defaults
        preset = REASONING_EFFORT_PRESETS.get(req.reasoning_effort or "", {})
        t_max, t_min = d.t_max, d.t_min
        if req.temperature is not None:
            # temperature sets the schedule's top; the bottom follows at half unless given.
            t_max, t_min = req.temperature, req.temperature / 2
        if req.t_max is not None:
            t_max = req.t_max
            if req.temperature is None:
                t_min = min(t_min, t_max)
        if req.t_min is not None:
            t_min = req.t_min
        if t_min > t_max:
            raise bad_request(
                f"'t_min' ({t_min}) must not exceed t_max / temperature ({t_max}).",
                param="t_min",
                code="invalid_schedule",
            )
        if t_max == 0:
            t_min = 0.0
        if max_tokens is None:
            max_tokens = self.engine.engine.default_max_tokens(prompt_len)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        include_drafts = bool(req.stream and (req.stream_options is None or req.stream_options.include_drafts))
        params = SamplingParams(
            max_tokens=max_tokens,
            denoising_steps=req.denoising_steps or int(preset.get("denoising_steps", d.denoising_steps)),
            entropy_bound=req.entropy_bound or float(preset.get("entropy_bound", d.entropy_bound)),
            t_min=t_min,
            t_max=t_max,
            stability_threshold=(
                req.stability_threshold if req.stability_threshold is not None else d.stability_threshold
            ),
            confidence_threshold=req.confidence_threshold or d.confidence_threshold,
            top_p=req.top_p if req.top_p is not None else 1.0,
            seed=req.seed,
            stop=stop,
            eos_token_ids=[] if req.ignore_eos else list(d.eos_token_ids),
            include_drafts=include_drafts,
            logprobs=self.logprobs_wanted(req),
            # A chat answer keeps its format's markers for the parser, which removes them.
            skip_special_tokens=not (isinstance(req, ChatCompletionRequest) and self.chat_format.response_template),
        )
        try:
            params.validate()
        except SamplingParamsError as exc:
            raise bad_request(str(exc), param=exc.param) from exc
        return params

    def variants(self, req: DiffusionParams, max_tokens: int | None) -> tuple[list[Variant] | None, str]:
        """The canvas constraints a request asks for (one variant, or a middle's candidate lengths) and the field
        they come from. A template sets max_tokens to its length; a smaller max_tokens is refused."""
        canvas = self.canvas_requests
        if isinstance(req, CompletionRequest) and req.suffix is not None:
            middle = max_tokens if max_tokens is not None else self.engine.engine.canvas_length
            return canvas.middles(req.suffix, middle, req.middle_lengths), "suffix"
        if req.infill is not None:
            variant = canvas.template(req.infill)
            if max_tokens is not None and max_tokens < variant.max_tokens:
                raise bad_request(
                    f"'max_tokens' ({max_tokens}) is shorter than the infill template ({variant.max_tokens} tokens).",
                    param="max_tokens",
                    code="template_too_long",
                )
            return [variant], "infill.template"
        if req.prediction is not None:
            variant = canvas.prediction(req.prediction)
            return ([variant] if variant is not None else None), "prediction"
        return None, ""

    @staticmethod
    def logprobs_wanted(req: DiffusionParams) -> int | None:
        """Alternatives per committed token, or None when the request wants no log-probabilities."""
        if isinstance(req, ChatCompletionRequest):
            return (req.top_logprobs or 0) if req.logprobs else None
        return req.logprobs

    # ---------------------------------------------------------------- prompts

    async def load_images(self, req: ChatCompletionRequest) -> list:
        """The request's image parts as decoded images, in prompt order (400s name the part)."""
        urls = image_urls(req)
        if not urls:
            return []
        self.chat_format.messages(req)  # parts it cannot take are refused before anything is fetched
        if self.vision is None:
            raise bad_request(f"The model '{self.model_name}' cannot read images: {self.no_images}.",
                              param=urls[0][0], code="images_not_supported")  # fmt: skip
        limits = self.image_limits
        if len(urls) > limits.max_images:
            raise bad_request(f"At most {limits.max_images} images per request; this one has {len(urls)}.",
                              param=urls[limits.max_images][0], code="too_many_images")  # fmt: skip
        results = await asyncio.gather(*(load_image(url, limits, param) for param, url in urls), return_exceptions=True)
        for result in results:  # the first failing part, in prompt order
            if isinstance(result, BaseException):
                raise result
        return list(results)

    def chat_prompt(
        self, req: ChatCompletionRequest, images: list | None = None
    ) -> tuple[str, list[int], PromptImages | None]:
        """The answer parser's prefix (the prompt as text, see ChatFormat.parser_prefix), the prompt's token ids
        and, with images, what the encoder reads of them (the checkpoint's processor writes their soft tokens)."""
        text = self.chat_format.prompt(req)
        prefix = self.chat_format.parser_prefix(req, text)
        if not images:
            return prefix, list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), None
        try:
            ids, prompt_images = self.vision.encode(text, images)
        except ImageInputError as exc:
            raise bad_request(f"The images do not fit the prompt: {exc}", param="messages",
                              code="invalid_image") from exc  # fmt: skip
        return prefix, ids, prompt_images

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and isinstance(p[0], str):
            prompts = list(p)
        elif p and isinstance(p[0], int):
            return [list(p)]
        else:
            return [list(x) for x in p]
        out = []
        for text in prompts:
            ids = list(self.tokenizer(text)["input_ids"])
            if not ids:
                # As OpenAI: no prompt text means the beginning of a new document.
                if self.tokenizer.bos_token_id is None:
                    raise bad_request("The prompt must not be empty.", param="prompt")
                ids = [self.tokenizer.bos_token_id]
            out.append(ids)
        return out

    @staticmethod
    def rows_per_prompt(req: DiffusionParams) -> int:
        """Engine rows per prompt: `best_of`, else n times the reasoning effort's candidates (server/best_of.py);
        fill-in-the-middle keeps n (its rows are candidate lengths)."""
        if isinstance(req, CompletionRequest) and req.suffix is not None:
            return req.n
        if req.best_of is not None:
            return req.best_of
        return req.n * REASONING_EFFORT_BEST_OF.get(req.reasoning_effort or "", 1)

    def best_of(self, req: DiffusionParams, states: list[DenoiseState]) -> BestOf | None:
        """The grouping of a request's rows into its choices, when it denoises more rows than it answers with."""
        rows = self.rows_per_prompt(req)
        if rows == req.n:
            return None
        return BestOf(rows, req.n, len(states) // rows, logprobs_wanted=self.logprobs_wanted(req) is not None)

    def make_states(
        self,
        req: DiffusionParams,
        prompts: list[list[int]],
        max_tokens: int | None,
        prompt_param: str,
        grammar=None,
        variants: list[Variant] | None = None,
        variant_param: str = "infill",
        images: PromptImages | None = None,
    ) -> list[DenoiseState]:
        """One engine request per prompt, row (a choice, or a best_of candidate) and variant (canvas constraints;
        fill-in-the-middle has one per candidate length); each gets its own copy of the compiled `grammar`."""
        if len(prompts) * req.n > MAX_CHOICES:
            raise bad_request(f"At most {MAX_CHOICES} choices (prompts x n) per request.", param="n",
                              code="too_many_choices")  # fmt: skip
        per_prompt = self.rows_per_prompt(req)
        if len(prompts) * per_prompt > MAX_CHOICES:
            raise bad_request(
                f"At most {MAX_CHOICES} candidate answers per request; this one asks for {len(prompts) * per_prompt} "
                f"(prompts x best_of, or x n x {REASONING_EFFORT_BEST_OF['high']} at reasoning_effort high).",
                param="best_of" if req.best_of is not None else "n", code="too_many_choices",
            )  # fmt: skip
        rows = len(prompts) * per_prompt * len(variants or [None])
        max_queue = self.engine.engine.config.max_queue
        if rows > max_queue:  # would never fit the queue: not a retry, a smaller request
            raise bad_request(
                f"This request needs {rows} engine requests (prompts x n x fill-in-the-middle candidates); the "
                f"server queues at most {max_queue}.", param="n", code="too_many_choices",
            )  # fmt: skip
        # The engine holds at most max_num_seqs + max_queue requests, running and waiting together. A request just
        # submitted counts as waiting until the engine thread admits it, so counting the queue alone would refuse a
        # second request while the first is still on its way into a free slot.
        capacity = self.engine.engine.config.max_num_seqs + max_queue
        if self.engine.num_running + self.engine.num_waiting + rows > capacity:
            raise APIError(
                503,
                f"The server is overloaded: its {capacity} places (max_num_seqs + max_queue) are taken. Retry shortly.",
                type="server_error",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )
        states = []
        for p_idx, prompt in enumerate(prompts):
            limit = self.config.max_prompt_tokens
            if limit is not None and len(prompt) > limit:
                raise bad_request(
                    f"The prompt is {len(prompt)} tokens; this server accepts at most {limit}.",
                    param=prompt_param,
                    code="prompt_too_long",
                )
            params = self.sampling_params(req, max_tokens, len(prompt))
            if per_prompt > req.n:  # best_of ranks the rows by verification passes, then their log-probabilities
                logprobs = 0 if params.logprobs is None else params.logprobs
                params = params.with_changes(verify=BEST_OF_VERIFY_PASSES, logprobs=logprobs)
            for i in range(per_prompt):
                choice_params = params
                if params.seed is not None and (p_idx or i):
                    # Distinct but reproducible streams per row.
                    choice_params = params.with_changes(seed=(params.seed + p_idx * per_prompt + i) % 2**63)
                for v, variant in enumerate(variants or [None]):
                    row_params = choice_params
                    if variant is not None and variant.max_tokens is not None:
                        row_params = choice_params.with_changes(max_tokens=variant.max_tokens)
                    try:
                        state = self.engine.engine.make_request(
                            prompt,
                            row_params,
                            grammar=grammar.deep_copy() if grammar is not None else None,
                            constraints=variant.constraints if variant is not None else None,
                            images=images.copy() if images is not None else None,
                        )
                    except ContextLengthError as exc:
                        param = variant_param if variant is not None and variant.max_tokens else prompt_param
                        raise bad_request(str(exc), param=param, code="context_length_exceeded") from exc
                    except ImageInputError as exc:
                        raise bad_request(str(exc), param=prompt_param, code="invalid_image") from exc
                    except SamplingParamsError as exc:
                        param = prompt_param if exc.param == "prompt" else exc.param
                        raise bad_request(str(exc), param=param) from exc
                    state.bills_prompt = i == 0 and v == 0
                    states.append(state)
        return states

    # ------------------------------------------------------------ generation

    async def merged_events(self, states: list[DenoiseState]) -> AsyncIterator[tuple[int, Event]]:
        """Events of all choices as they come, tagged with the choice index."""
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        async def pump(index: int, state: DenoiseState) -> None:
            try:
                async for event in self.engine.generate(state):
                    await queue.put((index, event))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await queue.put((index, FinishEvent("error", len(state.prompt_ids), 0, 0, 0, 0.0, error=str(exc))))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(states)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout if self.config.request_timeout > 0 else None
        try:
            remaining = len(states)
            while remaining:
                if self.state is not None and self.state.cutting:
                    raise RequestCut(shutdown_error())
                # Wake at least every CUT_POLL_S to see whether the shutdown timeout has run out.
                wait = CUT_POLL_S if deadline is None else min(CUT_POLL_S, max(0.0, deadline - loop.time()))
                # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that arrives as the
                # queue hands over an event, and a client's disconnect would then not stop the engine (gh-86296).
                try:
                    async with asyncio.timeout(wait):
                        index, event = await queue.get()
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        raise RequestCut(timeout_error(self.config.request_timeout)) from None
                    continue
                yield index, event
                if isinstance(event, FinishEvent):
                    remaining -= 1
        finally:
            for task in tasks:
                task.cancel()

    async def choice_events(
        self, states: list[DenoiseState], best: BestOf | None
    ) -> AsyncIterator[tuple[int, Event, int | None]]:
        """Events per choice, and the best_of candidate a draft comes from: the rows' own events, or best_of's
        grouping of them."""
        if best is not None:
            async for item in best.events(self.merged_events(states)):
                yield item
            return
        async for index, event in self.merged_events(states):
            yield index, event, None

    async def collect(
        self, states: list[DenoiseState], request: Request, best: BestOf | None = None
    ) -> list[ChoiceResult]:
        """Run to completion; a client that disconnects cancels its requests."""
        results = [ChoiceResult() for _ in range(best.choices if best is not None else len(states))]

        async def consume() -> None:
            async for index, event, _ in self.choice_events(states, best):
                if isinstance(event, CommitEvent):
                    results[index].text.append(event.text)
                    results[index].logprobs.extend(event.logprobs or [])
                elif isinstance(event, FinishEvent):
                    results[index].text.append(event.text)
                    results[index].finish = event

        async def disconnected() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        work = asyncio.create_task(consume())
        watch = asyncio.create_task(disconnected())
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
        if work not in done:
            raise APIError(499, "Client closed the request.", code="client_closed_request")
        try:
            work.result()
        except RequestCut as cut:
            raise cut.error from None
        for r in results:
            if r.finish is not None and r.finish.finish_reason == "error":
                raise engine_error(r.finish.error)
        return results

    @staticmethod
    def usage(prompt_tokens: int, finishes: list[FinishEvent | None]) -> dict:
        done = [f for f in finishes if f is not None]
        completion = sum(f.completion_tokens for f in done)
        usage: dict = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        predicted = [f for f in done if f.accepted_prediction_tokens is not None]
        if predicted:  # predicted outputs, as OpenAI reports them
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": sum(f.accepted_prediction_tokens for f in predicted),
                "rejected_prediction_tokens": sum(f.rejected_prediction_tokens for f in predicted),
            }
        return usage

    def log_details(
        self, request: Request, req: DiffusionParams, prompt_tokens: int, finishes: list[FinishEvent | None]
    ) -> None:
        """What the middleware's JSON request log line says about the generation."""
        done = [f for f in finishes if f is not None]
        request.state.log.update(
            model=self.model_name,
            stream=bool(req.stream),
            choices=len(finishes),
            prompt_tokens=prompt_tokens,
            completion_tokens=sum(f.completion_tokens for f in done),
            canvases=sum(f.canvases for f in done),
            passes=sum(f.passes for f in done),
            finish_reason=",".join(f.finish_reason for f in done) or "abort",
        )

    def token_text(self, token_id: int) -> str:
        """One token's text on its own (special tokens by name), cached per id."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def draft(self, event: PassEvent, tokens: bool = False, **extra) -> dict:
        """A pass's `draft` object; fixed spans, candidate and hole only where they apply; per-position tokens
        and acceptance when the client asked for them."""
        if tokens:
            extra.update(
                tokens=[self.token_text(t) for t in event.argmax_ids],
                accepted=[int(a) for a in event.accepted_mask],
                fixed=event.fixed_positions or [],
            )
        return Draft(
            canvas_index=event.canvas_index,
            pass_index=event.pass_index,
            text=event.draft_text or "",
            accepted_fraction=round(event.accepted_fraction, 4),
            mean_entropy=round(event.mean_entropy, 4),
            fixed_spans=event.fixed_spans,
            **extra,
        ).model_dump(exclude_none=True)

    @staticmethod
    def stats(finish: FinishEvent, best: BestOf | None = None, choice: int = 0) -> dict:
        """A finished choice's `diffusion` object (with best_of: the candidates it was picked from)."""
        return DiffusionStats(
            canvases=finish.canvases,
            passes=finish.passes,
            tokens_per_forward=round(finish.tokens_per_forward, 4),
            best_of=best.details[choice] if best is not None else None,
        ).model_dump(exclude_none=True)

    # ------------------------------------------------------------- responses

    def chat_message(self, parsed: ParsedAnswer) -> dict:
        message: dict = {"role": "assistant", "content": parsed.content, "refusal": None}
        if parsed.tool_calls:
            message["content"] = parsed.content or None
            message["tool_calls"] = parsed.tool_calls
        if parsed.reasoning is not None:  # under both names clients read
            message["reasoning"] = message["reasoning_content"] = parsed.reasoning
        return message

    async def respond(
        self,
        req: DiffusionParams,
        states: list[DenoiseState],
        prompt_tokens: int,
        request: Request,
        chat: bool,
        prompt_text: str = "",
    ) -> dict | EventSourceResponse:
        """`prompt_tokens` bills each distinct prompt once, as OpenAI does for n > 1. `prompt_text` is a chat
        prompt, which the answer parser reads as the start of the assistant's turn."""
        best = self.best_of(req, states)
        if req.stream:
            return EventSourceResponse(
                self.stream(req, states, prompt_tokens, chat, request, prompt_text, best),
                sep="\n",
                ping=15,
                headers={"X-Accel-Buffering": "no"},
            )
        results = await self.collect(states, request, best)
        self.log_details(request, req, prompt_tokens, [r.finish for r in results])
        created = int(time.time())
        want_logprobs = self.logprobs_wanted(req) is not None
        choices = []
        for i, r in enumerate(results):
            text = "".join(r.text)
            reason = r.finish.finish_reason
            logprobs = None
            if want_logprobs:
                fmt = self.logprob_formatter
                logprobs = fmt.chat(r.logprobs) if chat else fmt.completion(r.logprobs, 0)[0]
            if chat:
                parsed = self.chat_format.parse(text, prompt_text, self.chat_format.declared_tools(req))
                if parsed.tool_calls and reason == "stop":
                    reason = "tool_calls"
                choices.append(
                    {
                        "index": i,
                        "message": self.chat_message(parsed),
                        "finish_reason": reason,
                        "logprobs": logprobs,
                        "diffusion": self.stats(r.finish, best, i),
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": text,
                        "finish_reason": reason,
                        "logprobs": logprobs,
                        "diffusion": self.stats(r.finish, best, i),
                    }
                )
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": self.model_name,
            "choices": choices,
            "usage": self.usage(prompt_tokens, [r.finish for r in results]),
        }

    async def stream(
        self,
        req: DiffusionParams,
        states: list[DenoiseState],
        prompt_tokens: int,
        chat: bool,
        request: Request,
        prompt_text: str = "",
        best: BestOf | None = None,
    ) -> AsyncIterator[dict]:
        """SSE events: role first, a draft per pass, content per commit, one finish per choice, usage, [DONE].
        With best_of, a choice's content comes whole when its prompt's candidates are done."""
        choices = best.choices if best is not None else len(states)
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict], usage: dict | None = None, final_usage: bool = False) -> dict:
            body = {
                "id": cid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": choices,
            }
            if include_usage:
                body["usage"] = usage if final_usage else None
            return {"data": dump(body)}

        def choice(index: int, content: str | dict | None, finish: str | None = None, **extra: object) -> dict:
            """A chat choice's delta is `content` as text, or a whole delta dict (reasoning, tool calls)."""
            extra = {"logprobs": None, **extra}
            if chat:
                delta = content if isinstance(content, dict) else {} if content is None else {"content": content}
                return {"index": index, "delta": delta, "finish_reason": finish, **extra}
            return {"index": index, "text": content or "", "finish_reason": finish, **extra}

        if chat:
            for i in range(choices):
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
        finishes: list[FinishEvent | None] = [None] * choices
        try:
            parsers = (
                [self.chat_format.stream(prompt_text, self.chat_format.declared_tools(req)) for _ in range(choices)]
                if chat
                else None
            )
            async for item in self._stream_events(req, states, best, parsers, finishes, chunk, choice):
                yield item
        except RequestCut as cut:
            yield {"data": dump(cut.error.body())}
            yield {"data": "[DONE]"}
            return
        except Exception:  # a bug must not cut a started stream mid-chunk: the client gets the error as an event
            log.exception("stream failed")
            for state in states:
                state.cancelled.set()
            yield {"data": dump(internal_error().body())}
            yield {"data": "[DONE]"}
            return
        finally:
            self.log_details(request, req, prompt_tokens, finishes)
        if any(f is not None and f.finish_reason == "error" for f in finishes):
            return
        if include_usage:
            yield chunk([], self.usage(prompt_tokens, finishes), final_usage=True)
        yield {"data": "[DONE]"}

    async def _stream_events(self, req, states, best, parsers, finishes, chunk, choice) -> AsyncIterator[dict]:
        """`parsers`: one chat answer parser per choice (None for completions), turning text into deltas."""
        chat = parsers is not None
        draft_tokens = bool(req.stream_options and req.stream_options.include_draft_tokens)
        offsets = [0] * len(finishes)  # completions' text_offset runs on across a choice's chunks
        async for index, event, candidate in self.choice_events(states, best):
            if isinstance(event, PassEvent):
                if event.draft_text is not None:
                    draft = self.draft(event, tokens=draft_tokens, candidate=candidate)
                    yield chunk([choice(index, None, draft=draft)])
            elif isinstance(event, CommitEvent):
                deltas: list = parsers[index].feed(event.text) if chat else [event.text] if event.text else []
                if event.logprobs:  # with the content of the canvas they belong to (even if its text is held)
                    if chat:
                        logprobs = self.logprob_formatter.chat(event.logprobs)
                    else:
                        logprobs, offsets[index] = self.logprob_formatter.completion(event.logprobs, offsets[index])
                    first = deltas.pop(0) if deltas else ({"content": ""} if chat else "")
                    yield chunk([choice(index, first, logprobs=logprobs)])
                for delta in deltas:
                    yield chunk([choice(index, delta)])
            elif isinstance(event, FinishEvent):
                finishes[index] = event
                if event.finish_reason == "error":
                    yield {"data": dump(engine_error(event.error).body())}
                    yield {"data": "[DONE]"}
                    return
                reason = event.finish_reason
                if chat:
                    for delta in parsers[index].feed(event.text, final=True):
                        yield chunk([choice(index, delta)])
                    if parsers[index].tool_calls and reason == "stop":
                        reason = "tool_calls"
                    yield chunk([choice(index, None, reason, diffusion=self.stats(event, best, index))])
                else:
                    yield chunk([choice(index, event.text or None, reason, diffusion=self.stats(event, best, index))])
