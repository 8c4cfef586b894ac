"""What a grammar costs and what it buys: constrained against unconstrained requests in one run.

1. Overhead, built-in tiny-random model, batch 1 and 8: the same seeded requests unconstrained, with the grammar
   masking every pass (in-pass), and with the grammar read only at commit (commit-only). Reports ms per pass,
   the grammar's own ms per pass (walk + masks) and per commit, and the share of answers that validate. Pass
   times are medians over passes with the whole batch present, so rows that finish early do not flatter a mode.
   Random weights never get confident, so every canvas runs all its passes in every mode.
2. Passes per canvas and tokens per forward on a model that does converge, the shipped tiny-sudoku, with a
   grammar for its answer layout (nine lines of nine digits): unconstrained, commit-only and in-pass, and the
   solve rate on held-out puzzles in each mode.

    python bench/structured.py            # CPU; writes bench/results/structured.{json,md}
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent)]

import jsonschema  # noqa: E402
import torch  # noqa: E402
from llguidance import LLMatcher  # noqa: E402

from engine import grammar as grammar_module  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.events import FinishEvent  # noqa: E402
from engine.host_allocator import tune_host_allocator  # noqa: E402
from engine.tiny_random import ensure_tiny_random  # noqa: E402
from server.structured_outputs import JSON_LAYOUT  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "plan": {"enum": ["free", "pro", "team"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "plan", "tags", "active"],
    "additionalProperties": False,
}
SUDOKU_LAYOUT = r"([1-9]{9}\n){8}[1-9]{9}"


class GrammarClock:
    """Time spent in the grammar's walk and masks, split by where it ran: in a pass or at a commit."""

    def __init__(self) -> None:
        self.seconds = {"pass": 0.0, "commit": 0.0}
        self.calls = {"pass": 0, "commit": 0}
        self._walk, self._mask = grammar_module.GrammarConstraint.walk, grammar_module.GrammarConstraint.mask_logits
        clock = self

        def walk(constraint, logits, limit):
            where = "pass" if constraint.in_pass else "commit"
            t = time.perf_counter()
            try:
                return clock._walk(constraint, logits, limit)
            finally:
                clock.seconds[where] += time.perf_counter() - t
                clock.calls[where] += 1

        def mask(constraint, logits, length):
            t = time.perf_counter()
            try:
                return clock._mask(constraint, logits, length)
            finally:
                clock.seconds["pass"] += time.perf_counter() - t

        grammar_module.GrammarConstraint.walk = walk
        grammar_module.GrammarConstraint.mask_logits = mask

    def reset(self) -> None:
        self.seconds = {"pass": 0.0, "commit": 0.0}
        self.calls = {"pass": 0, "commit": 0}


def run(engine: LLMEngine, requests: list[tuple[list[int], object, str | None, bool]]) -> tuple[list, float]:
    """Run requests together; returns (state, finish) per request and the wall time."""
    states, finishes = [], {}
    for prompt, params, grammar, in_pass in requests:
        matcher = engine.compile_grammar(grammar) if grammar else None
        state = engine.make_request(prompt, params, grammar=matcher, grammar_in_pass=in_pass)
        states.append(state)
        engine.add_request(state)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step(lambda s, e: finishes.__setitem__(s.request_id, e) if isinstance(e, FinishEvent) else None)
    return [(s, finishes[s.request_id]) for s in states], time.perf_counter() - t0


