"""Automatic prefix caching: the encoder's keys and values of prompt prefixes, reused across requests.

The encoder is causal, so the keys and values of prompt positions [0, n) depend only on those n tokens.
Prompts are cut into fixed-size token blocks; a block is identified by its tokens and by its parent block (a
hash chain, as vLLM's automatic prefix caching keys them), so a block is shared only by prompts that agree up
to its end. Each block holds every layer's keys and values for its positions (sliding-window layers included:
restoring a prefix replays the blocks through the layers' own `update`, which keeps what the layer would have
kept after encoding those tokens itself). Blocks are evicted least recently used first, bounded in tokens.

Image tokens are one id for every picture, so a prompt with images is keyed by `DenoiseState.cache_keys`: each image
token stands for its image's content hash and its place in the image (engine/images.py). That also covers models
that attend bidirectionally within an image, where a block's keys depend on the rest of its image.

A request reuses the longest cached run of blocks at the start of its prompt, then prefills the rest. The
stored tensors are copies of what the encoder produced; the rest's keys and values equal a cold prefill's bit for
bit only if its chunks have the cold chunks' shapes, so under batch invariance the engine restores only up to
where a cold prefill's chunk ends (`ModelRunner.start_cache`'s `ends`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache

BLOCK_TOKENS = 32


@dataclass
class _Block:
    tokens: tuple  # token ids, or (image digest, index) for image tokens
    parent: int | None
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape (1, heads, block, dim)


class RecordingCache(DynamicCache):
    """A request's encoder cache during prefill: also keeps every layer's new keys and values, chunk by chunk,
    so the prompt's blocks can be stored even for sliding-window layers (which drop old keys)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.recorded is not None:
            while len(self.recorded) <= layer_idx:
                self.recorded.append([])
            self.recorded[layer_idx].append((key_states, value_states))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def take_recorded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's recorded keys and values, concatenated; recording stops."""
        out = [(torch.cat([k for k, _ in parts], dim=-2), torch.cat([v for _, v in parts], dim=-2))
               for parts in self.recorded or []]  # fmt: skip
        self.recorded = None
        return out


class PrefixCache:
    def __init__(self, capacity_tokens: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.capacity_blocks = capacity_tokens // block_tokens
        self.block_tokens = block_tokens
        self.blocks: OrderedDict[int, _Block] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity_blocks > 0

    @property
    def cached_tokens(self) -> int:
        return len(self.blocks) * self.block_tokens

    def _chain(self, prompt: list[int], limit: int) -> list[tuple[int, tuple[int, ...], int | None]]:
        """(key, tokens, parent key) of the prompt's first `limit` full blocks."""
        out, parent = [], None
        for b in range(limit):
            tokens = tuple(prompt[b * self.block_tokens : (b + 1) * self.block_tokens])
            key = hash((parent, tokens))
            out.append((key, tokens, parent))
            parent = key
        return out

    def lookup(self, prompt: list[int]) -> list[_Block]:
        """The longest run of cached blocks the prompt starts with."""
        if not self.enabled:
            return []
        found = []
        for key, tokens, parent in self._chain(prompt, len(prompt) // self.block_tokens):
            block = self.blocks.get(key)
            if block is None or block.tokens != tokens or block.parent != parent:
                break
            self.blocks.move_to_end(key)
            found.append(block)
        return found

    def insert(self, prompt: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]], start: int = 0) -> None:
        """Store the prompt's full blocks from its recorded keys and values, which cover positions
        [start, len(prompt)) (`start`: the restored prefix, a whole number of blocks)."""
        if not self.enabled:
            return
        for b, (key, tokens, parent) in enumerate(self._chain(prompt, len(prompt) // self.block_tokens)):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            lo, hi = b * self.block_tokens - start, (b + 1) * self.block_tokens - start
            if lo < 0:  # restored, then evicted since: its keys were not recorded here
                break
            self.blocks[key] = _Block(tokens, parent, [(k[..., lo:hi, :].clone(), v[..., lo:hi, :].clone())
                                                       for k, v in layers])  # fmt: skip
            while len(self.blocks) > self.capacity_blocks:
                self.blocks.popitem(last=False)

    @staticmethod
    def restore(cache: DynamicCache, blocks: list[_Block]) -> int:
        """Fill an empty cache with the blocks' keys and values, as encoding their tokens would; returns the
        number of positions restored."""
        if not blocks:
            return 0
        for idx in range(len(blocks[0].layers)):
            keys = torch.cat([b.layers[idx][0] for b in blocks], dim=-2)
            values = torch.cat([b.layers[idx][1] for b in blocks], dim=-2)
            cache.layers[idx].update(keys, values)
        return sum(len(b.tokens) for b in blocks)
