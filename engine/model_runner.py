"""Forward passes of DiffusionGemma: chunked prefill, batched decoder passes and canvas commits.

The encoder (causal) writes each request's own KV cache: the prompt at prefill, each finished canvas at
commit. The decoder (bidirectional over the canvas) only reads caches, so a pass over several requests
gathers their caches into one left-padded, read-only prefix with a mask that hides the padding; every
row keeps its own positions. The gathered prefix is reused across passes until the set of rows or a
cache changes (a canvas commit), which happens once per canvas rather than once per pass.

Canvases that finish in the same pass are committed by one batched encoder pass over the same kind of
gathered prefix; each row's new keys and values then go into its own cache.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaDecoderModel

from engine import batch_invariance, dense_experts
from engine.batch_invariance import RowPrefix
from engine.compiled import LENGTH_MULTIPLE, CompiledPasses
from engine.loader import LoadedModel
from engine.prefix_cache import PrefixCache, RecordingCache
from engine.request import DenoiseState

log = logging.getLogger("press.engine")

# transformers renamed the cache keyword from `past_key_values` (5.17) to `cache` (later 5.x); both are supported.
CACHE_KW = (
    "cache"
    if "cache" in inspect.signature(DiffusionGemmaDecoderModel.create_diffusion_decoder_attention_mask).parameters
    else "past_key_values"
)


@dataclass
class _PrefixLayer:
    keys: torch.Tensor
    values: torch.Tensor


class BatchedPrefix:
    """Read-only stand-in for a transformers cache: exactly what the decoder's attention reads
    (`layers[i].keys/values`, `is_compileable`), for several requests left-padded to one length."""

    is_compileable = False

    def __init__(self, layers: list[_PrefixLayer]) -> None:
        self.layers = layers


class _CommitBatch:
    """Cache stand-in for one batched commit: each encoder layer gets the rows' left-padded prefixes with
    the new canvas keys appended, as a row's own cache would return them, and the new keys are kept so
    each row's cache can take its share afterwards."""

    is_compileable = False

    def __init__(self, prefix: BatchedPrefix) -> None:
        self.prefix = prefix
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.new[layer_idx] = (keys, values)
        old = self.prefix.layers[layer_idx]
        return torch.cat([old.keys, keys], dim=-2), torch.cat([old.values, values], dim=-2)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, batch_invariant: bool = True) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.canvas_length = loaded.canvas_length
        self.sc_dtype = self.model.model.decoder.embed_tokens.weight.dtype
        self.layer_types = list(self.model.config.get_text_config().layer_types)
        self._prefix_key: tuple | None = None
        self._prefix: tuple[BatchedPrefix, dict] | None = None
        self.batch_invariant = batch_invariant
        if batch_invariant:
            batch_invariance.install(self.model)
        self.compiled: CompiledPasses | None = None

    def compile(self, max_rows: int) -> CompiledPasses:
        """Switch decoder passes to compiled graphs (engine/compiled.py), compiling every batch bucket now."""
        vocab = self.model.config.get_text_config().vocab_size
        if self.loaded.quantization == "none" and dense_experts.install(self.model):
            log.info("compiled passes run the MoE experts densely (few experts per routed one)")
        self.compiled = CompiledPasses(
            self._static_forward, self.device, self.sc_dtype, self.canvas_length, vocab, max_rows,
            fullgraph=self.loaded.quantization == "none",  # quantized experts run eagerly between graphs
        )  # fmt: skip
        with torch.inference_mode():  # each layer's key and value shapes, from a one-token cache
            cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
            self.model.model.encoder(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device),
                                     **{CACHE_KW: cache})  # fmt: skip
            shapes = [(layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1]) for layer in cache.layers]
            self.compiled.warm_up(shapes, self.layer_types)
        return self.compiled

    def _static_forward(self, canvas, sc, sc_mask, positions, masks, keys, values) -> torch.Tensor:
        """The decoder pass on plain tensors, as the compiled graphs take it."""
        prefix = BatchedPrefix([_PrefixLayer(k, v) for k, v in zip(keys, values, strict=True)])
        return self.model(
            decoder_input_ids=canvas,
            self_conditioning_logits=sc,
            self_conditioning_mask=sc_mask,
            decoder_attention_mask=masks,
            decoder_position_ids=positions,
            **{CACHE_KW: prefix},
        ).logits

    # ------------------------------------------------------------------ encoder

    def _encoder_masks(
        self, state: DenoiseState, n: int, token_types: list[int] | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Positions and per-layer-type masks for encoding `n` more tokens of this request alone (`token_types`:
        transformers' mm_token_type_ids of every position up to the last of them, for models that attend
        bidirectionally within an image)."""
        start = state.cached_len
        positions = torch.arange(start, start + n, dtype=torch.int32, device=self.device)[None]
        attention_mask = torch.ones((1, start + n), dtype=torch.bool, device=self.device)
        extra = {}
        if token_types is not None:
            extra["mm_token_type_ids"] = torch.tensor([token_types], dtype=torch.long, device=self.device)
        masks = self.model.model.encoder.create_masks_for_generate(
            config=self.model.config,
            inputs_embeds=torch.empty((1, n, 0), dtype=self.model.dtype, device=self.device),
            attention_mask=attention_mask,
            position_ids=positions,
            **{CACHE_KW: state.cache},
            **extra,
        )
        return positions, masks

    def _encode(self, state: DenoiseState, ids: list[int] | torch.Tensor) -> None:
        """Run the causal encoder over `ids`, appending their keys and values to the request's cache. Prompt
        positions that hold image tokens get their image's soft-token features instead of the token's embedding,
        as transformers' encoder merges them."""
        input_ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(1, -1)
        n = input_ids.shape[1]
        start, images = state.cached_len, state.images
        in_prompt = images is not None and start < len(state.prompt_ids)
        features = images.features_for(start, start + n) if in_prompt else None
        if features is None:
            positions, masks = self._encoder_masks(state, n)
            inputs = {"input_ids": input_ids}
        else:
            # Token types from the prompt's start: transformers' image-block mask indexes them by absolute position.
            positions, masks = self._encoder_masks(state, n, images.token_types(0, start + n))
            encoder = self.model.model.encoder
            embeds = encoder.get_input_embeddings()(input_ids)
            where = (input_ids == self.model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
            inputs = {"inputs_embeds": embeds.masked_scatter(where, features.to(embeds.device, embeds.dtype))}
        self.model.model.encoder(attention_mask=masks, position_ids=positions, **inputs, **{CACHE_KW: state.cache})
        state.cached_len += n

    def encode_images(self, state: DenoiseState) -> None:
        """Run the vision tower over the request's images (once, before its first prompt chunk)."""
        images = state.images
        if images is None or images.features is not None:
            return
        encoder = self.model.model.encoder
        dtype = next(encoder.vision_tower.parameters()).dtype
        out = encoder.get_image_features(
            images.pixel_values.to(self.device, dtype), images.position_ids.to(self.device), return_dict=True
        )
        features = out.pooler_output
        images.check_features(features)
        images.features = features

    @torch.inference_mode()
    def start_cache(self, state: DenoiseState, prefix_cache: PrefixCache, ends: list[int] | None = None) -> int:
        """A request's empty encoder cache, holding the longest cached prefix of its prompt (with `ends`, the
        longest that ends at one of those positions); returns how many prompt positions that restored."""
        cache_class = RecordingCache if prefix_cache.enabled else DynamicCache
        state.cache = cache_class(config=self.model.config.get_text_config(decoder=True))
        blocks = prefix_cache.lookup(state.cache_keys)
        if ends is not None:
            found = len(blocks) * prefix_cache.block_tokens
            usable = [e for e in ends if e <= found and e % prefix_cache.block_tokens == 0]
            blocks = blocks[: max(usable, default=0) // prefix_cache.block_tokens]
        state.cached_len = PrefixCache.restore(state.cache, blocks)
        state.prefix_hit = state.cached_len
        return state.cached_len

    @torch.inference_mode()
    def prefill(self, state: DenoiseState, max_tokens: int) -> int:
        """Encode up to `max_tokens` more prompt tokens (chunked prefill); returns how many were encoded."""
        if state.cache is None:  # no start_cache (callers that bypass the prefix cache)
            self.start_cache(state, PrefixCache(0))
        chunk = state.prompt_ids[state.cached_len : state.cached_len + max_tokens]
        if chunk:
            self.encode_images(state)
            self._encode(state, chunk)
        return len(chunk)

    def finish_prefill(self, state: DenoiseState, prefix_cache: PrefixCache) -> None:
        """The prompt is encoded: its blocks past the restored prefix go into the prefix cache."""
        if isinstance(state.cache, RecordingCache):
            prefix_cache.insert(state.cache_keys, state.cache.take_recorded(), start=state.prefix_hit)
        if state.images is not None:  # in the cache now: the pixels and features are not needed again
            state.images.release()

    @torch.inference_mode()
    def commit(self, rows: list[tuple[DenoiseState, torch.Tensor]]) -> None:
        """Encode finished canvases so each request's next canvas attends to its own: one encoder pass
        for all of them, each row under exactly the mask it would get alone."""
        self.release_prefix()  # every row's cache grows: the decoder's gathered copy is stale, free it first
        if len(rows) == 1:
            self._encode(*rows[0])
            return
        states = [s for s, _ in rows]
        alone = [self._encoder_masks(s, self.canvas_length) for s in states]
        if any(m is None for _, masks in alone for m in masks.values()):
            # No materialised mask to carry into the batch (never seen for a commit): one row at a time.
            for state, canvas in rows:
                self._encode(state, canvas)
            return
        layers, pads = self._pad_caches(states)
        masks: dict[str, RowPrefix | torch.Tensor] = {}
        for layer_type, row_pads in pads.items():
            row_masks = [m[layer_type] for _, m in alone]
            if self.batch_invariant:
                masks[layer_type] = RowPrefix(tuple(row_pads), tuple(row_masks))
            else:  # one SDPA call: each row's own mask, left-padded with invisible keys
                masks[layer_type] = torch.cat(
                    [nn.functional.pad(m, (pad, 0), value=False) for m, pad in zip(row_masks, row_pads, strict=True)]
                )
        cache = _CommitBatch(BatchedPrefix(layers))
        self.model.model.encoder(
            input_ids=torch.stack([c for _, c in rows]),
            attention_mask=masks,
            position_ids=torch.cat([positions for positions, _ in alone]),
            **{CACHE_KW: cache},
        )
        for b, state in enumerate(states):
            for idx in range(len(self.layer_types)):
                keys, values = cache.new[idx]
                state.cache.update(keys[b : b + 1], values[b : b + 1], idx)
            state.cached_len += self.canvas_length

    # ------------------------------------------------------------------ decoder

    def _single_row_masks(self, state: DenoiseState, canvas: torch.Tensor) -> dict:
        return self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config,
            inputs_embeds=canvas.unsqueeze(-1),
            decoder_attention_mask=torch.ones(
                (1, state.cached_len + self.canvas_length), dtype=torch.bool, device=self.device
            ),
            **{CACHE_KW: state.cache},
        )

    def _gathered_prefix(self, rows: list[DenoiseState], batch: int | None = None) -> tuple[BatchedPrefix, dict]:
        """The rows' caches left-padded for the decoder, with what hides each row's padding; cached. With `batch`
        (a compiled pass): `batch` rows, lengths padded to a multiple of LENGTH_MULTIPLE, every mask materialised."""
        key = (batch, *((s.request_id, s.cached_len) for s in rows))
        if key == self._prefix_key and self._prefix is not None:
            return self._prefix
        self._prefix = None  # free the previous gathered copy before building the next
        layers, pads = self._pad_caches(rows, batch, LENGTH_MULTIPLE if batch else 1)
        mask = self._visible if batch else self._prefix_mask
        masks = {
            layer_type: mask(row_pads, layers[self.layer_types.index(layer_type)].keys.shape[-2])
            for layer_type, row_pads in pads.items()
        }
        self._prefix_key, self._prefix = key, (BatchedPrefix(layers), masks)
        return self._prefix

    def _pad_caches(
        self, rows: list[DenoiseState], batch: int | None = None, multiple: int = 1
    ) -> tuple[list[_PrefixLayer], dict[str, list[int]]]:
        """Left-pad the rows' caches to a common length per layer (rounded up to `multiple`), with `batch` rows
        (the extra ones all padding); returns the layers and, per layer type, each row's padding (sliding-window
        layers hold fewer keys than full-attention ones)."""
        batch = batch or len(rows)
        layers = []
        pads: dict[str, list[int]] = {}
        for idx, layer_type in enumerate(self.layer_types):
            parts = [s.cache.layers[idx] for s in rows]
            lengths = [p.keys.shape[-2] for p in parts]
            longest = -(-max(lengths) // multiple) * multiple
            _, heads, _, dim = parts[0].keys.shape
            keys = parts[0].keys.new_zeros((batch, heads, longest, dim))
            values = parts[0].values.new_zeros((batch, heads, longest, parts[0].values.shape[-1]))
            for b, (p, n) in enumerate(zip(parts, lengths, strict=True)):
                keys[b, :, longest - n :] = p.keys[0]
                values[b, :, longest - n :] = p.values[0]
            layers.append(_PrefixLayer(keys, values))
            pads.setdefault(layer_type, [longest - n for n in lengths] + [longest] * (batch - len(rows)))
        return layers, pads

    def _prefix_mask(self, pads: list[int], prefix_len: int) -> RowPrefix | torch.Tensor | None:
        """What hides each row's left padding from its canvas: nothing when no row is padded (one batched
        SDPA call); row-by-row attention under batch invariance; otherwise a boolean mask (True = attend)
        over the padded prefix and the canvas, which the canvas sees bidirectionally."""
        if max(pads) == 0:
            return None
        if self.batch_invariant:
            return RowPrefix(tuple(pads))
        return self._visible(pads, prefix_len)

    def _visible(self, pads: list[int], prefix_len: int) -> torch.Tensor:
        """Boolean mask (rows, 1, canvas, prefix + canvas), True = attend: a row's canvas sees its prefix past its
        padding and the whole canvas."""
        keys = torch.arange(prefix_len + self.canvas_length, device=self.device)
        visible = keys[None, :] >= torch.tensor(pads, device=self.device)[:, None]
        return visible[:, None, None, :].expand(-1, 1, self.canvas_length, -1).contiguous()

    def release_prefix(self) -> None:
        self._prefix_key, self._prefix = None, None

    @torch.inference_mode()
    def denoise_logits(self, rows: list[DenoiseState]) -> torch.Tensor:
        """One batched decoder pass over the rows' canvases; fp32 logits of shape (rows, canvas_length, vocab)."""
        if self.compiled is not None:
            return self._compiled_logits(rows)
        canvas = torch.stack([s.canvas for s in rows])
        offsets = torch.tensor([s.cached_len for s in rows], dtype=torch.int32, device=self.device)
        positions = offsets[:, None] + torch.arange(self.canvas_length, dtype=torch.int32, device=self.device)
        if len(rows) == 1:
            # A lone row reads its own cache through transformers' own mask helper: the reference path.
            cache, masks = rows[0].cache, self._single_row_masks(rows[0], canvas)
        else:
            cache, masks = self._gathered_prefix(rows)
        sc_rows = [s.self_conditioning for s in rows]
        sc_mask = None
        if all(sc is None for sc in sc_rows):
            sc = None
        elif all(sc is not None for sc in sc_rows):
            sc = torch.stack(sc_rows)
        else:
            # Rows on their first pass get a zeroed self-conditioning signal, exactly as if none was passed.
            template = next(x for x in sc_rows if x is not None)
            sc = torch.stack([x if x is not None else torch.zeros_like(template) for x in sc_rows])
            sc_mask = torch.tensor([x is not None for x in sc_rows], device=self.device)
        out = self.model(
            decoder_input_ids=canvas,
            self_conditioning_logits=sc,
            self_conditioning_mask=sc_mask,
            decoder_attention_mask=masks,
            decoder_position_ids=positions,
            **{CACHE_KW: cache},
        )
        return out.logits

    def _compiled_logits(self, rows: list[DenoiseState]) -> torch.Tensor:
        """The same pass through the compiled graph of the rows' bucket: rows padded with ones that see only
        their own (zero) canvas, self-conditioning always given (zeroed by its mask on a first pass)."""
        n, batch = len(rows), self.compiled.bucket(len(rows))
        prefix, masks = self._gathered_prefix(rows, batch)
        canvas = torch.zeros((batch, self.canvas_length), dtype=torch.long, device=self.device)
        canvas[:n] = torch.stack([s.canvas for s in rows])
        offsets = torch.tensor([s.cached_len for s in rows] + [0] * (batch - n), dtype=torch.int32, device=self.device)
        positions = offsets[:, None] + torch.arange(self.canvas_length, dtype=torch.int32, device=self.device)
        sc = torch.zeros((batch, self.canvas_length, self.compiled.vocab_size), dtype=self.sc_dtype, device=self.device)
        has_sc = [s.self_conditioning is not None for s in rows]
        for i, s in enumerate(rows):
            if has_sc[i]:
                sc[i] = s.self_conditioning
        sc_mask = torch.tensor(has_sc + [False] * (batch - n), device=self.device)
        keys = [layer.keys for layer in prefix.layers]
        values = [layer.values for layer in prefix.layers]
        return self.compiled.decode(canvas, sc, sc_mask, positions, masks, keys, values)[:n].float()
