"""Which replica a request goes to: prefix affinity, falling back to the least loaded replica.

Each replica keeps a prefix cache of the prompts it encoded (engine/prefix_cache.py), so a follow-up turn of a
conversation, or another request with the same system prompt, is cheapest on the replica that served its prefix.
The ingress computes a request's affinity keys, one per prefix of the conversation (its system message, then the
messages up to each later one; for a text completion, the prompt's leading 256-character pieces), and the router
remembers which replica each key was last sent to. A new request goes to the replica of its longest known key,
unless that replica is busier than the least loaded one by more than `imbalance` requests; with no known key (or
past the imbalance) Ray Serve's own choice among all replicas takes the one with the shortest queue.

Keys are hashes of canonical JSON, so two requests share a key exactly when they share that prefix of messages.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

PROMPT_PIECE = 256  # characters per completion-prompt key


def _key(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def affinity_keys(body: dict) -> list[str]:
    """Prefix keys of a chat or completion request body, shortest prefix first (empty when it has neither)."""
    model = body.get("model")
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        tools = body.get("tools")
        keys, prefix = [], []
        for message in messages:
            prefix.append(message)
            keys.append(_key([model, tools, prefix]))
        return keys
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return [_key([model, prompt[:end]]) for end in range(PROMPT_PIECE, len(prompt) + 1, PROMPT_PIECE)] or [
            _key([model, prompt])
        ]
    return []


class AffinityTable:
    """Key -> replica that last served it, least recently used keys forgotten first."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._table: OrderedDict[str, str] = OrderedDict()

    def lookup(self, keys: list[str], live: set[str]) -> str | None:
        """The replica of the longest key that maps to a live replica."""
        for key in reversed(keys):
            replica = self._table.get(key)
            if replica is not None and replica in live:
                self._table.move_to_end(key)
                return replica
        return None

    def record(self, keys: list[str], replica: str) -> None:
        for key in keys:
            self._table[key] = replica
            self._table.move_to_end(key)
        while len(self._table) > self.capacity:
            self._table.popitem(last=False)

    def forget(self, replica: str) -> None:
        for key in [k for k, r in self._table.items() if r == replica]:
            del self._table[key]
