"""Infill templates, fill-in-the-middle (`suffix`, llama.cpp's /infill) and predicted outputs over HTTP, with the
official `openai` package: mechanics on tiny-random, and the shipped tiny-sudoku filling a grid."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ServerProcess
from tests.schemas import validate

ROOT = Path(__file__).resolve().parents[1]
SUDOKU = ROOT / "models" / "tiny-sudoku"
FAST = {"denoising_steps": 3}
SUFFIX = " ZQXJ_END"


def test_chat_template_answer_keeps_fixed_text_and_drafts_mark_it(client, tokenizer):
    template = ["Name: ", {"hole": 4}, "\nCity: ", {"hole": 3.0}, "."]  # 3.0 is a JSON integer too
    r = client.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "hi"}], seed=3,
        extra_body={**FAST, "infill": {"template": template}},
    )  # fmt: skip
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert text.startswith("Name: ") and "\nCity: " in text and text.endswith(".")
    assert text.index("Name: ") < text.index("\nCity: ")
    fixed = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in template if isinstance(t, str))
    assert fixed <= r.usage.completion_tokens <= fixed + 4 + 3  # the fixed tokens, and at most the holes
    chunks = list(
        client.chat.completions.create(
            model="tiny-random", messages=[{"role": "user", "content": "hi"}], seed=3, stream=True,
            extra_body={**FAST, "infill": {"template": template}},
        )
    )  # fmt: skip
    drafts = [c.choices[0].model_extra["draft"] for c in chunks if c.choices and c.choices[0].model_extra.get("draft")]
    assert len(drafts) == 3  # one per pass
    for d in drafts:
        fixed = [d["text"][a:b] for a, b in d["fixed_spans"]]
        assert fixed[0] == "Name: " and "\nCity: " in fixed and fixed[-1] == "."
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text


def test_completions_template_across_canvases(client, tokenizer):
    # tiny-random's canvas is 32 tokens: a 40-token hole makes the template span two canvases and more.
    template = ["BEGIN", {"hole": 40}, " MIDDLE", {"hole": 10}, " END"]
    r = client.completions.create(
        model="tiny-random", prompt="x", seed=4, extra_body={**FAST, "infill": {"template": template}}
    )
    text = r.choices[0].text
    assert text.startswith("BEGIN") and " MIDDLE" in text and text.endswith(" END")
    assert r.choices[0].model_extra["diffusion"]["canvases"] >= 2
    assert r.choices[0].finish_reason == "stop"


def test_suffix_returns_only_the_middle(client, tokenizer):
    kw = dict(model="tiny-random", prompt="def area(r):\n    return", suffix=SUFFIX, max_tokens=8, seed=5, logprobs=0,
              extra_body=FAST)  # fmt: skip
    r = client.completions.create(**kw)
    choice = r.choices[0]
    assert SUFFIX not in choice.text and "ZQXJ" not in choice.text
    assert choice.finish_reason == "stop"
    diffusion = choice.model_extra["diffusion"]
    candidates = diffusion["candidates"]
    assert [c["hole"] for c in candidates] == [8, 4, 2, 1]  # max_tokens, then halves
    scores = [c["template_logprob"] for c in candidates]
    assert diffusion["chosen"] == scores.index(max(scores))
    # usage counts the middle's tokens, which are exactly the tokens the logprobs list
    assert r.usage.completion_tokens == len(choice.logprobs.tokens) <= candidates[diffusion["chosen"]]["hole"]
    assert "".join(choice.logprobs.tokens) == choice.text
    assert r.usage.prompt_tokens == len(tokenizer("def area(r):\n    return")["input_ids"])
    # Streamed: drafts of every candidate, then the same middle.
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    drafts = [c.choices[0].model_extra["draft"] for c in chunks if c.choices and c.choices[0].model_extra.get("draft")]
    assert {d["candidate"] for d in drafts} == {0, 1, 2, 3} and {d["hole"] for d in drafts} == {8, 4, 2, 1}
    assert all(d["text"].endswith(SUFFIX) for d in drafts)  # the suffix is fixed in every pass
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_middle_lengths_and_n(client):
    r = client.completions.create(
        model="tiny-random", prompt="x = ", suffix=SUFFIX, max_tokens=8, seed=1, n=2,
        extra_body={**FAST, "middle_lengths": [5, 3]},
    )  # fmt: skip
    assert len(r.choices) == 2
    for c in r.choices:
        assert [x["hole"] for x in c.model_extra["diffusion"]["candidates"]] == [5, 3]
        assert SUFFIX not in c.text


def test_llama_cpp_infill_matches_the_completion(server):
    body = {"input_prefix": "def f(x):\n    ", "input_suffix": "\n    return y\n", "n_predict": 6, "seed": 9,
            "denoising_steps": 3, "samplers": ["top_k", "temperature"], "cache_prompt": True}  # fmt: skip
    r = httpx.post(server.base_url + "/infill", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    for key in ("content", "stop", "model", "tokens_predicted", "tokens_evaluated", "generation_settings",
                "stop_type", "timings", "truncated", "has_new_line"):  # fmt: skip
        assert key in answer, key
    assert answer["stop"] is True and answer["stop_type"] == "eos"
    assert answer["timings"]["predicted_n"] == answer["tokens_predicted"]
    same = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x").completions.create(
        model="tiny-random", prompt=body["input_prefix"], suffix=body["input_suffix"], max_tokens=6, seed=9,
        extra_body={"denoising_steps": 3},
    )  # fmt: skip
    assert answer["content"] == same.choices[0].text
    assert answer["tokens_predicted"] == same.usage.completion_tokens
    # `prompt` is typed middle: it goes to the prompt and the answer does not repeat it.
    typed = httpx.post(server.base_url + "/infill", json={**body, "prompt": "y = "}, timeout=60).json()
    assert typed["prompt"].endswith("y = ") and not typed["content"].startswith("y = ")
    # llama.cpp's stream: data lines, the last one with stop true.
    with httpx.stream("POST", server.base_url + "/infill", json={**body, "stream": True}, timeout=60) as s:
        events = [line.removeprefix("data: ") for line in s.iter_lines() if line.startswith("data: ")]
    import json

    parsed = [json.loads(e) for e in events]
    assert parsed[-1]["stop"] is True and all(p["stop"] is False for p in parsed[:-1])
    assert "".join(p["content"] for p in parsed) == answer["content"]


def test_prediction_usage_counts_kept_tokens(client):
    prediction = "The quick brown fox jumps over the lazy dog."
    r = client.completions.create(
        model="tiny-random", prompt="Say it:", max_tokens=40, seed=2, logprobs=0,
        extra_body={**FAST, "prediction": {"type": "content", "content": [{"type": "text", "text": prediction}]}},
    )  # fmt: skip
    details = r.usage.completion_tokens_details
    assert details is not None
    validate(r.model_dump(exclude_unset=True), "CreateCompletionResponse")
    total = details.accepted_prediction_tokens + details.rejected_prediction_tokens
    assert total > 0 and details.accepted_prediction_tokens >= 0
    plain = client.completions.create(model="tiny-random", prompt="Say it:", max_tokens=40, seed=2, extra_body=FAST)
    assert plain.usage.completion_tokens_details is None


@pytest.fixture(scope="module")
def sudoku_server():
    if not (SUDOKU / "config.json").exists():
        pytest.skip("tiny-sudoku not shipped")
    proc = ServerProcess(["--model", str(SUDOKU), "--served-model-name", "tiny-sudoku"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


# A held-out puzzle (models/sudoku/heldout.txt, 47 givens) and its solution.
PUZZLE = "45..92.6362.38.47531.654.822....8547571946.2884...761..854...36.34265...962813.54"
SOLUTION = "458792163629381475317654982296138547571946328843527619185479236734265891962813754"


def rows(grid: str) -> list[str]:
    return [grid[r * 9 : r * 9 + 9] for r in range(9)]


@pytest.mark.parametrize("hole", [0, 4, 8])
def test_shipped_sudoku_model_fills_a_missing_line(sudoku_server, hole):
    template: list = []
    for r, line in enumerate(rows(SOLUTION)):
        template.append({"hole": 9} if r == hole else line)
        if r < 8:
            template.append("\n")
    client = openai.OpenAI(base_url=sudoku_server.base_url + "/v1", api_key="x")
    r = client.chat.completions.create(
        model="tiny-sudoku", messages=[{"role": "user", "content": PUZZLE}], seed=0,
        extra_body={"infill": {"template": template}},
    )  # fmt: skip
    lines = r.choices[0].message.content.split("\n")
    assert lines == rows(SOLUTION)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 89  # 81 digits + 8 line breaks


def test_a_prediction_on_the_sudoku_model_is_accounted_per_position(sudoku_server):
    client = openai.OpenAI(base_url=sudoku_server.base_url + "/v1", api_key="x")
    wrong = list(SOLUTION)
    for i in (0, 10, 40):  # three blanks predicted wrong
        wrong[i] = "1" if wrong[i] != "1" else "2"
    prediction = "\n".join(rows("".join(wrong)))
    r = client.chat.completions.create(
        model="tiny-sudoku",
        messages=[{"role": "user", "content": PUZZLE}],
        seed=0,
        prediction={"type": "content", "content": prediction},
    )
    text = r.choices[0].message.content
    details = r.usage.completion_tokens_details
    # One character is one token here: accepted = predicted characters the answer kept at their positions.
    assert details.accepted_prediction_tokens == sum(1 for a, b in zip(text, prediction, strict=False) if a == b)
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == len(prediction)
    assert text.replace("\n", "") == SOLUTION  # the model repairs the wrong cells
