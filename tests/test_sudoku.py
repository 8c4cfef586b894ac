"""tiny-sudoku: puzzle generation, symmetries, the chat template that reads a grid, the training script, and
the shipped checkpoint served through the engine."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from models.sudoku import puzzles
from models.sudoku.tokenizer import HELP, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "tiny-sudoku"
PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"


def test_generated_puzzles_have_one_solution_and_the_asked_givens():
    rng = random.Random(1)
    for givens in (40, 32, 26):
        solution = puzzles.random_grid(rng)
        assert puzzles.is_valid_solution(solution)
        puzzle = puzzles.make_puzzle(solution, givens, rng)
        assert 81 - puzzle.count(".") >= givens
        assert puzzles.count_solutions(puzzle) == 1
        assert puzzles.solve(puzzle) == solution


def test_symmetries_preserve_validity_and_uniqueness():
    rng = random.Random(2)
    solution = puzzles.random_grid(rng)
    puzzle = puzzles.make_puzzle(solution, 30, rng)
    for _ in range(20):
        sym = puzzles.transform(solution, rng)
        new_solution, new_puzzle = puzzles.apply(solution, sym), puzzles.apply(puzzle, sym)
        assert puzzles.is_valid_solution(new_solution, new_puzzle)
        assert new_puzzle.count(".") == puzzle.count(".")
        assert puzzles.count_solutions(new_puzzle) == 1


def test_validity_checks_reject_clashes():
    bad = "1" * 81
    assert not puzzles.is_valid_solution(bad)
    assert puzzles.count_solutions("11" + "." * 79) == 0
    assert puzzles.to_lines("123456789" * 9).count("\n") == 8


@pytest.fixture(scope="module")
def sudoku_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("sudoku-tok")
    save_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def _prompt(tok, content) -> str:
    return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize(
    "content",
    [
        PUZZLE,
        PUZZLE.replace(".", "0"),
        "\n".join(" ".join(PUZZLE[r * 9 : r * 9 + 9]) for r in range(9)),
        "\n".join("|".join(PUZZLE[r * 9 + c * 3 : r * 9 + c * 3 + 3] for c in range(3)) for r in range(9)),
        [{"type": "text", "text": PUZZLE}],
    ],
    ids=["dots", "zeros", "spaced-lines", "grid-lines", "content-parts"],
)
def test_chat_template_reads_the_grid_in_any_layout(sudoku_tokenizer, content):
    assert _prompt(sudoku_tokenizer, content) == f"<bos><start_of_turn>{PUZZLE}<end_of_turn><start_of_turn>"


@pytest.mark.parametrize("content", ["hello", PUZZLE[:80], PUZZLE + "1", PUZZLE[:40] + "x" + PUZZLE[41:]])
def test_chat_template_turns_non_puzzles_into_a_help_request(sudoku_tokenizer, content):
    assert _prompt(sudoku_tokenizer, content) == "<bos><start_of_turn>?<end_of_turn><start_of_turn>"


def test_training_script_writes_a_checkpoint_the_engine_serves(tmp_path):
    out = tmp_path / "ckpt"
    subprocess.run(
        [sys.executable, "-m", "models.sudoku.train", "--minutes", "0.02", "--out", str(out), "--layers", "2",
         "--hidden", "32", "--pool", "20", "--batch", "4"],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from tests.helpers import run_to_end

    engine = LLMEngine(EngineConfig(compile=False, model=str(out)))
    assert engine.canvas_length == 90 and (out / "training.json").exists()
    tok = engine.tokenizer
    ids = tok(_prompt(tok, PUZZLE), add_special_tokens=False)["input_ids"]
    params = engine.defaults.with_changes(max_tokens=90, seed=0)
    [result] = run_to_end(engine, [(ids, params)])
    finish = result["finish"]
    assert finish.canvases == 1 and 1 <= finish.passes <= params.denoising_steps
    assert finish.completion_tokens == len(result["answer_ids"]) >= 1
    assert run_to_end(engine, [(ids, params)])[0]["answer_ids"] == result["answer_ids"]  # the seed reproduces it


def test_training_batches_from_worker_processes_are_reproducible():
    """The GPU path of train.py (`--workers`): the pool is the same whatever the number of processes making it,
    and batches dealt by worker processes come back in the same order on every run with the same seed."""
    from models.sudoku.train import BatchWorkers, Data

    pools = []
    for workers in (1, 2):
        data = Data(3, 0, 22, 40)
        data.grow_parallel(4, workers, seed=3)
        pools.append(data.bases)
    assert pools[0] == pools[1] and len(pools[0]) == 4
    assert all(puzzles.count_solutions(p) == 1 and p.count(".") > 0 for p, _ in pools[0])
    runs = []
    for _ in range(2):
        batches = BatchWorkers(data, 2, seed=5, size=3, given_weight=0.5)
        runs.append([[t.tolist() for t in batches.next()] for _ in range(4)])
        batches.close()
    assert runs[0] == runs[1]
    # Worker i deals from its own seed; the batches alternate between the two workers.
    dealers = [random.Random(5 * 7919 + i) for i in range(2)]
    expected = []
    for k in range(4):
        data.rng = dealers[k % 2]
        expected.append([list(x) for x in data.puzzle_lists(3, 0.5)])
    assert runs[0] == expected and expected[0] != expected[1]


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="tiny-sudoku not trained yet")
def test_shipped_model_answers_in_the_grid_format_and_helps_on_non_puzzles():
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from tests.helpers import run_to_end

    engine = LLMEngine(EngineConfig(compile=False, model="tiny-sudoku"))
    assert (SHIPPED / "model.safetensors").stat().st_size <= 16 * 1024 * 1024
    tok = engine.tokenizer
    rng = random.Random(99)
    items = []
    for _ in range(4):
        solution = puzzles.random_grid(rng)
        items.append((puzzles.make_puzzle(solution, 45, rng), solution))
    requests = [(tok(_prompt(tok, p), add_special_tokens=False)["input_ids"], engine.defaults.with_changes(seed=0))
                for p, _ in items]  # fmt: skip
    for i, message in enumerate(["what is this?", "1 2 3 4 5 6 7 8 9"]):
        requests.append((tok(_prompt(tok, message), add_special_tokens=False)["input_ids"],
                         engine.defaults.with_changes(seed=i)))  # fmt: skip
    results = run_to_end(engine, requests)
    for result in results[:-2]:
        text = tok.decode(result["answer_ids"], skip_special_tokens=True)
        lines = text.split("\n")
        assert len(lines) == 9 and all(len(line) == 9 and line.isdigit() for line in lines), text
    # The help reply is learned, not hard-coded: the model writes it from the template's help request.
    for result in results[-2:]:
        assert tok.decode(result["answer_ids"], skip_special_tokens=True) == HELP


def test_grown_checkpoint_computes_what_its_source_computes(tmp_path):
    """models/sudoku/grow.py doubles the depth of a checkpoint without changing a single logit: each new layer
    adds nothing until training moves its output norms."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from models.sudoku.train import model_config

    torch.manual_seed(0)
    source = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(**model_config(2, 32))).eval()
    with torch.no_grad():  # a random init has all-ones norms; perturb them so the copies' zeroing is what counts
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    src = tmp_path / "src"
    source.save_pretrained(src)
    save_tokenizer(src)
    (src / "training.json").write_text('{"seed": 0}\n')
    subprocess.run(
        [sys.executable, "-m", "models.sudoku.grow", "--init", str(src), "--out", str(tmp_path / "grown")],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    grown = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "grown").eval()
    assert grown.config.text_config.num_hidden_layers == 4
    assert grown.config.text_config.layer_types == ["sliding_attention"] * 2 + ["full_attention"] * 2
    prompt, canvas = torch.randint(10, 100, (2, 30)), torch.randint(10, 100, (2, 90))
    with torch.no_grad():
        before = source(input_ids=prompt, decoder_input_ids=canvas).logits
        after = grown(input_ids=prompt, decoder_input_ids=canvas).logits
        sc_before = source(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=before).logits
        sc_after = grown(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=after).logits
    assert torch.allclose(before, after, atol=1e-5) and torch.allclose(sc_before, sc_after, atol=1e-5)
    assert '"grown_from"' in (tmp_path / "grown" / "training.json").read_text()


