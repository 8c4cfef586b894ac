"""A request's images, as DiffusionGemma's encoder reads them.

The model's processor (transformers' Gemma 4 processor: resize, patchify, one run of image soft tokens per image
between <|image> and <image|> in the prompt) turns images into `pixel_values` and `image_position_ids`; the
vision tower turns those into one embedding per soft token, which the encoder puts in place of the image tokens'
own embeddings when it writes the prompt's keys and values. This module holds one request's image inputs and
answers the questions prefill asks about them: where the images lie in the prompt, which features a chunk of
the prompt needs, where a chunk may end, and what identifies the prompt for the prefix cache (the image tokens
are all the same id, so two prompts with different pictures must not share cached blocks).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


class ImageInputError(ValueError):
    """Images that do not fit the prompt's image tokens, or a model that cannot read images."""


@dataclass
class PromptImages:
    pixel_values: torch.Tensor  # (images, patches, patch values), padded patches as the processor leaves them
    position_ids: torch.Tensor  # (images, patches, 2), (-1, -1) for padding
    spans: list[tuple[int, int]] = field(default_factory=list)  # each image's soft tokens: [start, end) in the prompt
    digests: list[bytes] = field(default_factory=list)  # content hash of each image's pixels
    features: torch.Tensor | None = None  # the vision tower's output, (soft tokens of all images, hidden)

    @classmethod
    def build(
        cls, prompt_ids: list[int], image_token_id: int, pixel_values: torch.Tensor, position_ids: torch.Tensor
    ) -> PromptImages:
        """The images of a prompt whose image tokens the processor wrote: one run of `image_token_id` per image,
        in order. Raises ImageInputError when the runs and the images disagree."""
        spans: list[tuple[int, int]] = []
        start = None
        for i, token in enumerate([*prompt_ids, -1]):
            if token == image_token_id and start is None:
                start = i
            elif token != image_token_id and start is not None:
                spans.append((start, i))
                start = None
        if pixel_values.ndim != 3 or position_ids.shape[:2] != pixel_values.shape[:2]:
            raise ImageInputError("pixel values and patch positions must be (images, patches, ...) of one shape")
        if len(spans) != pixel_values.shape[0]:
            raise ImageInputError(
                f"the prompt holds {len(spans)} runs of image tokens for {pixel_values.shape[0]} images"
            )
        digests = [
            hashlib.blake2b(pv.contiguous().cpu().numpy().tobytes() + pos.contiguous().cpu().numpy().tobytes(),
                            digest_size=16).digest()
            for pv, pos in zip(pixel_values, position_ids, strict=True)
        ]  # fmt: skip
        return cls(pixel_values, position_ids, spans, digests)

    @property
    def soft_tokens(self) -> int:
        return sum(end - start for start, end in self.spans)

    def check_features(self, features: torch.Tensor) -> None:
        if features.shape[0] != self.soft_tokens:
            raise ImageInputError(
                f"the vision tower gave {features.shape[0]} soft tokens for {self.soft_tokens} image tokens"
            )

    def chunk_end(self, start: int, end: int) -> int:
        """Where a prefill chunk [start, end) must end so that no image is cut: the encoder may attend
        bidirectionally within an image, which needs all of its tokens in one pass."""
        for lo, hi in self.spans:
            if lo < end < hi:
                return hi
        return end

    def features_for(self, start: int, end: int) -> torch.Tensor | None:
        """The soft-token features of the image tokens in prompt positions [start, end), in order."""
        assert self.features is not None
        rows, offset = [], 0
        for lo, hi in self.spans:
            a, b = max(lo, start), min(hi, end)
            if a < b:
                rows.append(self.features[offset + a - lo : offset + b - lo])
            offset += hi - lo
        return torch.cat(rows) if rows else None

    def token_types(self, start: int, end: int) -> list[int]:
        """transformers' mm_token_type_ids for prompt positions [start, end): 1 on image tokens, else 0."""
        types = [0] * (end - start)
        for lo, hi in self.spans:
            for i in range(max(lo, start), min(hi, end)):
                types[i - start] = 1
        return types

    def copy(self) -> PromptImages:
        """Another request's view of the same images (its own features, computed at its own prefill)."""
        return PromptImages(self.pixel_values, self.position_ids, list(self.spans), list(self.digests))

    def release(self) -> None:
        """Drop the pixels and features once the prompt is encoded (spans and digests stay)."""
        self.features = None
        self.pixel_values = self.position_ids = None  # type: ignore[assignment]

    def cache_keys(self, prompt_ids: list[int]) -> list:
        """The prompt as the prefix cache identifies it: each image token stands for its image and its place
        in it, so only prompts with the same pictures share blocks."""
        keys: list = list(prompt_ids)
        for (lo, hi), digest in zip(self.spans, self.digests, strict=True):
            for i in range(lo, hi):
                keys[i] = (digest, i - lo)
        return keys