def overhead(repeats: int) -> list[dict]:
    engine = LLMEngine(EngineConfig(model=str(ensure_tiny_random()), max_num_seqs=8))
    clock = GrammarClock()
    passes: list[tuple[int, float, float]] = []  # (rows, seconds, grammar seconds) per batched pass
    denoise_pass = engine._denoise_pass

    def timed_pass(rows, emit):
        grammar_before = clock.seconds["pass"]
        t = time.perf_counter()
        denoise_pass(rows, emit)
        passes.append((len(rows), time.perf_counter() - t, clock.seconds["pass"] - grammar_before))

    engine._denoise_pass = timed_pass
    grammar = LLMatcher.grammar_from_json_schema(SCHEMA, overrides=JSON_LAYOUT)
    tok = engine.tokenizer
    prompts = [tok(f"Customer record number {i}:", add_special_tokens=False)["input_ids"] for i in range(8)]
    modes = {"unconstrained": (None, True), "in-pass": (grammar, True), "commit-only": (grammar, False)}
    rows = []
    for batch in (1, 8):
        best: dict[str, dict] = {}
        for _ in range(repeats):
            for mode, (g, in_pass) in modes.items():  # interleaved, so drift on a shared machine hits all modes
                params = engine.defaults.with_changes(max_tokens=96, denoising_steps=16, include_drafts=False)
                reqs = [(prompts[i], params.with_changes(seed=i), g, in_pass) for i in range(batch)]
                clock.reset()
                passes.clear()
                done, _ = run(engine, reqs)
                # Passes with the whole batch present (rows leave as their answers end): median time, mean
                # grammar time. A pass that commits canvases includes the commit.
                full = [p for p in passes if p[0] == batch]
                texts = [tok.decode(s.answer_ids, skip_special_tokens=True) for s, _ in done]
                stops = [t for t, (_, f) in zip(texts, done, strict=True) if f.finish_reason == "stop"]
                sample = {
                    "batch": batch,
                    "mode": mode,
                    "ms_per_pass": 1000 * statistics.median(p[1] for p in full),
                    "grammar_ms_per_pass": 1000 * sum(p[2] for p in full) / len(full),
                    "grammar_ms_per_commit": 1000 * clock.seconds["commit"] / max(1, clock.calls["commit"]),
                    "stop_answers": len(stops),
                    "valid_stop_answers": sum(1 for t in stops if _validates(t)) if g else None,
                    "answers": len(done),
                }
                if mode not in best or sample["ms_per_pass"] < best[mode]["ms_per_pass"]:
                    best[mode] = sample
        base = best["unconstrained"]["ms_per_pass"]
        for sample in best.values():
            sample["overhead_vs_unconstrained"] = sample["ms_per_pass"] / base - 1
            rows.append(sample)
    return rows


def _validates(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def sudoku(puzzles: int) -> list[dict]:
    from models.sudoku import puzzles as sudoku_puzzles
    from models.sudoku.evaluate import load_heldout

    engine = LLMEngine(EngineConfig(model="tiny-sudoku", max_num_seqs=32))
    tok = engine.tokenizer
    items = [it for it in load_heldout() if 81 - it[0].count(".") >= 32][:puzzles]
    grammar = LLMatcher.grammar_from_regex(SUDOKU_LAYOUT)
    rows = []
    for mode, g, in_pass in (
        ("unconstrained", None, True),
        ("commit-only", grammar, False),
        ("in-pass", grammar, True),
    ):
        reqs = []
        for i, (p, _) in enumerate(items):
            text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
            reqs.append((ids, engine.defaults.with_changes(max_tokens=engine.canvas_length, seed=i), g, in_pass))
        done, wall = run(engine, reqs)
        texts = [tok.decode(s.answer_ids, skip_special_tokens=True) for s, _ in done]
        grids = ["".join(ch for ch in t if ch.isdigit()) for t in texts]
        rows.append(
            {
                "mode": mode,
                "puzzles": len(items),
                "passes_per_canvas": sum(f.passes / f.canvases for _, f in done) / len(done),
                "tokens_per_forward": sum(f.tokens_per_forward for _, f in done) / len(done),
                "layout_valid": sum(bool(re.fullmatch(SUDOKU_LAYOUT, t)) for t in texts) / len(done),
                "solved": sum(sudoku_puzzles.is_valid_solution(g, p) for g, (p, _) in zip(grids, items, strict=True))
                / len(done),
                "seconds": wall,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--puzzles", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(_HERE / "results"))
    args = ap.parse_args()
    tune_host_allocator()
    torch.set_num_threads(args.threads)
    over = overhead(args.repeats)
    sud = sudoku(args.puzzles)
    lines = [
        f"CPU, {torch.get_num_threads()} thread(s); tiny-random, 16 passes per canvas, max_tokens 96; best of "
        f"{args.repeats} interleaved runs.",
        "",
        "| batch | mode | ms/pass | overhead | grammar ms/pass | grammar ms/commit | valid stop answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in over:
        valid = "" if r["valid_stop_answers"] is None else f"{r['valid_stop_answers']}/{r['stop_answers']}"
        lines.append(
            f"| {r['batch']} | {r['mode']} | {r['ms_per_pass']:.2f} | {r['overhead_vs_unconstrained']:+.1%} | "
            f"{r['grammar_ms_per_pass']:.2f} | {r['grammar_ms_per_commit']:.2f} | {valid} |"
        )
    lines += [
        "",
        f"tiny-sudoku, {sud[0]['puzzles']} held-out puzzles with 32+ givens, answer layout `{SUDOKU_LAYOUT}`:",
        "",
        "| mode | passes/canvas | tokens/forward | layout valid | solved |",
        "|---|---|---|---|---|",
    ]
    for r in sud:
        lines.append(
            f"| {r['mode']} | {r['passes_per_canvas']:.1f} | {r['tokens_per_forward']:.2f} | "
            f"{r['layout_valid']:.1%} | {r['solved']:.1%} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured.json").write_text(json.dumps({"overhead": over, "sudoku": sud}, indent=1) + "\n")
    (out / "structured.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
