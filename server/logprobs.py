"""Committed tokens' log-probabilities in OpenAI's two shapes: chat (`content` entries with `bytes` and
`top_logprobs`) and legacy completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

The engine reports token ids and log-probabilities (engine.events.TokenLogprob); this module only names the
tokens. A token's text is its exact bytes decoded as UTF-8 (a byte-level token holding part of a character
shows U+FFFD, and `bytes` keeps the truth, as OpenAI does).
"""

from __future__ import annotations

from functools import lru_cache

from engine.engine import LLMEngine
from engine.events import TokenLogprob


class LogprobFormatter:
    def __init__(self, engine: LLMEngine) -> None:
        self._bytes = lru_cache(maxsize=65536)(engine.token_bytes)

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self._bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _entry(self, token_id: int, logprob: float) -> dict:
        text, raw = self._token(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    def chat(self, entries: list[TokenLogprob]) -> dict:
        return {
            "content": [
                {**self._entry(e.token_id, e.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in e.top]}
                for e in entries
            ],
            "refusal": None,
        }

    def completion(self, entries: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        """The legacy shape, with text offsets counted from `offset` (the choice's text so far); returns the
        offset after these tokens too, for the next chunk of a stream."""
        tokens, offsets, top = [], [], []
        for e in entries:
            text, _ = self._token(e.token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            alternatives: dict[str, float] = {}
            for t, lp in e.top:  # two ids may share a text; keep the more probable, as the dict holds one
                alternatives.setdefault(self._token(t)[0], lp)
            top.append(alternatives)
        body = {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": top,
            "text_offset": offsets,
        }
        return body, offset
