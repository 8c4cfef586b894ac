"""Evaluate tiny-sudoku (through Press's own engine) and the autoregressive baseline on held-out puzzles.

Held-out puzzles come from grids generated with seeds the training never uses, each with a unique solution,
bucketed by number of givens. Reports exact-solve rate per bucket, passes per canvas, tokens per forward and
latency per puzzle (batch 1, this machine), at the checkpoint's defaults and at reasoning_effort low/medium/high,
and with canvas constraints: the givens fixed in the canvas (an infill template of nine lines, givens fixed,
blanks one-token holes), and a prediction that is the solution with k blank cells wrong (the canvases start
from it).

    python -m models.sudoku.evaluate --model models/tiny-sudoku --ar models/sudoku/ar-baseline
"""

from __future__ import annotations

import argparse
import json
import random
import time
import zlib
from pathlib import Path

import torch

from engine.sampling_params import BEST_OF_VERIFY_PASSES, REASONING_EFFORT_BEST_OF
from models.sudoku import puzzles

HELDOUT = Path(__file__).with_name("heldout.txt")
BUCKETS = [(20, 25), (26, 31), (32, 40), (41, 60)]


def build_heldout(per_bucket: int = 250, seed: int = 10_000) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out: dict[tuple[int, int], list] = {b: [] for b in BUCKETS}
    while any(len(v) < per_bucket for v in out.values()):
        solution = puzzles.random_grid(rng)
        lo, hi = rng.choice([b for b in BUCKETS if len(out[b]) < per_bucket])
        puzzle = puzzles.make_puzzle(solution, rng.randint(lo, hi), rng)
        givens = 81 - puzzle.count(".")
        for b in BUCKETS:
            if b[0] <= givens <= b[1] and len(out[b]) < per_bucket:
                out[b].append((puzzle, solution))
    return [p for b in BUCKETS for p in out[b]]


def load_heldout() -> list[tuple[str, str]]:
    if not HELDOUT.exists():
        HELDOUT.write_text("".join(f"{p} {s}\n" for p, s in build_heldout()))
    return [tuple(line.split()) for line in HELDOUT.read_text().splitlines()]


def bucket_of(puzzle: str) -> str:
    givens = 81 - puzzle.count(".")
    lo, hi = next(b for b in BUCKETS if b[0] <= givens <= b[1])
    return f"{lo}-{hi}"


def grid_of(text: str) -> str:
    return "".join(ch for ch in text if ch in "123456789")


def givens_template(puzzle: str, tok, eos: int, fillers: set[int]):
    """The answer as an infill template: givens and line breaks fixed, each blank a one-token hole."""
    from engine.constraints import CanvasConstraints

    ids = {ch: tok.convert_tokens_to_ids(ch) for ch in "123456789\n"}
    segments: list = []
    for i, ch in enumerate(puzzle):
        segments.append(1 if ch == "." else [ids[ch]])
        if i % 9 == 8 and i < 80:
            segments.append([ids["\n"]])
    return CanvasConstraints.template(segments, eos, fillers)


def wrong_prediction(puzzle: str, solution: str, k: int, seed: int) -> str:
    """The solution with k of the puzzle's blank cells changed to another digit, as answer lines."""
    rng = random.Random(seed)
    cells = list(solution)
    blanks = [i for i, ch in enumerate(puzzle) if ch == "."]
    for i in rng.sample(blanks, min(k, len(blanks))):
        cells[i] = rng.choice([d for d in "123456789" if d != cells[i]])
    return puzzles.to_lines("".join(cells))


