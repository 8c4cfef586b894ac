"""The engine heartbeat: schedule, run one denoising pass per running request, post-process.

Synchronous and single-threaded on purpose; `AsyncEngine` runs it on its own thread. Each call to
`step()` advances every running request by exactly one decoder pass, so concurrent requests make progress
together and a cancelled one is dropped at the next pass boundary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine import batch_sampler, denoise, verify
from engine.compiled import history_depth
from engine.config import EngineConfig
from engine.constraints import CanvasConstraints
from engine.detokenizer import TextStream
from engine.events import CommitEvent, Event, FinishEvent, PassEvent, TokenLogprob
from engine.faults import FaultInjector
from engine.grammar import GrammarCompiler, GrammarConstraint
from engine.images import ImageInputError, PromptImages
from engine.loader import LoadedModel, load_model
from engine.memory_plan import KVBudget
from engine.metrics import EngineMetrics
from engine.model_runner import ModelRunner
from engine.prefix_cache import PrefixCache
from engine.request import DenoiseState, RequestStatus
from engine.sampling_params import SamplingParams, SamplingParamsError
from engine.scheduler import Scheduler

log = logging.getLogger("press.engine")


@dataclass(frozen=True)
class PassOutcome:
    """What one pass decided for one row, handed from the sampler to the bookkeeping."""

    argmax_ids: list[int]
    accepted: int
    accepted_mask: list[bool]
    mean_entropy: float
    stable: bool
    confident: bool


class ContextLengthError(ValueError):
    """Prompt plus max_tokens do not fit the model's context."""


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.loaded = loaded or load_model(config)
        self.tokenizer = self.loaded.tokenizer
        compiled = config.compile if config.compile is not None else self.loaded.device.type == "cuda"
        batch_invariant = config.batch_invariant if config.batch_invariant is not None else not compiled
        if compiled and batch_invariant:
            raise ValueError(
                "compile and batch_invariant cannot both be on: compiled passes use stock kernels on padded batches"
            )
        self.runner = ModelRunner(self.loaded, batch_invariant=batch_invariant)
        if compiled:
            start = time.perf_counter()
            self.runner.compile(config.max_num_seqs)
            log.info("compiled passes ready in %.1f s (batch buckets %s)", time.perf_counter() - start,
                     self.runner.compiled.buckets)  # fmt: skip
        self.prefix_cache = PrefixCache(config.prefix_cache_tokens)
        budget = self.loaded.kv_budget
        self.scheduler = Scheduler(config.max_num_seqs, KVBudget(self.loaded.plan, budget) if budget else None)
        self.canvas_length = self.loaded.canvas_length
        self.vocab_size = self.loaded.vocab_size
        self.max_model_len = self.loaded.max_model_len
        self.defaults = self.loaded.defaults
        self.metrics = EngineMetrics(config.served_model_name or config.model)
        self.metrics.bind_kv_usage(self.scheduler.kv_usage)
        self._grammars: GrammarCompiler | None = None
        self.faults = FaultInjector()
        self._grammars_lock = threading.Lock()

    # ----------------------------------------------------------------- requests

    @property
    def takes_images(self) -> bool:
        """Whether the model has a vision tower to read images with."""
        config = self.loaded.model.config
        has_tower = getattr(config, "vision_config", None) is not None
        return has_tower and getattr(config, "image_token_id", None) is not None

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
                "Please reduce the length of the prompt or max_tokens."
            )

    def default_max_tokens(self, prompt_len: int) -> int:
        return max(1, min(self.config.default_max_tokens, self.max_model_len - prompt_len))

    def compile_grammar(self, grammar: str):
        """A grammar matcher (llguidance grammar text, see engine/grammar.py) for `make_request`; raises
        GrammarError. Safe to call from any thread, and meant to be called off the engine thread: building a
        complex grammar can take a while, and no row should wait for another row's grammar."""
        return self._grammar_compiler().compile(grammar)

    def _grammar_compiler(self) -> GrammarCompiler:
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, list(self.defaults.eos_token_ids))
        return self._grammars

    def token_bytes(self, token_id: int) -> bytes:
        """A token's exact bytes (a byte-level token may hold part of a UTF-8 character; a special token gives
        its name), as the grammar engine's tokenizer table has them."""
        return self._grammar_compiler().lltokenizer.decode_bytes([token_id])

    def make_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        grammar=None,
        grammar_in_pass: bool = True,
        constraints: CanvasConstraints | None = None,
        images: PromptImages | None = None,
    ) -> DenoiseState:
        """Validate and build a request; raises SamplingParamsError, ContextLengthError or ImageInputError.
        `grammar` is a matcher from `compile_grammar` (owned by this request from now on); `grammar_in_pass` masks
        every pass, not only the committed canvas. `constraints`: fixed tokens and initial canvases of the row.
        `images`: the prompt's images (engine/images.py), whose soft tokens the prompt holds."""
        params.validate()
        if images is not None and not self.takes_images:
            raise ImageInputError("this model has no vision tower")
        if constraints is not None and constraints.fixed and grammar is not None:
            raise SamplingParamsError("grammar", "a grammar cannot be combined with fixed canvas positions")
        if constraints is not None and any(not (0 <= t < self.vocab_size) for t in constraints.fixed.values()):
            raise SamplingParamsError("constraints", f"fixed token ids must be in [0, {self.vocab_size})")
        if grammar is not None and not params.eos_token_ids:
            raise SamplingParamsError("ignore_eos", "`ignore_eos` cannot be combined with a grammar, which ends at EOS")
        if not prompt_ids:
            raise SamplingParamsError("prompt", "the prompt must contain at least one token")
        if any(not (0 <= t < self.vocab_size) for t in prompt_ids):
            raise SamplingParamsError("prompt", f"token ids must be in [0, {self.vocab_size})")
        self.check_length(len(prompt_ids), params.max_tokens)
        state = DenoiseState(
            prompt_ids=list(prompt_ids),
            params=params,
            text=TextStream(self.tokenizer, list(params.stop), skip_special_tokens=params.skip_special_tokens),
        )
        if request_id:
            state.request_id = request_id
        state.canvas_length = self.canvas_length
        generator = torch.Generator(device=self.loaded.device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        state.generator = generator
        state.constraints = constraints
        state.images = images
        if grammar is not None:
            state.grammar = GrammarConstraint(grammar, self.vocab_size, list(params.eos_token_ids), grammar_in_pass)
        return state

    def add_request(self, state: DenoiseState) -> None:
        self.scheduler.add(state)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---------------------------------------------------------------- heartbeat

    def step(self, emit: Callable[[DenoiseState, Event], None]) -> None:
        """Schedule, advance prefills by at most one chunk budget, then one batched pass for every row."""
        admitted, dropped = self.scheduler.schedule()
        for state in admitted:
            self.metrics.admitted(state)
        if dropped:
            self.runner.release_prefix()
        for state in dropped:
            self._finish(state, "abort", emit)
        self._prefill(emit)
        rows = [s for s in self.scheduler.running if s.status is RequestStatus.DENOISING]
        if rows:
            try:
                self._denoise_pass(rows, emit)
            except Exception as exc:  # a failed pass fails its rows, not the engine
                log.exception("pass failed")
                self.runner.release_prefix()
                for state in rows:
                    if state.status is not RequestStatus.FINISHED:
                        self._finish(state, "error", emit, error=str(exc))

    def _prefill(self, emit: Callable[[DenoiseState, Event], None]) -> None:
        """Chunked prefill: each step encodes at most `prefill_chunk` prompt tokens in total, so a long prompt
        delays the running canvases by one chunk per pass instead of by its whole prefill.

        A request's chunks always start at multiples of `prefill_chunk` of its own prompt, whoever else is
        prefilling, so its cache (and therefore its tokens) does not depend on the batch.
        """
        budget = size = self.config.prefill_chunk
        for state in list(self.scheduler.running):
            if state.status is not RequestStatus.PREFILLING:
                continue
            try:
                if state.cache is None:  # first chunk: start from the longest cached prefix of the prompt
                    # Batch invariance promises the same tokens warm or cold: the restored prefix then ends where
                    # a cold prefill's chunk ends, so every later chunk has the cold one's shape.
                    ends = self._chunk_ends(state) if self.runner.batch_invariant else None
                    hit = self.runner.start_cache(state, self.prefix_cache, ends)
                    self.metrics.prefix_lookup(len(state.prompt_ids), hit)
                chunk = self._chunk_end(state, state.cached_len) - state.cached_len
                if chunk > budget and budget < size:
                    break  # keep FIFO order: the next request waits for the next step
                budget -= self.runner.prefill(state, chunk)
                if state.cached_len == len(state.prompt_ids):
                    self.runner.finish_prefill(state, self.prefix_cache)
                    state.status = RequestStatus.DENOISING
                    self.metrics.prefilled(state)
                    self._start_canvas(state)
            except Exception as exc:  # a bad request must not take the engine down
                log.exception("prefill failed for %s", state.request_id)
                self._finish(state, "error", emit, error=str(exc))

    def _chunk_end(self, state: DenoiseState, start: int) -> int:
        """Where the prefill chunk that starts at `start` ends: at the next multiple of `prefill_chunk` of the
        prompt (with or without a cached prefix) or the prompt's end, past any image it would cut (an image's
        tokens may attend to each other)."""
        size = self.config.prefill_chunk
        end = min(start - start % size + size, len(state.prompt_ids))
        return state.images.chunk_end(start, end) if state.images is not None else end

    def _chunk_ends(self, state: DenoiseState) -> list[int]:
        """Every chunk end of the request's prefill from an empty cache."""
        ends = [0]
        while ends[-1] < len(state.prompt_ids):
            ends.append(self._chunk_end(state, ends[-1]))
        return ends[1:]

    # ----------------------------------------------------------- denoising math

    def _start_canvas(self, state: DenoiseState) -> None:
        """Fresh canvas of uniform noise, no self-conditioning, empty stability history."""
        state.canvas = denoise.random_canvas(self.canvas_length, self.vocab_size, state.generator, self.loaded.device)
        if state.constraints is not None:  # a prediction's tokens and fixed ones over the noise
            state.canvas = state.constraints.start_canvas(state.canvas, state.canvas_index)
        state.argmax_canvas = state.canvas
        state.self_conditioning = None
        state.pass_index = 0
        state.history = torch.full(
            (state.params.stability_threshold, self.canvas_length), -1, dtype=torch.long, device=self.loaded.device
        )
        if state.grammar is not None:
            state.grammar.start_canvas()

    def _denoise_pass(self, rows: list[DenoiseState], emit: Callable[[DenoiseState, Event], None]) -> None:
        start = time.perf_counter()
        self.faults.before_pass()
        logits = self.runner.denoise_logits(rows)
        # Events wait until the pass is recorded, so a client that sees its answer also sees it in /metrics.
        events: list[tuple[DenoiseState, Event]] = []
        try:
            # Rows are independent, but they sample on the engine thread: a thread pool made every later
            # forward ~4x slower on CPU (each calling thread brings its own OpenMP team to fight over the cores).
            if self.runner.compiled is not None and all(self._plain(s) for s in rows):
                outcomes = self._sample_compiled(rows, logits)
            else:
                outcomes = self._sample_rows(rows, logits)
            # Rows keep self-conditioning in the model's dtype (a copy under bf16): let the fp32 batch go before
            # the commit pass runs.
            del logits

            def record(state: DenoiseState, event: Event) -> None:
                events.append((state, event))

            done: list[tuple[DenoiseState, PassOutcome, list[int]]] = []  # canvases this pass finished
            for state, outcome in zip(rows, outcomes, strict=True):
                if state.total_passes == 0:
                    self.metrics.first_pass(state)
                canvas_ids = self._after_pass(state, outcome, record)
                if canvas_ids is not None:
                    done.append((state, outcome, canvas_ids))
            # Rows that asked are scored by more passes over their finished canvases (engine/verify.py), batched
            # by their number of verification passes.
            scores: dict[int, list[float]] = {}
            for passes in sorted({s.params.verify for s, _, _ in done if s.params.verify}):
                checked = [(s, ids) for s, _, ids in done if s.params.verify == passes]
                verified = verify.canvas_logprobs(self.runner, checked, passes)
                scores.update({id(s): v for (s, _), v in zip(checked, verified, strict=True)})
            to_commit: list[tuple[DenoiseState, list[int]]] = []
            for state, outcome, canvas_ids in done:
                if self._commit_canvas(state, canvas_ids, record, scores.get(id(state))):
                    to_commit.append((state, outcome.argmax_ids))
            if to_commit:
                self._commit_canvases(to_commit)
            self.metrics.batched_pass(len(rows), self.canvas_length, time.perf_counter() - start)
        finally:  # even when a row fails, the events already produced reach their clients
            for state, event in events:
                emit(state, event)

    def _sample_row(self, state: DenoiseState, logits: torch.Tensor) -> PassOutcome:
        """One row's pass decisions (the batched sampler on a batch of one)."""
        return self._sample_rows([state], logits[None])[0]

    @staticmethod
    def _plain(state: DenoiseState) -> bool:
        """A row whose logits need no per-row processing (top-p, grammar masks, fixed positions)."""
        in_pass_grammar = state.grammar is not None and state.grammar.in_pass
        return state.constraints is None and not in_pass_grammar and state.params.top_p >= 1.0

    @staticmethod
    def _outcomes(stats: list[list[float]], ids: list[list[int]], masks: list[list[bool]]) -> list[PassOutcome]:
        """A pass's host copy (per row: accepted, mean entropy, stable, confident; argmax ids; acceptance) as
        outcomes."""
        return [
            PassOutcome(ids[i], int(a), masks[i], mean_entropy=m, stable=bool(st), confident=bool(c))
            for i, (a, m, st, c) in enumerate(stats)
        ]

    @staticmethod
    def _temperatures(rows: list[DenoiseState]) -> torch.Tensor:
        """Each row's temperature at this pass (1 for greedy rows), float32 as the reference computes it."""
        temps = []
        for state in rows:
            params = state.params
            if params.greedy:
                temps.append(torch.ones((), dtype=torch.float32))
            else:
                steps_remaining = params.denoising_steps - state.pass_index
                temps.append(
                    denoise.pass_temperature(steps_remaining, params.denoising_steps, params.t_min, params.t_max)
                )
        return torch.stack(temps)

    @torch.inference_mode()
    def _sample_compiled(self, rows: list[DenoiseState], logits: torch.Tensor) -> list[PassOutcome]:
        """`_sample_rows` for plain rows, as one compiled graph over the batch's bucket (engine/batch_sampler.py):
        the rows' random draws first, from their own generators in the eager order, then all the math at once."""
        compiled, device = self.runner.compiled, logits.device
        n, bucket = len(rows), compiled.bucket(len(rows))
        pad = bucket - n
        greedy = [s.params.greedy for s in rows]
        draws = batch_sampler.draw(compiled.draws(bucket), [s.generator for s in rows], greedy, self.vocab_size)
        depth = history_depth(max(s.history.shape[0] for s in rows))
        history = torch.full((bucket, depth, self.canvas_length), -1, dtype=torch.long, device=device)
        valid = torch.zeros((bucket, depth), dtype=torch.bool, device=device)
        for i, s in enumerate(rows):  # a row's own threshold looks at the last of the `depth` canvases
            if s.history.shape[0]:
                history[i, depth - s.history.shape[0] :] = s.history
                valid[i, depth - s.history.shape[0] :] = True

        def column(values, fill, dtype=torch.float32):
            return torch.tensor(list(values) + [fill] * pad, dtype=dtype, device=device)

        if pad:
            logits = torch.cat([logits, logits.new_zeros((pad, *logits.shape[1:]))])
        canvas, argmax, accepted, history, processed, stats = compiled.sample(
            logits,
            draws,
            temperature=torch.cat([self._temperatures(rows).to(device), column([], 1.0)]),
            greedy=column(greedy, True, torch.bool),
            entropy_bound=column((s.params.entropy_bound for s in rows), 0.0),
            history=history,
            history_valid=valid,
            confidence_threshold=column((s.params.confidence_threshold for s in rows), 0.0),
        )
        for i, state in enumerate(rows):
            state.canvas = canvas[i]
            state.argmax_canvas = argmax[i]
            state.history = history[i, depth - state.history.shape[0] :]
            state.self_conditioning = processed[i]
        stats, ids, masks = stats[:n].tolist(), argmax[:n].tolist(), accepted[:n].tolist()
        return self._outcomes(stats, ids, masks)

    @torch.inference_mode()
    def _sample_rows(self, rows: list[DenoiseState], logits: torch.Tensor) -> list[PassOutcome]:
        """Schedule, propose, accept, renoise, stop check and self-conditioning for every row of a pass.

        The math that is the same for every row runs once over the batch (temperature scaling, argmax,
        entropies, acceptance, the stop rule's statistics); what is a row's own runs per row: its random draws
        (each row owns a generator), its grammar and canvas constraints. The host sees one copy per pass (the
        argmax canvases and four numbers per row). `logits` is the batch's fp32 logits, scaled in place, so a
        row's only canvas x vocab fp32 tensor stays the one the model produced.
        """
        device = logits.device
        processed = logits.div_(self._temperatures(rows).to(device)[:, None, None])  # x / 1 is exact for greedy rows
        walks: list[list[int]] = []
        for i, state in enumerate(rows):
            if state.constraints is not None:  # fixed positions: one-hot logits, so zero entropy and always accepted
                if state.constraints.holes:
                    state.fixed_logprob = state.constraints.fixed_logprob(processed[i], state.canvas_index)
                state.constraints.mask_logits(processed[i], state.canvas_index)
            walk: list[int] = []
            if state.grammar is not None and state.grammar.in_pass:
                # The grammar's walk over this pass: masked logits everywhere it reached, so proposals, entropies
                # and acceptance all see only what the grammar allows (a forced position has zero entropy).
                walk = state.grammar.walk(processed[i], state.params.max_tokens - len(state.answer_ids))
                state.grammar.mask_logits(processed[i], len(walk))
            walks.append(walk)
        proposed = [
            denoise.propose_canvas(processed[i], s.params.greedy, s.params.top_p, s.generator)
            for i, s in enumerate(rows)
        ]
        argmax_canvas = processed.argmax(dim=-1)
        for i, walk in enumerate(walks):
            if walk:  # the walk is the argmax over the allowed tokens; ties go its way
                argmax_canvas[i, : len(walk)] = torch.tensor(walk, device=device)
        entropy = denoise.token_entropy(processed)
        bounds = torch.tensor([s.params.entropy_bound for s in rows], dtype=entropy.dtype, device=device)
        accepted = denoise.accept_mask(entropy, bounds[:, None])
        stable = []
        for i, state in enumerate(rows):
            if state.constraints is not None:
                state.constraints.force_accept_(accepted[i], state.canvas_index)
            state.canvas = denoise.renoise(state.canvas, proposed[i], accepted[i], self.vocab_size, state.generator)
            stable.append(denoise.stable_flag(state.history, argmax_canvas[i]))
            state.history = denoise.push_history(state.history, argmax_canvas[i])
            state.self_conditioning = processed[i].to(self.runner.sc_dtype)
            state.argmax_canvas = argmax_canvas[i]
        means = torch.stack([entropy[i].mean() for i in range(len(rows))])
        thresholds = torch.tensor([s.params.confidence_threshold for s in rows], dtype=means.dtype, device=device)
        stats = torch.stack(
            [
                accepted.sum(dim=-1).to(means.dtype),
                means,
                torch.stack(stable).to(means.dtype),
                denoise.confident_flags(means, thresholds).to(means.dtype),
            ],
            dim=1,
        ).tolist()  # the pass's one copy to the host, with the argmax canvases and acceptance below
        ids, masks = argmax_canvas.tolist(), accepted.tolist()
        return self._outcomes(stats, ids, masks)

    def _after_pass(self, state: DenoiseState, outcome: PassOutcome, emit: Callable) -> list[int] | None:
        """Count the pass and report it; when the canvas is done, the canvas to commit (`_commit_canvas`)."""
        params = state.params
        state.pass_index += 1
        state.total_passes += 1
        emit(
            state,
            PassEvent(
                canvas_index=state.canvas_index,
                pass_index=state.pass_index - 1,
                argmax_ids=outcome.argmax_ids,
                accepted=outcome.accepted,
                accepted_mask=outcome.accepted_mask,
                canvas_length=self.canvas_length,
                mean_entropy=outcome.mean_entropy,
                **(self._draft(state, outcome.argmax_ids) if params.include_drafts else {}),
            ),
        )
        if (outcome.stable and outcome.confident) or state.pass_index >= params.denoising_steps:
            canvas_ids = outcome.argmax_ids
            if state.grammar is not None and not state.grammar.in_pass:
                # Commit-only: the committed canvas is the grammar's walk over the last pass's logits.
                walk = state.grammar.walk(state.self_conditioning.float(), params.max_tokens - len(state.answer_ids))
                canvas_ids = walk + canvas_ids[len(walk) :]
            return canvas_ids
        return None

    def _draft(self, state: DenoiseState, ids: list[int]) -> dict:
        """The draft of an argmax canvas: its text up to EOS, and the character spans of its fixed tokens."""
        eos = set(state.params.eos_token_ids)
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        c = state.constraints
        if c is not None and c.end is not None:  # a template's canvas runs to the template's end, holes and all
            cut = max(0, min(len(ids), c.end - state.canvas_index * len(ids)))
        fixed = c.fixed_positions(state.canvas_index, len(ids)) if c is not None else []
        if not fixed:
            return {"draft_text": self.tokenizer.decode(ids[:cut], skip_special_tokens=True)}
        # Runs of fixed and free positions decode separately (a segment boundary is a token boundary).
        fixed_set = set(fixed)
        text, spans, start = "", [], 0
        while start < cut:
            kind = start in fixed_set
            stop = start
            while stop < cut and (stop in fixed_set) == kind:
                stop += 1
            piece = self.tokenizer.decode(ids[start:stop], skip_special_tokens=True)
            if kind and piece:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
            start = stop
        return {"draft_text": text, "fixed_spans": spans, "fixed_positions": fixed}

    # ------------------------------------------------------------ post-process

    def _commit_canvas(
        self, state: DenoiseState, canvas_ids: list[int], emit: Callable, verified: list[float] | None = None
    ) -> bool:
        """Commit the argmax canvas: cut at EOS, stop strings and max_tokens (and where a template ends, with the
        fillers written in its holes dropped). Finishes the request, or returns True when it continues (its
        canvas is then encoded with the pass's other finished ones). `verified`: the canvas's verification
        log-probabilities, per canvas position (rows with params.verify)."""
        params = state.params
        positions = list(range(len(canvas_ids)))  # canvas position of each answer candidate token
        template_ends = False
        c = state.constraints
        fixed = c.fixed if c is not None else {}  # by answer position; this canvas starts at `lo`
        lo = state.canvas_index * self.canvas_length
        if c is not None:
            if c.holes:
                total, count = c.hole_logprob(state.self_conditioning, state.canvas_index, canvas_ids)
                state.template_logprob += total + state.fixed_logprob[0]
                state.template_tokens += count + state.fixed_logprob[1]
            positions, template_ends = c.answer_positions(state.canvas_index, canvas_ids)
            canvas_ids = [canvas_ids[p] for p in positions]
        eos = set(params.eos_token_ids)
        eos_at = next((i for i, t in enumerate(canvas_ids) if t in eos), None)
        kept = canvas_ids if eos_at is None else canvas_ids[: eos_at + 1]
        pad = self.loaded.model.config.get_text_config().pad_token_id
        # tokens_per_forward as transformers defines it: denoised tokens up to EOS, pads excluded (and tokens a
        # template fixed, which were never denoised).
        state.denoised_tokens += sum(
            1 for p, t in zip(positions, kept, strict=False) if t != pad and lo + p not in fixed
        )

        room = params.max_tokens - len(state.answer_ids)
        answer = kept[:room]
        finish = None
        if eos_at is not None and eos_at < room:
            finish = "stop"
        elif template_ends and len(kept) <= room:
            finish = "stop"  # the template is complete
        elif len(kept) > room or len(state.answer_ids) + len(answer) >= params.max_tokens:
            finish = "length"
        before = len(state.answer_ids)
        state.answer_ids.extend(answer)
        # The EOS token counts as generated (as in vLLM) but has no text.
        delta, stop_match = state.text.add([t for t in answer if t not in eos])
        if stop_match is not None:
            # Cut the answer right after the tokens that produce the text before the stop string.
            finish = "stop"
            state.answer_ids = list(state.text.token_ids)
            answer = state.answer_ids[before:]
        positions = positions[: len(answer)]
        if fixed:
            state.fixed_answer_tokens += sum(1 for p in positions if lo + p in fixed)
        if c is not None and c.predicted:
            state.accepted_prediction_tokens += c.accepted_prediction(
                state.canvas_index, self.canvas_length, positions, answer
            )
        if verified is not None:
            scored = [verified[p] for p, t in zip(positions, answer, strict=True) if t not in eos]
            state.verified_logprob += sum(scored)
            state.verified_tokens += len(scored)
        self.metrics.committed(state, state.pass_index)
        logprobs = self._logprobs(state, answer, positions) if params.logprobs is not None else None
        emit(state, CommitEvent(state.canvas_index, answer, delta, state.pass_index, logprobs))
        state.canvas_index += 1
        if finish is None and state.canvas_index >= state.max_canvases:
            finish = "length"
        if finish is not None:
            self._finish(state, finish, emit)
            return False
        return True

    @torch.inference_mode()
    def _logprobs(self, state: DenoiseState, answer: list[int], positions: list[int]) -> list[TokenLogprob]:
        """Log-probabilities of a committed canvas's answer tokens (at canvas `positions`) under the committing
        pass's sampling distribution: its logits at that pass's temperature (unscaled at temperature 0), after
        any grammar mask; these are the logits the row kept for self-conditioning. EOS is not reported."""
        eos = set(state.params.eos_token_ids)
        k = state.params.logprobs
        ids = torch.tensor(answer, dtype=torch.long, device=self.loaded.device)
        index = torch.tensor(positions, dtype=torch.long, device=self.loaded.device)
        chosen, top_ids, top_lp = denoise.token_logprobs(state.self_conditioning[index], ids, k)
        chosen, top_ids, top_lp = chosen.tolist(), top_ids.tolist(), top_lp.tolist()
        return [
            # A grammar can leave fewer than k tokens possible: alternatives at -inf are not alternatives.
            TokenLogprob(t, chosen[i], [(a, lp) for a, lp in zip(top_ids[i], top_lp[i], strict=True) if lp > -1e30])
            for i, t in enumerate(answer)
            if t not in eos
        ]

    def _commit_canvases(self, finished: list[tuple[DenoiseState, list[int]]]) -> None:
        """One batched encoder pass over the canvases finished in this pass, then a fresh canvas for each."""
        self.runner.commit([(s, torch.tensor(ids, device=self.loaded.device)) for s, ids in finished])
        for state, _ in finished:
            self._start_canvas(state)

    def _finish(self, state: DenoiseState, reason: str, emit: Callable, error: str | None = None) -> None:
        self.scheduler.finish(state)
        state.finish_reason = reason
        tail = state.text.flush() if reason in ("stop", "length") else ""
        self.metrics.finished(state, reason, len(state.answer_ids))
        predicted = state.constraints.predicted if state.constraints is not None else 0
        state.cache = None  # frees the KV cache now, not when the last reference goes
        state.self_conditioning = None
        state.grammar = None
        emit(
            state,
            FinishEvent(
                finish_reason=reason,
                prompt_tokens=len(state.prompt_ids),
                completion_tokens=len(state.answer_ids),
                canvases=state.canvas_index,
                passes=state.total_passes,
                tokens_per_forward=state.tokens_per_forward,
                text=tail,
                error=error,
                template_logprob=state.template_logprob / state.template_tokens if state.template_tokens else None,
                fixed_tokens=state.fixed_answer_tokens
                if state.constraints is not None and state.constraints.fixed
                else None,
                accepted_prediction_tokens=state.accepted_prediction_tokens if predicted else None,
                rejected_prediction_tokens=predicted - state.accepted_prediction_tokens if predicted else None,
                verified_logprob=state.verified_logprob / state.verified_tokens if state.verified_tokens else None,
            ),
        )
