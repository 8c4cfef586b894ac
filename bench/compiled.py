"""Compiled passes against transformers' generate(): the equivalence test's cases (tests/test_equivalence.py) run
through an engine with compiled passes, on the same stock-kernel models; reports which cases give the reference's
seeded tokens exactly, and the largest logit difference between a compiled and an eager first pass.

    python bench/compiled.py          # CPU, fp32; writes bench/results/compiled-equivalence.{json,md}
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent)]

import torch  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.tiny_random import build_tiny_model, save_checkpoint  # noqa: E402
from tests.helpers import run_to_end  # noqa: E402
from tests.test_equivalence import CASES, reference_case  # noqa: E402


def first_pass_logits(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    state = engine.make_request(prompt, params)
    engine.add_request(state)
    engine.scheduler.schedule()
    while state.canvas is None:
        engine._prefill(lambda *_: None)
    logits = engine.runner.denoise_logits([state]).clone()
    engine.scheduler.finish(state)
    engine.runner.release_prefix()
    return logits


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        for canvas, sharpen in sorted({(c.canvas, c.sharpen) for c in CASES}):
            path = Path(tmp) / f"c{canvas}-s{sharpen}"
            model = build_tiny_model(seed=canvas, canvas_length=canvas)
            with torch.no_grad():
                model.lm_head.weight.mul_(sharpen)
            save_checkpoint(model, path)
            loaded = load_model(EngineConfig(model=str(path), batch_invariant=False))
            compiled = LLMEngine(
                EngineConfig(model=str(path), max_num_seqs=1, compile=True, batch_invariant=False), loaded=loaded
            )
            eager = LLMEngine(EngineConfig(model=str(path), compile=False, batch_invariant=False), loaded=loaded)
            engines[canvas, sharpen] = (loaded, compiled, eager)
        for case in CASES:
            loaded, compiled, eager = engines[case.canvas, case.sharpen]
            prompt, params, expected, _, _ = reference_case(loaded, case)
            got = run_to_end(compiled, [(prompt, params)])[0]["answer_ids"]
            diff = (first_pass_logits(compiled, prompt, params) - first_pass_logits(eager, prompt, params)).abs().max()
            same = sum(a == b for a, b in zip(got, expected, strict=False))
            rows.append(
                {
                    "case": case.name,
                    "identical": got == expected,
                    "same_tokens": same / max(len(expected), 1),
                    "max_logit_diff": diff.item(),
                }
            )
    identical = sum(r["identical"] for r in rows)
    worst = max(r["max_logit_diff"] for r in rows)
    lines = [
        f"Compiled passes vs transformers generate() on the {len(rows)} equivalence cases (tiny models, fp32, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}): {identical}/{len(rows)} cases give "
        f"identical seeded tokens; largest |compiled - eager| first-pass logit {worst:.2e}.",
        "",
        "| case | identical | same tokens | max logit diff |",
        "|---|---|---|---|",
        *(
            f"| {r['case']} | {'yes' if r['identical'] else 'no'} | {r['same_tokens']:.0%} "
            f"| {r['max_logit_diff']:.1e} |"
            for r in rows
        ),
    ]
    table = "\n".join(lines)
    print(table)
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compiled-equivalence.json").write_text(json.dumps({"torch": torch.__version__, "cases": rows}, indent=1))
    (out / "compiled-equivalence.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