def eval_diffusion(path: str, items, effort: str | None, batch: int = 32, quantization: str = "none") -> dict:
    """`effort`: None (the checkpoint's defaults), greedy, low/medium/high (reasoning_effort), fixed (givens
    fixed in the canvas) or predictK (canvases start from the solution with K blank cells wrong)."""
    from engine.config import EngineConfig
    from engine.constraints import CanvasConstraints
    from engine.engine import LLMEngine
    from engine.events import CommitEvent, FinishEvent
    from engine.sampling_params import REASONING_EFFORT_PRESETS
    from server.best_of import answer_score, rank

    engine = LLMEngine(EngineConfig(model=path, max_num_seqs=batch, quantization=quantization))
    tok = engine.tokenizer
    params = engine.defaults.with_changes(max_tokens=engine.canvas_length, seed=0, include_drafts=False)
    eos = engine.defaults.eos_token_ids[0]
    fillers = {eos, engine.loaded.model.config.get_text_config().pad_token_id}
    constraints = None
    candidates = 1  # rows per puzzle; more: the best answer, as the server's best_of picks it
    if effort == "greedy":
        params = params.with_changes(t_min=0.0, t_max=0.0)  # what `temperature: 0` asks for over the API
    elif effort == "fixed":

        def constraints(p, s):
            return givens_template(p, tok, eos, fillers)

    elif effort and effort.startswith("predict"):
        k = int(effort.removeprefix("predict"))

        def constraints(p, s):
            text = wrong_prediction(p, s, k, seed=zlib.crc32(p.encode()))
            return CanvasConstraints.prediction(list(tok(text, add_special_tokens=False)["input_ids"]), eos)
    elif effort:
        params = params.with_changes(**REASONING_EFFORT_PRESETS[effort])
        candidates = REASONING_EFFORT_BEST_OF[effort]
        if candidates > 1:  # ranked as the server ranks best_of rows (server/best_of.py)
            params = params.with_changes(logprobs=0, verify=BEST_OF_VERIFY_PASSES)

    def prompt(p: str) -> list[int]:
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def run(subset) -> list:
        """(state, finish) per puzzle: with several candidates, the one whose answer scores best. Candidate i
        has seed params.seed + i (as the server seeds a best_of request's rows)."""
        finishes: dict[str, FinishEvent] = {}
        logprobs: dict[str, list[float]] = {}
        states = []
        for p, solution in subset:
            for i in range(candidates):
                s = engine.make_request(prompt(p), params.with_changes(seed=params.seed + i),
                                        constraints=constraints(p, solution) if constraints else None)  # fmt: skip
                states.append(s)
                engine.add_request(s)

        def on_event(st, ev) -> None:
            if isinstance(ev, FinishEvent):
                finishes[st.request_id] = ev
            elif isinstance(ev, CommitEvent):
                logprobs.setdefault(st.request_id, []).extend(t.logprob for t in ev.logprobs or [])

        while engine.has_unfinished():
            engine.step(on_event)
        out = []
        for k in range(0, len(states), candidates):
            group = states[k : k + candidates]
            scores = [
                answer_score(logprobs.get(s.request_id, []), finishes[s.request_id].verified_logprob) for s in group
            ]
            best = group[rank(scores)[0]]
            out.append((best, finishes[best.request_id]))
        return out

    results = run(items)
    return summarize(
        items,
        [tok.decode(s.answer_ids, skip_special_tokens=True) for s, _ in results],
        [f.passes / max(1, f.canvases) for _, f in results],
        [f.tokens_per_forward for _, f in results],
        batch1_latency(items, run),
    )


def eval_ar(path: str, items, batch: int = 64) -> dict:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path).eval()

    def prompt(p: str) -> list[int]:
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def run(subset) -> list[str]:
        ids = torch.tensor([prompt(p) for p, _ in subset])
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=90, do_sample=False, eos_token_id=1, pad_token_id=0)
        return [tok.decode(o[ids.shape[1] :], skip_special_tokens=True) for o in out]

    texts = []
    for i in range(0, len(items), batch):
        texts += run(items[i : i + batch])
    return summarize(items, texts, [90.0] * len(items), [1.0] * len(items), batch1_latency(items, run))


def batch1_latency(items, run) -> float | None:
    """Mean seconds for `run` on one puzzle at a time, over the first 20 puzzles with 32+ givens (None if none)."""
    latency_items = [it for it in items if 81 - it[0].count(".") >= 32][:20]
    if not latency_items:
        return None
    t0 = time.perf_counter()
    for it in latency_items:
        run([it])
    return (time.perf_counter() - t0) / len(latency_items)


def summarize(items, texts, passes, tpf, latency) -> dict:
    by: dict[str, list[bool]] = {}
    for (p, s), text in zip(items, texts, strict=True):
        grid = grid_of(text)
        by.setdefault(bucket_of(p), []).append(grid == s or puzzles.is_valid_solution(grid, p))
    return {
        "solve_rate": {k: sum(v) / len(v) for k, v in by.items()},
        "counts": {k: len(v) for k, v in by.items()},
        "passes_per_canvas": sum(passes) / len(passes),
        "tokens_per_forward": sum(tpf) / len(tpf),
        "latency_s_per_puzzle_batch1": latency,
    }


