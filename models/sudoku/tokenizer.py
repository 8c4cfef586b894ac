"""The tiny-sudoku tokenizer: one token per character, with a chat template that reads the grid.

The chat template does the parsing, so the checkpoint carries it and any server that applies chat templates
gets it: it takes the last user message, keeps digits 1-9 and blanks ('.' or '0', written '.'), skips
spaces, line breaks and grid lines, and if what remains is not exactly 81 cells it sends '?' instead.
The model is trained to answer '?' with a short help message.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<image>", "<boi>", "<eoi>"]
PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN, IMAGE, BOI, EOI = range(9)
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
HELP = "Send a sudoku: 81 cells, digits 1-9, with . or 0 for blanks."

CHAT_TEMPLATE = (
    "{%- set ns = namespace(text='', cells='', ok=true) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
    "{%- set ns.text = m['content'] if m['content'] is string else "
    "(m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n')) -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for ch in ns.text -%}"
    "{%- if ch in '123456789' -%}{%- set ns.cells = ns.cells + ch -%}"
    "{%- elif ch in '.0' -%}{%- set ns.cells = ns.cells + '.' -%}"
    "{%- elif ch in ' \\t\\r\\n|-+_=:#*,;[]' -%}"
    "{%- else -%}{%- set ns.ok = false -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if not ns.ok or ns.cells | length != 81 -%}{%- set ns.cells = '?' -%}{%- endif -%}"
    "{{ bos_token }}<start_of_turn>{{ ns.cells }}<end_of_turn><start_of_turn>"
)


def build_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    return tok


def save_tokenizer(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


VOCAB_SIZE = len(SPECIAL) + len(CHARS)
