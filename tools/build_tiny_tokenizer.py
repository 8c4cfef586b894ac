"""Train the byte-level BPE tokenizer that the built-in `tiny-random` model ships with.

Run once from the repository root (python tools/build_tiny_tokenizer.py); the output
(engine/assets/tiny_tokenizer/) is committed so that every machine gets the same ids (BPE merges with equal
counts are ordered differently from run to run). The corpus is the docstrings of a fixed list of
standard-library modules: plain English prose that needs no download.

The tokenizer speaks Gemma 4's chat format (DiffusionGemma's): its control tokens are special tokens,
one id each, and tokenizer_config.json carries the response template that parses a model answer back
into content, reasoning and tool calls. The chat template is hand-written, not generated:
engine/assets/tiny_tokenizer/chat_template.jinja (its header names the sources of the format).
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.chat import GEMMA4_RESPONSE_TEMPLATE

MODULES = """
argparse asyncio collections csv dataclasses datetime email functools heapq http.client itertools json logging os
pathlib pickle random re shutil socket sqlite3 statistics string subprocess tarfile textwrap threading typing
unittest urllib.parse uuid zipfile
""".split()
# Ids follow this order (engine/tiny_random.py names them). Gemma 4's control tokens, as its prompt-formatting
# guide lists them (https://ai.google.dev/gemma/docs/core/prompt-formatting-gemma4), and its image tokens.
SPECIAL = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<|turn>",
    "<turn|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
    "<|image|>",
    "<|image>",
    "<image|>",
]
VOCAB_SIZE = 1024  # special tokens included: the BPE learns fewer merges, the model's vocab stays 1024


def corpus() -> list[str]:
    texts = []
    for name in MODULES:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc:
                texts.append(doc)
    return texts


def main(out: Path) -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": 4096,
        # The image tokens by role, as Gemma 4's tokenizer names them for its processor.
        "extra_special_tokens": {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>"},
        "response_template": GEMMA4_RESPONSE_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"vocab {tok.get_vocab_size()} -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("engine/assets/tiny_tokenizer"))
