"""Autoregressive baseline for tiny-sudoku: a small causal LM (Llama architecture) with the same tokenizer,
data and training budget, predicting the solution left to right after the puzzle.

    python -m models.sudoku.ar_baseline --minutes 40 --out models/sudoku/ar-baseline --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.sudoku.tokenizer import BOS, EOS, PAD, VOCAB_SIZE, save_tokenizer
from models.sudoku.train import Data, learning_rate, training_record


def ar_config(hidden: int, layers: int, intermediate: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=True,
    )


def main() -> None:
    from transformers import LlamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="models/sudoku/ar-baseline")
    ap.add_argument("--minutes", type=float, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pool", type=int, default=600)
    ap.add_argument("--grow-every", type=int, default=4)
    ap.add_argument("--no-unique", dest="unique", action="store_false")
    ap.add_argument("--given-weight", type=float, default=1.0)  # as its last run and the diffusion model's
    ap.add_argument("--min-givens", type=int, default=22)
    ap.add_argument("--max-givens", type=int, default=60)
    ap.add_argument("--init", default=None, help="continue from this checkpoint")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data = Data(args.seed, args.pool, args.min_givens, args.max_givens, args.unique)
    previous = training_record(args.init)  # read before any save: --out may equal --init
    if args.init:
        model = LlamaForCausalLM.from_pretrained(args.init)
    else:
        model = LlamaForCausalLM(ar_config(args.hidden, args.layers, args.intermediate))
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters {params:,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    budget, start, step, ema = args.minutes * 60, time.monotonic(), 0, None
    while time.monotonic() - start < budget:
        progress = (time.monotonic() - start) / budget
        lr = learning_rate(args.lr, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        prompt, target, weight = data.puzzle_batch(args.batch, args.given_weight)
        answer = target[:, :90]
        seq = torch.cat([prompt, answer], dim=1)
        logits = model(input_ids=seq[:, :-1]).logits
        # Loss on the answer only: position i predicts token i + 1.
        n_prompt = prompt.shape[1]
        # Same per-position weights as the diffusion model: the blanks count, copied givens and layout less.
        ce = F.cross_entropy(
            logits[:, n_prompt - 1 :].reshape(-1, VOCAB_SIZE), seq[:, n_prompt:].reshape(-1), reduction="none"
        )
        loss = (ce * weight.reshape(-1)).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if args.unique and args.grow_every and step % args.grow_every == 0:
            data.grow(1)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step} {time.monotonic() - start:.0f}s lr {lr:.2e} loss {ema:.4f}", flush=True)
    out = Path(args.out)
    model.save_pretrained(out)
    save_tokenizer(out)
    (out / "training.json").write_text(
        json.dumps(
            {
                **vars(args),
                "parameters": params,
                "steps": step,
                "loss": ema,
                "continued_from": previous,
                "seconds": time.monotonic() - start,
            },
            indent=1,
        )
    )
    print(f"done: {step} steps, loss {ema:.4f} -> {out}", flush=True)


if __name__ == "__main__":
    main()