def test_evaluation_splits_buckets_and_marks_what_a_run_did_not_measure():
    from models.sudoku.evaluate import bucket_of, limit_per_bucket, load_heldout, render_table, summarize

    items = load_heldout()
    part = limit_per_bucket(items, 3, start=2)  # --start 2 --limit 3: puzzles 2, 3, 4 of each bucket
    by_bucket = {}
    for it in items:
        by_bucket.setdefault(bucket_of(it[0]), []).append(it)
    assert part == [it for v in by_bucket.values() for it in v[2:5]]
    assert limit_per_bucket(items, 0, start=248) == [it for v in by_bucket.values() for it in v[248:]]

    only = by_bucket["20-25"][:2]  # no puzzle with 32+ givens: no latency
    row = summarize(only, [s for _, s in only], [10.0, 20.0], [8.0, 4.0], None)
    assert row["solve_rate"] == {"20-25": 1.0} and row["passes_per_canvas"] == 15.0
    table = render_table({"diffusion (defaults), 2 puzzles": row}, only, threads=2)
    assert table.splitlines()[0].startswith("Held-out puzzles: 2 (20-25 givens); latency")
    assert "| diffusion (defaults), 2 puzzles | 100.0% | - | - | - | 15.0 | 6.00 | - |" in table
    assert "nan" not in table
