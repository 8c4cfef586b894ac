"""Make a deeper tiny-sudoku checkpoint that computes exactly what the one it grows from computes.

Every layer is followed by a copy of itself (in the encoder and the decoder alike, since decoder layer i reads
encoder layer i's keys and values) whose two output norms (after attention and after the feed-forward
blocks) are zero: a Gemma 4 RMSNorm multiplies by its weight, so the copy adds nothing to the residual
stream until training moves those weights. The copy starts from its original's weights rather than from
random ones, so its first gradients already carry useful features.

    python -m models.sudoku.grow --init models/tiny-sudoku --out /tmp/grown
    python -m models.sudoku.train --init /tmp/grown ...

The new checkpoint's training.json records the growth (`grown_from`), so the chain of runs stays
reproducible.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models.sudoku.tokenizer import save_tokenizer
from models.sudoku.train import training_record

ZEROED = ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")
STACKS = ("model.decoder.layers.", "model.encoder.language_model.layers.")


def grown_layout(layers: int) -> list[tuple[int, bool]]:
    """(source layer, is a copy) for each layer of the grown stack: every layer followed by its copy."""
    return [(i, copy) for i in range(layers) for copy in (False, True)]


def grow_state(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The grown model's weights: layer j of a stack is its source layer's, zeroed at the outputs if a copy."""
    out = {k: v for k, v in state.items() if not any(k.startswith(s) for s in STACKS)}
    for stack in STACKS:
        for j, (i, copy) in enumerate(grown_layout(layers)):
            prefix = f"{stack}{i}."
            for key, value in state.items():
                if key.startswith(prefix):
                    name = key[len(prefix) :]
                    value = value.clone()
                    if copy and name in ZEROED:
                        value.zero_()
                    out[f"{stack}{j}.{name}"] = value
    return out


def main() -> None:
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="models/tiny-sudoku")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    source = DiffusionGemmaForBlockDiffusion.from_pretrained(args.init)
    text = source.config.text_config.to_dict()
    layers = text["num_hidden_layers"]
    layout = grown_layout(layers)
    text["num_hidden_layers"] = len(layout)
    text["layer_types"] = [text["layer_types"][i] for i, _ in layout]
    config = source.config.to_dict()
    config["text_config"] = text
    grown = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(**config))
    missing, unexpected = grown.load_state_dict(grow_state(source.state_dict(), layers), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise SystemExit(f"weights do not line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
    grown.generation_config = source.generation_config
    out = Path(args.out)
    grown.save_pretrained(out)
    save_tokenizer(out)
    record = {"grown_from": args.init, "layers": [layers, len(layout)], "continued_from": training_record(args.init)}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{layers} -> {len(layout)} layers, {sum(p.numel() for p in grown.parameters()):,} parameters")


if __name__ == "__main__":
    main()
