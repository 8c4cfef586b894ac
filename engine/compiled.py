"""Compiled passes: the decoder forward and the batched sampler as static-shape graphs, one per batch bucket.

A pass over n rows runs at the smallest bucket (1, 2, 4, ... up to max_num_seqs) that holds them; the extra rows
are padding that sees only its own canvas and whose results are dropped. The rows' cached prefixes are gathered
left-padded to a multiple of LENGTH_MULTIPLE keys with a boolean mask that hides the padding; the prefix length
is a dynamic dimension of the graph, so a growing conversation never recompiles. Everything else (canvas,
vocabulary, batch) is static, which lets inductor fuse the small ops that dominate a pass. On CUDA the graphs
are also captured as CUDA graphs (`reduce-overhead`), one per bucket and prefix length.

Every bucket compiles when the engine starts (`warm_up`), so no request pays for a compile and /ready stays
503 until it is done; the compile cost per bucket is logged. Compiled passes use transformers' stock kernels
(the batch-invariant row-wise attention and fixed-block experts are eager-only): a row's tokens may differ in
the last bits between batch sizes, as in vLLM.
"""

from __future__ import annotations

import logging
import time

import torch
import torch._dynamo

from engine import batch_sampler

log = logging.getLogger("press.engine")

# Prefix keys are padded to a multiple of this: on CUDA it bounds the shapes (so the CUDA graphs) a growing
# prefix goes through; everywhere it keeps the padded copy's shapes few.
LENGTH_MULTIPLE = 128


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
        # Dynamo's guards are a sixth of a compiled tiny batch-1 pass on CPU; most guard the model's modules.
        # Dropping those (`guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe`) halved that time
        # but is wrong here: graphs are cached per code object, so a second engine in the process reran the first
        # one's graph (a KeyError for its quantized experts), and even alone an int8 engine, whose graphs break
        # around its experts, answered other tokens than with every guard. Every guard stays.
        kw = {"mode": mode} if self.cuda_graphs else {"options": {"cpp_wrapper": True}}
        self._decode = torch.compile(forward, fullgraph=fullgraph, dynamic=False, **kw)
        self._sample = torch.compile(batch_sampler.sample_batch, fullgraph=True, dynamic=False, **kw)
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
        for t in (*keys, *values):
            torch._dynamo.mark_dynamic(t, 2)
        for m in masks.values():
            torch._dynamo.mark_dynamic(m, 3)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._decode(canvas, sc, sc_mask, positions, masks, keys, values)
        return logits.clone() if self.cuda_graphs else logits  # a CUDA graph's output is overwritten next replay

    # ------------------------------------------------------------------ sampler

    def draws(self, bucket: int) -> batch_sampler.Draws:
        if bucket not in self._draws:
            self._draws[bucket] = batch_sampler.Draws(
                race=torch.ones((bucket, self.canvas_length, self.vocab_size), device=self.device),
                noise=torch.zeros((bucket, self.canvas_length), dtype=torch.long, device=self.device),
            )
        return self._draws[bucket]

    def sample(self, logits: torch.Tensor, draws: batch_sampler.Draws, **rows) -> tuple[torch.Tensor, ...]:
        """`batch_sampler.sample_batch` compiled, on a padded batch (`rows` are its per-row tensors)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self._sample(logits, race=draws.race, noise=draws.noise, sc_dtype=self.sc_dtype, **rows)
        return tuple(t.clone() for t in out) if self.cuda_graphs else out

    # ------------------------------------------------------------------ startup

    def warm_up(self, layers: list[tuple[int, int, int]], layer_types: list[str]) -> None:
        """Compile every bucket now: a dummy pass (a prefix of LENGTH_MULTIPLE keys, all padding) through the
        decoder and the sampler. `layers` gives each layer's (kv heads, key dim, value dim)."""
        c, v = self.canvas_length, self.vocab_size
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
                history=torch.full((bucket, 1, c), -1, dtype=torch.long, device=self.device),
                history_valid=torch.ones((bucket, 1), dtype=torch.bool, device=self.device),
                confidence_threshold=torch.ones(bucket, device=self.device),
            )
            log.info("compiled passes for batch %d in %.1f s", bucket, time.perf_counter() - start)
