"""Compiled passes: the decoder forward and the batched sampler as static-shape graphs, one per batch bucket.

A pass over n rows runs at the smallest bucket (1, 2, 4, ... up to max_num_seqs) that holds them; the extra rows
are padding that sees only its own canvas and whose results are dropped. The rows' cached prefixes are gathered
left-padded to a multiple of LENGTH_MULTIPLE keys with a boolean mask that hides the padding; the prefix length
is a dynamic dimension of the graph, so a growing conversation never recompiles. Everything else (canvas,
vocabulary, batch) is static, which lets inductor fuse the small ops that dominate a pass. On CUDA the graphs
are also captured as CUDA graphs (`reduce-overhead`), one per bucket and prefix length.

Every bucket compiles when the engine starts (`warm_up`), so no request pays for a compile and /ready stays
503 until it is done; the compile cost per bucket is logged. The sampler's graphs are also per history depth
(rows' stability thresholds, rounded up to a power of two): the default's compile at startup, others at their
first request (logged). On CPU the graphs are precompiled functions called without Dynamo's dispatch (below).

Compiled passes use transformers' stock kernels (the batch-invariant row-wise attention and fixed-block experts
are eager-only): a row's tokens may differ in the last bits between batch sizes, as in vLLM.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch
import torch._dynamo

from engine import batch_sampler
from engine.sampling_params import DEFAULT_STABILITY_THRESHOLD

log = logging.getLogger("press.engine")

# Prefix keys are padded to a multiple of this: on CUDA it bounds the shapes (so the CUDA graphs) a growing
# prefix goes through; everywhere it keeps the padded copy's shapes few.
LENGTH_MULTIPLE = 128


def _no_guards(entries: list) -> list[bool]:
    """A guard filter keeping none (precompiled functions are called without guards)."""
    return [False] * len(entries)


def history_depth(threshold: int) -> int:
    """The history depth a sampler graph takes for rows with stability thresholds up to `threshold`: the next
    power of two (the missing canvases count as stable), so a client's thresholds (0 to 1024) make at most 12
    graphs per bucket."""
    return 0 if threshold <= 0 else 1 << (threshold - 1).bit_length()


def batch_buckets(max_rows: int) -> list[int]:
    """Powers of two up to `max_rows`, and `max_rows` itself."""
    buckets, b = [], 1
    while b < max_rows:
        buckets.append(b)
        b *= 2
    return [*buckets, max_rows]


class CompiledPasses:
    """`forward(canvas, sc, sc_mask, positions, masks, keys, values)` is the model's decoder pass on plain tensors
    (the prefix as per-layer key and value lists); it is compiled here, with the batched sampler."""

    def __init__(
        self,
        forward,
        device: torch.device,
        sc_dtype: torch.dtype,
        canvas_length: int,
        vocab_size: int,
        max_rows: int,
        fullgraph: bool = True,
    ) -> None:
        """`fullgraph=False` lets the forward break around modules that must run eagerly (quantized experts)."""
        self.device = device
        self.canvas_length = canvas_length
        self.vocab_size = vocab_size
        self.sc_dtype = sc_dtype
        self.buckets = batch_buckets(max_rows)
        self.cuda_graphs = self.device.type == "cuda"
        mode = "reduce-overhead" if self.cuda_graphs else None
        # One graph per bucket and function (and per stability threshold the sampler meets).
        limit = 4 * len(self.buckets) + 8
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
        # On CPU the graphs' wrappers are C++ (`cpp_wrapper`) rather than Python code calling each kernel: the
        # tiny models' passes are a few hundred small kernels, so that saved 17% of a batch-1 pass on average in
        # alternated runs (README).
        cpu_options = {"cpp_wrapper": True}
        # Precompiled graphs (CPU, whole-graph forwards): each bucket's decoder and each (bucket, history depth)
        # sampler is compiled ahead (`aot_compile`) into a function this object calls directly, without Dynamo's
        # dispatch. That dispatch (a cache lookup evaluating guards on every module of the model, twice a pass)
        # and its glue were over a third of a compiled tiny batch-1 pass on CPU (2.9 -> 1.5 ms per pass, README).
        # Dropping the guards is safe here, where dropping them from Dynamo's dispatch was not (Dynamo caches
        # graphs per code object, so a second engine in the process reran the first one's graph): these functions
        # belong to this object, read the model's weights at each call, and only ever see the shapes, dtypes and
        # devices they were compiled for, the prefix length being their one dynamic dimension.
        # A forward that breaks around eager modules (quantized experts) cannot be precompiled, and on CUDA the
        # CUDA graphs (`reduce-overhead`) come from Dynamo's dispatch, the path the GPU runs measured: those keep
        # Dynamo's dispatch with every guard.
        self.precompiled = fullgraph and not self.cuda_graphs
        if self.precompiled:
            kw = {"options": {**cpu_options, "guard_filter_fn": _no_guards}}
        else:
            kw = {"mode": mode} if self.cuda_graphs else {"options": cpu_options}
        self._forward_owner = getattr(forward, "__self__", None)  # a precompiled method takes its `self` first
        self._decode = torch.compile(forward, fullgraph=fullgraph, dynamic=False, **kw)
        self._sample = torch.compile(batch_sampler.sample_batch, fullgraph=True, dynamic=False, **kw)
        self._decoders: dict[int, Callable] = {}  # precompiled, per bucket
        self._samplers: dict[tuple[int, int], Callable] = {}  # precompiled, per bucket and history depth
        self._draws: dict[int, batch_sampler.Draws] = {}

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    # ------------------------------------------------------------------ decoder

    def decode(
        self,
        canvas: torch.Tensor,
        sc: torch.Tensor,
        sc_mask: torch.Tensor,
        positions: torch.Tensor,
        masks: dict[str, torch.Tensor],
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        """Logits (bucket, canvas, vocab) of one padded batch; the prefix length may be anything."""
        args = (canvas, sc, sc_mask, positions, masks, keys, values)
        bucket = canvas.shape[0]
        if self.precompiled and bucket in self._decoders:
            return self._decoders[bucket](*args)
        for t in (*keys, *values):
            torch._dynamo.mark_dynamic(t, 2)
        for m in masks.values():
            torch._dynamo.mark_dynamic(m, 3)
        if self.precompiled:
            self._decoders[bucket] = self._precompile(self._decode, args, {}, self._forward_owner)
            return self._decoders[bucket](*args)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._decode(*args)
        return logits.clone() if self.cuda_graphs else logits  # a CUDA graph's output is overwritten next replay

    @staticmethod
    def _precompile(compiled: Callable, args: tuple, kwargs: dict, owner: object = None) -> Callable:
        """`compiled` (a torch.compile wrapper) compiled now for these inputs, as a function without guards."""
        fn = compiled.aot_compile((args, kwargs))
        fn.disable_guard_check()
        return functools.partial(fn, owner) if owner is not None else fn

    # ------------------------------------------------------------------ sampler

    def draws(self, bucket: int) -> batch_sampler.Draws:
        if bucket not in self._draws:
            self._draws[bucket] = batch_sampler.Draws.empty(bucket, self.canvas_length, self.vocab_size, self.device)
        return self._draws[bucket]

    def sample(self, logits: torch.Tensor, draws: batch_sampler.Draws, **rows) -> tuple[torch.Tensor, ...]:
        """`batch_sampler.sample_batch` compiled, on a padded batch (`rows` are its per-row tensors)."""
        kwargs = dict(race=draws.race, noise=draws.noise, sc_dtype=self.sc_dtype, **rows)
        if self.precompiled:
            key = (logits.shape[0], rows["history"].shape[1])
            if key not in self._samplers:
                start = time.perf_counter()
                self._samplers[key] = self._precompile(self._sample, (logits,), kwargs)
                log.info("compiled the sampler for batch %d, history depth %d, in %.1f s", *key,
                         time.perf_counter() - start)  # fmt: skip
            return self._samplers[key](logits, **kwargs)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self._sample(logits, **kwargs)
        return tuple(t.clone() for t in out) if self.cuda_graphs else out

    # ------------------------------------------------------------------ startup

    def warm_up(self, layers: list[tuple[int, int, int]], layer_types: list[str]) -> None:
        """Compile every bucket now: a dummy pass (a prefix of LENGTH_MULTIPLE keys, all padding) through the
        decoder and the sampler. `layers` gives each layer's (kv heads, key dim, value dim)."""
        c, v = self.canvas_length, self.vocab_size
        depth = history_depth(DEFAULT_STABILITY_THRESHOLD)  # other thresholds compile at first use
        for bucket in self.buckets:
            start = time.perf_counter()
            keys = [
                torch.zeros((bucket, h, LENGTH_MULTIPLE, kd), dtype=self.sc_dtype, device=self.device)
                for h, kd, _ in layers
            ]
            values = [
                torch.zeros((bucket, h, LENGTH_MULTIPLE, vd), dtype=self.sc_dtype, device=self.device)
                for h, _, vd in layers
            ]
            visible = torch.ones((bucket, 1, c, LENGTH_MULTIPLE + c), dtype=torch.bool, device=self.device)
            visible[..., :LENGTH_MULTIPLE] = False
            masks = {t: visible.clone() for t in dict.fromkeys(layer_types)}
            canvas = torch.zeros((bucket, c), dtype=torch.long, device=self.device)
            sc = torch.zeros((bucket, c, v), dtype=self.sc_dtype, device=self.device)
            sc_mask = torch.zeros(bucket, dtype=torch.bool, device=self.device)
            positions = torch.arange(c, dtype=torch.int32, device=self.device).repeat(bucket, 1)
            logits = self.decode(canvas, sc, sc_mask, positions, masks, keys, values)
            # Inputs as a real pass gives them: contiguous, and no two of them the same tensor (aliasing is guarded).
            self.sample(
                logits.float(),
                self.draws(bucket),
                temperature=torch.ones(bucket, device=self.device),
                greedy=torch.ones(bucket, dtype=torch.bool, device=self.device),
                entropy_bound=torch.ones(bucket, device=self.device),
                history=torch.full((bucket, depth, c), -1, dtype=torch.long, device=self.device),
                history_valid=torch.ones((bucket, depth), dtype=torch.bool, device=self.device),
                confidence_threshold=torch.ones(bucket, device=self.device),
            )
            log.info("compiled passes for batch %d in %.1f s", bucket, time.perf_counter() - start)
