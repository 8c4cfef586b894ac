"""Canvas constraints on a model that converges (the shipped tiny-sudoku), in one run.

1. Fill-in-the-middle without knowing the middle's length. Each held-out puzzle's answer is a template: eight
   solution lines fixed, one line (9 digits) a hole. The hole's length is what fill-in-the-middle does not
   know, so each setting denoises one row per candidate length in the same batched passes and keeps the row
   whose hole the model filled most confidently (mean log-probability of the committed hole tokens), as
   `suffix` and /infill do. Settings: the exact length only (9, an oracle), Press's default for a 16-token
   budget (16, 8, 4, 2), lengths around the truth (7-11), and a single too-long hole (16). Reports the share
   of rows filled correctly, how often the chosen length is 9 (or a longer hole with fillers), passes per
   canvas of the winner, and rows denoised per answer.
2. Predicted outputs: the same puzzles with no prediction, and with a prediction that is the solution with k
   blank cells wrong (k = 0, 5, 20): solve rate and passes per canvas (a correct prediction converges sooner).

    python bench/infill.py            # CPU; writes bench/results/infill.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent)]

import torch  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.constraints import CanvasConstraints  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.events import FinishEvent  # noqa: E402
from engine.host_allocator import tune_host_allocator  # noqa: E402
from models.sudoku import puzzles  # noqa: E402
from models.sudoku.evaluate import load_heldout, wrong_prediction  # noqa: E402

SETTINGS = {
    "exact length (9)": [9],
    "Press default for 16 tokens (16, 8, 4, 2)": [16, 8, 4, 2],
    "around the truth (7-11)": [7, 8, 9, 10, 11],
    "one long hole (16)": [16],
}


def run(engine: LLMEngine, requests: list[tuple[list[int], object, CanvasConstraints | None]]) -> list:
    finishes: dict[str, FinishEvent] = {}
    states = []
    for prompt, params, constraints in requests:
        s = engine.make_request(prompt, params, constraints=constraints)
        states.append(s)
        engine.add_request(s)
    while engine.has_unfinished():
        engine.step(lambda st, ev: finishes.__setitem__(st.request_id, ev) if isinstance(ev, FinishEvent) else None)
    return [(s, finishes[s.request_id]) for s in states]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/tiny-sudoku")
    ap.add_argument("--puzzles", type=int, default=90)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_host_allocator()
    engine = LLMEngine(EngineConfig(model=args.model, max_num_seqs=64))
    tok = engine.tokenizer
    eos = engine.defaults.eos_token_ids[0]
    fillers = {eos, engine.loaded.model.config.get_text_config().pad_token_id}
    params = engine.defaults.with_changes(max_tokens=engine.canvas_length, seed=0, include_drafts=False)
    items = load_heldout()
    items = items[:: max(1, len(items) // args.puzzles)][: args.puzzles]

    def prompt(p: str) -> list[int]:
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def encode(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    results: dict = {"model": args.model, "puzzles": len(items), "threads": torch.get_num_threads(), "fim": {}}
    # 1. Candidate middle lengths.
    for name, lengths in SETTINGS.items():
        requests, meta = [], []
        for k, (p, s) in enumerate(items):
            rows = [s[r * 9 : r * 9 + 9] for r in range(9)]
            hole = k % 9
            before = encode("\n".join(rows[:hole]) + ("\n" if hole else ""))
            after = encode(("\n" if hole < 8 else "") + "\n".join(rows[hole + 1 :]))
            for n in lengths:
                segments = [seg for seg in (before, n, after) if seg]
                requests.append((prompt(p), params, CanvasConstraints.template(segments, eos, fillers)))
                meta.append((k, n, rows[hole], hole))
        t0 = time.perf_counter()
        done = run(engine, requests)
        took = time.perf_counter() - t0
        best: dict[int, tuple] = {}
        for (k, n, truth, hole), (state, finish) in zip(meta, done, strict=True):
            score = finish.template_logprob if finish.template_logprob is not None else float("-inf")
            if k not in best or score > best[k][0]:
                line = tok.decode(state.answer_ids, skip_special_tokens=True).split("\n")
                best[k] = (score, n, line[hole] if hole < len(line) else "", truth, finish.passes / finish.canvases)
        picks = list(best.values())
        results["fim"][name] = {
            "lengths": lengths,
            "rows_per_answer": len(lengths),
            "line_correct": sum(b[2] == b[3] for b in picks) / len(picks),
            "chosen_9": sum(b[1] == 9 for b in picks) / len(picks),
            "chosen_longer": sum(b[1] > 9 for b in picks) / len(picks),
            "passes_per_canvas": sum(b[4] for b in picks) / len(picks),
            "seconds_per_answer": took / len(picks),
        }
        print(name, results["fim"][name], flush=True)
    # 2. Predictions.
    results["prediction"] = {}
    for k_wrong in (None, 0, 5, 20):
        requests = []
        for p, s in items:
            c = None
            if k_wrong is not None:
                text = wrong_prediction(p, s, k_wrong, seed=len(requests))
                c = CanvasConstraints.prediction(encode(text), eos)
            requests.append((prompt(p), params, c))
        t0 = time.perf_counter()
        done = run(engine, requests)
        took = time.perf_counter() - t0
        solved = 0
        for (p, s), (state, _) in zip(items, done, strict=True):
            grid = "".join(ch for ch in tok.decode(state.answer_ids, skip_special_tokens=True) if ch in "123456789")
            solved += grid == s or puzzles.is_valid_solution(grid, p)
        name = "no prediction" if k_wrong is None else f"prediction, {k_wrong} cells wrong"
        results["prediction"][name] = {
            "solved": solved / len(items),
            "passes_per_canvas": sum(f.passes / f.canvases for _, f in done) / len(done),
            "seconds_per_puzzle_batched": took / len(items),
            "accepted_prediction_tokens": (
                sum(f.accepted_prediction_tokens for _, f in done) / len(done) if k_wrong is not None else None
            ),
        }
        print(name, results["prediction"][name], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "infill.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        f"tiny-sudoku, {len(items)} held-out puzzles (all buckets), CPU, {results['threads']} threads, one run.",
        "",
        "Fill-in-the-middle: one line of the grid is a hole, the other eight are fixed; candidates are denoised as",
        "rows of the same passes and the most confident hole wins.",
        "",
        "| candidate lengths | rows per answer | line correct | chose 9 | chose longer | passes/canvas | s/answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["fim"].items():
        lines.append(
            f"| {name} | {r['rows_per_answer']} | {r['line_correct']:.1%} | {r['chosen_9']:.1%} | "
            f"{r['chosen_longer']:.1%} | {r['passes_per_canvas']:.1f} | {r['seconds_per_answer']:.3f} |"
        )
    lines += ["", "Predicted outputs (the whole grid):", "",
              "| prediction | solved | passes/canvas | s/puzzle (batched) | accepted prediction tokens |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, r in results["prediction"].items():
        acc = "" if r["accepted_prediction_tokens"] is None else f"{r['accepted_prediction_tokens']:.1f}"
        lines.append(
            f"| {name} | {r['solved']:.1%} | {r['passes_per_canvas']:.1f} | {r['seconds_per_puzzle_batched']:.3f} "
            f"| {acc} |"
        )
    (out / "infill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
