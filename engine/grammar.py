"""Grammar constraints on a canvas: llguidance token masks, read left to right over a canvas written in parallel.

A grammar reads text left to right, one token after another; a canvas proposes every position at once. The
two meet in a *walk*: starting from the grammar state at the canvas start, position i takes the most probable
token that the grammar allows after the walk's tokens 0..i-1, the grammar consumes it, and so on to the end of
the canvas or to EOS, which the grammar allows only where it may end. The walk is the row's argmax canvas.

- Commit-only (`in_pass=False`): passes run unconstrained; the committed canvas is the walk over the last
  pass's logits.
- In-pass (`in_pass=True`, the default): every pass walks its logits and masks them at each walked position
  before proposing, measuring entropy and accepting. A position the grammar forces (one allowed token: braces,
  quotes, the keys of a strict schema) then has zero entropy, so it is always accepted and never renoised, and
  the passes are spent on the values; drafts show the constrained text.

The matcher's state carries across canvases: it has consumed every committed token. Between passes the walk
is incremental: positions whose token did not change keep their cached masks, and the grammar is rolled back
only to the first position that changed. The grammar engine is llguidance (masks in microseconds per token);
this module never parses grammars or schemas itself.
"""

from __future__ import annotations

import numpy as np
import torch

# Candidates per position checked against the mask before falling back to a masked argmax over the vocabulary.
TOP_CANDIDATES = 8
# Positions per chunk when a bitmask is expanded over the vocabulary (bounds the temporaries, as in denoise.py).
MASK_CHUNK = 32


class GrammarError(ValueError):
    """The grammar (or schema, regex, choice) cannot be compiled or uses a feature the engine cannot honour."""


def _llguidance():
    import llguidance
    import llguidance.hf

    return llguidance


class _TokenTable:
    """A tokenizer as llguidance's generic wrapper reads it: each token's bytes (special tokens as 0xFF + name,
    llguidance's convention) and an encode function. Only for tokenizers whose tokens decode one by one, such as
    character-level ones; llguidance reads byte-level BPE and SentencePiece tokenizers natively."""

    def __init__(self, tokenizer) -> None:
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.special_token_ids = sorted(special)
        self.tokens = [
            b"\xff" + tokenizer.convert_ids_to_tokens(i).encode() if i in special else tokenizer.decode([i]).encode()
            for i in range(len(tokenizer))
        ]
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])


class GrammarCompiler:
    """Builds llguidance matchers for one model's tokenizer (the tokenizer is converted once, ~ms to ~1 s)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        eos = self.eos_token_ids or None
        try:
            self.lltokenizer = llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        except ValueError:  # a tokenizer.json llguidance cannot read (e.g. tiny-sudoku's character decoder)
            wrapper = llg.TokenizerWrapper(_TokenTable(tokenizer))
            self.lltokenizer = llg.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos)

    def compile(self, grammar: str):
        """An `LLMatcher` at the grammar's start; raises GrammarError with llguidance's message. Grammar
        construction drops the GIL: callers run it off the engine thread."""
        llg = _llguidance()
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if is_error:
            raise GrammarError(messages[0].strip())
        matcher = llg.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error().strip())
        return matcher


def allowed_tokens(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """(n, ceil(V/32)) int32 bitmasks (bit t of word t // 32 set = token t allowed) -> (n, V) bool."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1, bitorder="little")
    return bits[:, :vocab_size].view(bool)


class GrammarConstraint:
    """One row's grammar: a matcher that has consumed every committed token, plus the current canvas's walk."""

    def __init__(self, matcher, vocab_size: int, eos_token_ids: list[int], in_pass: bool = True) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos = frozenset(eos_token_ids)
        self.in_pass = in_pass
        self.words = (vocab_size + 31) // 32
        # The walk of the current canvas: tokens the matcher has consumed past the committed state, and the
        # mask each of them was chosen under (it depends only on the tokens before it, so it stays valid while
        # they do). An EOS ends the walk; it is never fed to the matcher (llguidance cannot roll an EOS back).
        self.walked: list[int] = []
        self.masks: list[np.ndarray] = []

    # ------------------------------------------------------------------ walk

    def _mask(self) -> np.ndarray:
        mask = np.empty(self.words, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        return mask

    def _choose(self, mask: np.ndarray, candidates: list[int], row: torch.Tensor) -> int:
        """The most probable token the mask allows at this position (ties to the lowest id, as argmax)."""
        for t in candidates:
            if (int(mask[t >> 5]) >> (t & 31)) & 1:
                return t
        allowed = np.flatnonzero(allowed_tokens(mask[None], self.vocab_size)[0])
        if len(allowed) == 0:
            raise GrammarError(f"the grammar allows no token here ({self.matcher.get_error() or 'dead end'})")
        if len(allowed) == 1:  # forced: no need to look at the logits
            return int(allowed[0])
        if row.device.type == "cpu":
            return int(allowed[row.numpy()[allowed].argmax()])
        index = torch.from_numpy(allowed).to(row.device)
        return int(index[row[index].argmax()])

    def _rollback_to(self, length: int) -> None:
        if len(self.walked) > length:
            consumed = len(self.walked) - length - (self.walked[-1] in self.eos)
            if consumed and not self.matcher.rollback(consumed):
                raise GrammarError(f"the grammar could not roll back: {self.matcher.get_error()}")
            del self.walked[length:], self.masks[length:]

    def walk(self, logits: torch.Tensor, limit: int) -> list[int]:
        """Walk `logits` (canvas x vocab, any positive scaling) from the committed state over at most `limit`
        positions; returns the walk's tokens (ending with EOS where the walk chose it). The matcher is left
        at the walk's end, its masks cached for the next pass."""
        limit = min(limit, logits.shape[0])
        top = logits[:limit].topk(min(TOP_CANDIDATES, logits.shape[-1]), dim=-1).indices.tolist()
        tokens: list[int] = []
        for i in range(limit):
            mask = self.masks[i] if i < len(self.masks) else self._mask()
            token = self._choose(mask, top[i], logits[i])
            tokens.append(token)
            if i < len(self.walked) and self.walked[i] == token:
                if token in self.eos:
                    break
                continue
            self._rollback_to(i)
            if token not in self.eos and not self.matcher.consume_token(token):
                raise GrammarError(f"the grammar rejected token {token}: {self.matcher.get_error()}")
            self.walked.append(token)
            self.masks.append(mask)
            if token in self.eos:
                break
        self._rollback_to(len(tokens))
        return tokens

    def mask_logits(self, logits: torch.Tensor, length: int) -> None:
        """Disallowed tokens at the first `length` walked positions become -inf, in place, chunk by chunk."""
        for start in range(0, length, MASK_CHUNK):
            stop = min(length, start + MASK_CHUNK)
            allowed = torch.from_numpy(allowed_tokens(np.stack(self.masks[start:stop]), self.vocab_size))
            logits[start:stop].masked_fill_(~allowed.to(logits.device), float("-inf"))

    # --------------------------------------------------------------- canvases

    def start_canvas(self) -> None:
        """The walk's tokens became the committed ones: the next canvas walks on from here."""
        self.walked, self.masks = [], []

    @property
    def ended(self) -> bool:
        """True when the walk reached EOS (the grammar was complete there)."""
        return bool(self.walked) and self.walked[-1] in self.eos
