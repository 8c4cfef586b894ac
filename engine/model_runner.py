"""Forward passes of DiffusionGemma for one request row: prefill, decoder pass and canvas commit.

The encoder (causal) writes the request's KV cache: the prompt at prefill, each finished canvas at commit.
The decoder (bidirectional over the canvas) only reads that cache. Masks and positions are built with
transformers' own helpers so the attention layout (sliding windows included) is the reference's.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaDecoderModel

from engine.loader import LoadedModel
from engine.request import DenoiseState

# transformers renamed the cache keyword from `past_key_values` (5.17) to `cache` (later 5.x); both are supported.
CACHE_KW = (
    "cache"
    if "cache" in inspect.signature(DiffusionGemmaDecoderModel.create_diffusion_decoder_attention_mask).parameters
    else "past_key_values"
)


class ModelRunner:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.canvas_length = loaded.canvas_length
        self.sc_dtype = self.model.model.decoder.embed_tokens.weight.dtype

    def _encode(self, state: DenoiseState, ids: list[int] | torch.Tensor) -> None:
        """Run the causal encoder over `ids`, appending their keys and values to the request's cache."""
        input_ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(1, -1)
        start, n = state.cached_len, input_ids.shape[1]
        positions = torch.arange(start, start + n, dtype=torch.int32, device=self.device)[None]
        attention_mask = torch.ones((1, start + n), dtype=torch.bool, device=self.device)
        encoder = self.model.model.encoder
        mask_mapping = encoder.create_masks_for_generate(
            config=self.model.config,
            inputs_embeds=torch.empty((1, n, 0), dtype=self.model.dtype, device=self.device),
            attention_mask=attention_mask,
            position_ids=positions,
            **{CACHE_KW: state.cache},
        )
        encoder(input_ids=input_ids, attention_mask=mask_mapping, position_ids=positions, **{CACHE_KW: state.cache})
        state.cached_len = start + n

    @torch.inference_mode()
    def prefill(self, state: DenoiseState) -> None:
        state.cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        state.cached_len = 0
        self._encode(state, state.prompt_ids)

    @torch.inference_mode()
    def commit(self, state: DenoiseState, canvas: torch.Tensor) -> None:
        """Encode a finished canvas so the next canvas attends to it."""
        self._encode(state, canvas)

    @torch.inference_mode()
    def denoise_logits(self, state: DenoiseState) -> torch.Tensor:
        """One decoder pass over the current canvas; returns fp32 logits of shape (canvas_length, vocab)."""
        start = state.cached_len
        canvas = state.canvas[None]
        positions = torch.arange(start, start + self.canvas_length, dtype=torch.int32, device=self.device)[None]
        mask_mapping = self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config,
            inputs_embeds=canvas.unsqueeze(-1),
            decoder_attention_mask=torch.ones((1, start + self.canvas_length), dtype=torch.bool, device=self.device),
            **{CACHE_KW: state.cache},
        )
        out = self.model(
            decoder_input_ids=canvas,
            self_conditioning_logits=state.self_conditioning,
            decoder_attention_mask=mask_mapping,
            decoder_position_ids=positions,
            **{CACHE_KW: state.cache},
        )
        return out.logits[0]