def limit_per_bucket(items, limit: int, start: int = 0):
    """At most `limit` puzzles per bucket (0: all), after skipping the first `start` of each."""
    if not limit and not start:
        return items
    picked: dict[str, list] = {}
    for it in items:
        picked.setdefault(bucket_of(it[0]), []).append(it)
    return [it for v in picked.values() for it in v[start : start + limit if limit else None]]


def render_table(rows: dict, items, threads: int) -> str:
    """eval.md's table: a column per givens bucket; a bucket or latency a row did not measure shows '-'."""
    buckets = [f"{lo}-{hi}" for lo, hi in BUCKETS]
    seen = {bucket_of(p) for p, _ in items}
    present = [b for b in buckets if b in seen]
    lines = [
        f"Held-out puzzles: {len(items)} ({', '.join(f'{b} givens' for b in present)}); latency at batch 1 on "
        f"this machine's CPU ({threads} threads), puzzles with 32+ givens.",
        "",
        "| model | " + " | ".join(f"solved {b}" for b in buckets) + " | passes/canvas | tokens/forward | s/puzzle |",
        "|---|" + "---|" * (len(buckets) + 3),
    ]
    for name, r in rows.items():
        solved = " | ".join(f"{r['solve_rate'][b]:.1%}" if b in r["solve_rate"] else "-" for b in buckets)
        latency = r["latency_s_per_puzzle_batch1"]
        lines.append(
            f"| {name} | {solved} | {r['passes_per_canvas']:.1f} | {r['tokens_per_forward']:.2f} | "
            f"{'-' if latency is None else f'{latency:.3f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/tiny-sudoku")
    ap.add_argument("--ar", default=None, help="autoregressive baseline checkpoint")
    ap.add_argument("--limit", type=int, default=0, help="evaluate at most this many puzzles per bucket")
    ap.add_argument("--start", type=int, default=0, help="skip the first this many puzzles of each bucket")
    ap.add_argument(
        "--effort-limit", type=int, default=100, help="puzzles per bucket for the reasoning_effort rows (0 = all)"
    )
    ap.add_argument(
        "--configs",
        default="defaults,greedy,low,medium,high",
        help="comma-separated diffusion settings to evaluate: defaults, greedy (temperature 0), low, medium, high, "
        "fixed (givens fixed in the canvas), predictK (a prediction with K blank cells wrong, e.g. predict5)",
    )
    ap.add_argument("--buckets", default=None, help="givens buckets to evaluate, e.g. 26-31,32-40 (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantization", default="none", help="weight-only quantization at load: none, int8, int4, fp8")
    ap.add_argument("--out", default=None, help="where to write eval.json/eval.md (default: the model dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    items = load_heldout()
    if args.buckets:
        items = [it for it in items if bucket_of(it[0]) in args.buckets.split(",")]
    items = limit_per_bucket(items, args.limit, args.start)
    rows = {}
    for name in args.configs.split(","):
        effort = None if name == "defaults" else name
        label = {None: "defaults", "greedy": "temperature 0", "fixed": "givens fixed in the canvas"}.get(
            effort, f"reasoning_effort {effort}"
        )
        if effort and effort.startswith("predict"):
            label = f"prediction with {effort.removeprefix('predict')} cells wrong"
        if REASONING_EFFORT_BEST_OF.get(effort or "", 1) > 1:
            label += f": the best of {REASONING_EFFORT_BEST_OF[effort]} answers by the verification passes"
        full = effort in (None, "greedy", "fixed") or effort.startswith("predict")
        subset = items if full else limit_per_bucket(items, args.effort_limit)
        rows[f"diffusion ({label}), {len(subset)} puzzles"] = eval_diffusion(
            args.model, subset, effort, batch=64, quantization=args.quantization
        )
        print(rows, flush=True)
    if args.ar:
        rows[f"autoregressive (greedy), {len(items)} puzzles"] = eval_ar(args.ar, items)
    table = render_table(rows, items, torch.get_num_threads())
    print(table)
    out = Path(args.out or args.model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "eval.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
