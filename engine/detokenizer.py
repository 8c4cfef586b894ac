"""Committed tokens to text, with stop strings that may straddle canvas boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase


@dataclass
class StopMatch:
    text: str  # the full answer text, cut before the stop string
    tokens: int  # how many answer tokens it takes to produce that text


@dataclass
class TextStream:
    """Accumulates answer token ids and hands out text deltas that are safe to show.

    A delta is held back while the tail of the text could still grow into a stop string, or while it
    ends in an incomplete UTF-8 sequence (decoded as U+FFFD), exactly what vLLM and llama.cpp do.
    """

    tokenizer: PreTrainedTokenizerBase
    stop: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the text already handed out
    stopped: bool = False  # a stop string was found: the text is final at `emitted` characters
    # False keeps special tokens in the text, for a chat parser that reads the format's markers.
    skip_special_tokens: bool = True

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    @property
    def text(self) -> str:
        return self.decode(self.token_ids)

    def add(self, ids: list[int]) -> tuple[str, StopMatch | None]:
        """Append committed ids; return the new safe text and a stop match if a stop string appeared."""
        start_search = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        self.token_ids.extend(ids)
        text = self.text
        match = self._find_stop(text, start_search)
        if match is not None:
            delta = match.text[self.emitted :]
            self.emitted = len(match.text)
            self.stopped = True
            return delta, match
        safe = len(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:
            # Longest suffix of the text that is a proper prefix of this stop string.
            for k in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                if text[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        delta = text[self.emitted : safe]
        self.emitted = safe
        return delta, None

    def flush(self) -> str:
        """The rest of the text once no more tokens will come."""
        if self.stopped:
            return ""
        text = self.text
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta

    def _find_stop(self, text: str, start: int) -> StopMatch | None:
        hits = [(pos, s) for s in self.stop if (pos := text.find(s, start)) != -1]
        if not hits:
            return None
        cut = min(pos for pos, _ in hits)
        kept = text[:cut]
        # The fewest tokens whose text covers what is kept: the usage a client is billed for.
        tokens = len(self.token_ids)
        for n in range(len(self.token_ids) + 1):
            if len(self.decode(self.token_ids[:n])) >= len(kept):
                tokens = n
                break
        self.token_ids = self.token_ids[:tokens]
        return StopMatch(text=kept, tokens=tokens)
