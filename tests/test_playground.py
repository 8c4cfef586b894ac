"""The browser playground in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright,
against a real `press serve`. Skipped only where no browser is installed; CI sets PRESS_REQUIRE_BROWSER=1, which
turns a missing browser into a failure."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
SUDOKU = ROOT / "models" / "tiny-sudoku"
README_PUZZLE = "5....7.46....5.2.....1...38.53781.6...9.6...38...3..1..37..86529.5...48.1.6542..7"


def _chromium() -> str | None:
    return os.environ.get("PRESS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        path = None
    if path is None:
        if os.environ.get("PRESS_REQUIRE_BROWSER") == "1":
            pytest.fail("PRESS_REQUIRE_BROWSER=1 but no Chromium (or Playwright) is installed")
        pytest.skip("no Chromium installed (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    pg.console_errors = []
    pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
    yield pg
    context.close()


def run_page(pg, url: str, timeout: float = 120_000) -> dict:
    pg.goto(url)
    pg.wait_for_function("window.pressPlayground && window.pressPlayground.loaded === true")
    pg.click("#run")
    pg.wait_for_function("window.pressPlayground.finished === true", timeout=timeout)
    return pg.evaluate("({...window.pressPlayground})")


def test_chat_run_draws_every_pass_and_matches_the_api(server, page, tmp_path):
    url = f"{server.base_url}/?mode=chat&seed=7&steps=5&max_tokens=40&prompt=Hello%20there"
    play = run_page(page, url)
    assert play["error"] is None, play["error"]
    assert play["passes"] > 0 and play["frames"] >= play["passes"]
    api = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x").chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "Hello there"}], seed=7, max_tokens=40,
        extra_body={"denoising_steps": 5},
    )  # fmt: skip
    assert play["text"] == api.choices[0].message.content
    assert page.inner_text("#answer") == api.choices[0].message.content
    cells = page.locator("#canvas .cell")
    assert cells.count() == 32  # tiny-random's canvas
    assert "passes" in page.inner_text("#stats") and "time to first draft" in page.inner_text("#stats")
    assert page.console_errors == []
    page.screenshot(path=str(tmp_path / "playground-chat.png"), full_page=True)


def test_high_effort_follows_one_candidate_and_names_the_chosen_one(server, page):
    url = f"{server.base_url}/?mode=chat&seed=3&steps=4&max_tokens=16&effort=high&prompt=Hi"
    play = run_page(page, url)
    assert play["error"] is None, play["error"]
    api = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x").chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "Hi"}], seed=3, max_tokens=16,
        reasoning_effort="high", extra_body={"denoising_steps": 4},
    )  # fmt: skip
    best = api.choices[0].model_extra["diffusion"]["best_of"]
    assert play["text"] == api.choices[0].message.content
    # The canvas draws the first candidate's passes only (the stream carries all 64 candidates' drafts).
    assert play["frames"] == best["candidates"][0]["passes"]
    assert f"candidate {best['chosen'] + 1} of 64" in page.inner_text("#stats")
    assert page.console_errors == []


def test_completion_mode_and_a_shared_link_round_trip(server, page):
    play = run_page(page, f"{server.base_url}/?mode=completion&seed=3&steps=3&max_tokens=16&prompt=Once")
    api = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x").completions.create(
        model="tiny-random", prompt="Once", seed=3, max_tokens=16, extra_body={"denoising_steps": 3}
    )
    assert play["text"] == api.choices[0].text
    page.fill("#seed", "11")
    page.select_option("#effort", "low")
    page.click("#share")
    link = page.input_value("#share-url")
    assert "seed=11" in link and "effort=low" in link and "mode=completion" in link
    page.goto(link)
    assert page.input_value("#seed") == "11" and page.input_value("#effort") == "low"
    assert page.console_errors == []


def test_errors_from_the_envelope_are_shown_in_plain_words(server, page):
    play = run_page(page, f"{server.base_url}/?mode=chat&max_tokens=100000&prompt=x")
    assert "context length" in play["error"] and "[field: messages]" in play["error"]
    assert page.is_visible("#error")


def test_api_key_field(tiny_path, page):
    proc = ServerProcess(["--model", str(tiny_path), "--served-model-name", "tiny-random", "--api-key", "s3cret"])
    try:
        proc.wait_ready()
        page.goto(f"{proc.base_url}/?mode=chat&seed=1&steps=2&max_tokens=8&prompt=hi")
        page.wait_for_function("window.pressPlayground.loaded === true")
        assert "API key" in page.inner_text("#error")  # /v1/models answered 401
        page.fill("#api-key", "s3cret")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        page.click("#run")
        page.wait_for_function("window.pressPlayground.finished === true", timeout=60_000)
        play = page.evaluate("({...window.pressPlayground})")
        assert play["error"] is None and play["text"]
    finally:
        proc.stop()


def test_no_playground_flag(tiny_path):
    proc = ServerProcess(["--model", str(tiny_path), "--no-playground"])
    try:
        proc.wait_ready()
        assert httpx.get(proc.base_url + "/").status_code == 404
        assert httpx.get(proc.base_url + "/playground/app.js").status_code == 404
    finally:
        proc.stop()


@pytest.mark.skipif(not (SUDOKU / "config.json").exists(), reason="tiny-sudoku not shipped")
def test_sudoku_mode_solves_the_readme_puzzle(page):
    proc = ServerProcess(["--model", str(SUDOKU), "--served-model-name", "tiny-sudoku"])
    try:
        proc.wait_ready()
        play = run_page(page, f"{proc.base_url}/?mode=sudoku&seed=0")
        assert play["error"] is None, play["error"]
        assert page.inner_text("#sudoku-result").startswith("Solved"), page.inner_text("#sudoku-result")
        assert play["frames"] >= play["passes"] > 0
        givens = page.locator("#board input.given")
        assert givens.count() == 81 - README_PUZZLE.count(".")
        assert page.console_errors == []
        shots = os.environ.get("PRESS_SCREENSHOTS")
        if shots:  # the README's screenshot: PRESS_SCREENSHOTS=docs pytest -k sudoku_mode
            page.screenshot(path=str(Path(shots) / "playground.png"), full_page=True)
    finally:
        proc.stop()


def test_pasted_and_dropped_images_go_with_the_prompt(server, page):
    """An image pasted into the prompt and one dropped on it are sent as image_url parts, in that order: the
    answer is the API's for the same parts."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    def png(seed: int) -> str:
        pixels = (np.random.default_rng(seed).random((24, 36, 3)) * 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    first, second = png(1), png(2)
    page.goto(f"{server.base_url}/?mode=chat&seed=5&steps=4&max_tokens=24&prompt=Describe")
    page.wait_for_function("window.pressPlayground && window.pressPlayground.loaded === true")
    page.evaluate(
        """([a, b]) => {
          const file = (b64, name) =>
            new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, { type: "image/png" });
          const pasted = new DataTransfer();
          pasted.items.add(file(a, "a.png"));
          document.getElementById("prompt").dispatchEvent(
            new ClipboardEvent("paste", { clipboardData: pasted, bubbles: true, cancelable: true }));
          const dropped = new DataTransfer();
          dropped.items.add(file(b, "b.png"));
          document.getElementById("text-input").dispatchEvent(
            new DragEvent("drop", { dataTransfer: dropped, bubbles: true, cancelable: true }));
        }""",
        [first, second],
    )
    page.wait_for_function("window.pressPlayground.images === 2")
    assert page.locator("#image-list img").count() == 2
    page.click("#run")
    page.wait_for_function("window.pressPlayground.finished === true", timeout=120_000)
    play = page.evaluate("({...window.pressPlayground})")
    assert play["error"] is None, play["error"]
    parts = [{"type": "text", "text": "Describe"}] + [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}} for b64 in (first, second)
    ]
    api = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x").chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": parts}], seed=5, max_tokens=24,
        extra_body={"denoising_steps": 4},
    )  # fmt: skip
    assert play["text"] == api.choices[0].message.content
    page.click("#image-list button")  # removing one leaves one
    assert page.locator("#image-list img").count() == 1
    assert page.console_errors == []
