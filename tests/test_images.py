"""Images in chat messages, as DiffusionGemma's vision tower reads them.

Engine: a prompt with images is encoded exactly as transformers' encoder encodes it in one pass with
`pixel_values` (chunked prefill never cuts an image), answers equal transformers' `generate()` with the same
images, batched rows with and without images answer as they do alone, and the prefix cache never lends one
picture's keys to another. Server: image_url parts (data: URLs, fetched URLs) through the official `openai`
package, the prompt equal to what the checkpoint's processor and chat template make of the same messages, and a
400 naming the part for every bad image.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoTokenizer, DynamicCache

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.images import PromptImages
from engine.loader import load_model
from engine.model_runner import CACHE_KW
from engine.request import RequestStatus
from engine.sampling_params import SamplingParams
from engine.tiny_random import build_tiny_model, save_checkpoint
from server.chat import ChatFormat
from server.errors import APIError
from server.images import ImageLimits, load_image
from server.protocol import ChatCompletionRequest
from server.vision import VisionPrompt, load_processor
from tests.conftest import ServerProcess
from tests.helpers import run_to_end

ROOT = Path(__file__).resolve().parents[1]

try:  # transformers 5.17 imports torchvision with its Gemma 4 processor: no images there without it
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor  # noqa: F401
except ImportError:
    pytest.skip("this transformers cannot build a Gemma 4 processor without torchvision", allow_module_level=True)

# Tests of exactness across chunking and caching run in fp32: in bf16 (CUDA's default) a chunk or a warm prefix
# computes the same keys through GEMMs of other shapes, which moves them by a few bf16 units and can flip a token.
EXACT = "float32"


def picture(seed: int, size: tuple[int, int] = (40, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def data_url(image: Image.Image, fmt: str = "PNG", mime: str | None = None) -> str:
    mime = mime or f"image/{fmt.lower()}"
    return f"data:{mime};base64," + base64.b64encode(encoded(image, fmt)).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# ----------------------------------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def sharp_path(tmp_path_factory) -> Path:
    """A tiny model with peaked logits (its tied output embedding scaled), so answers react to any change in what
    the encoder wrote."""
    path = tmp_path_factory.mktemp("tiny-vision") / "m"
    model = build_tiny_model(seed=5, canvas_length=16)
    with torch.no_grad():
        model.lm_head.weight.mul_(32)
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def vision(sharp_path):
    tokenizer = AutoTokenizer.from_pretrained(sharp_path)
    config = AutoConfig.from_pretrained(sharp_path)
    processor = load_processor(str(sharp_path), tokenizer, config)
    return VisionPrompt(processor, config.image_token_id), tokenizer


def prompt_with(
    vision, images: list[Image.Image], text: str = "Compare these.", after: str = ""
) -> tuple[list[int], PromptImages]:
    """A user turn of `text`, the images, then `after` (if any), rendered and encoded as the server does."""
    prompt, tokenizer = vision
    content = [{"type": "text", "text": text}, *({"type": "image"} for _ in images)]
    content += [{"type": "text", "text": after}] if after else []
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
    return prompt.encode(rendered, images)


def params(seed: int, max_tokens: int = 32) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, denoising_steps=12, entropy_bound=2.0, seed=seed, eos_token_ids=[1],
                          include_drafts=False)  # fmt: skip


def test_chunked_prefill_writes_the_cache_transformers_writes(sharp_path, vision):
    """Prefill in 16-token chunks (both images longer than a chunk) leaves the same keys and values as
    transformers' encoder over the whole prompt with pixel_values: image features in place, no image cut."""
    ids, images = prompt_with(vision, [picture(1), picture(2, (64, 24))])
    assert all(hi - lo > 16 for lo, hi in images.spans)
    engine = LLMEngine(EngineConfig(compile=False, dtype=EXACT, model=str(sharp_path), prefill_chunk=16,
                                    prefix_cache_tokens=0))  # fmt: skip
    state = engine.make_request(ids, params(0), images=images.copy())
    engine.add_request(state)
    while state.status is not RequestStatus.DENOISING:
        engine.step(lambda s, e: None)

    # The whole prompt in one encoder pass, its masks prepared as generate() prepares them (the encoder's forward
    # alone drops the bidirectional image mask it builds).
    encoder, dev = engine.loaded.model.model.encoder, engine.loaded.device
    cache = DynamicCache(config=engine.loaded.model.config.get_text_config(decoder=True))
    types = torch.tensor([images.token_types(0, len(ids))], device=dev)
    positions = torch.arange(len(ids), dtype=torch.int32, device=dev)[None]
    with torch.inference_mode():
        masks = encoder.create_masks_for_generate(
            config=engine.loaded.model.config, inputs_embeds=torch.empty((1, len(ids), 0), device=dev),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.bool, device=dev), position_ids=positions,
            mm_token_type_ids=types, **{CACHE_KW: cache},
        )  # fmt: skip
        encoder(input_ids=torch.tensor([ids], device=dev), pixel_values=images.pixel_values.to(dev),
                image_position_ids=images.position_ids.to(dev), attention_mask=masks, position_ids=positions,
                **{CACHE_KW: cache})  # fmt: skip
    assert len(cache.layers) == len(state.cache.layers)
    for ours, theirs in zip(state.cache.layers, cache.layers, strict=True):
        assert ours.keys.shape == theirs.keys.shape
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-5)


def test_answers_equal_transformers_generate_with_the_same_images(sharp_path, vision):
    ids, images = prompt_with(vision, [picture(3), picture(4, (30, 30))])
    loaded = load_model(EngineConfig(dtype=EXACT, model=str(sharp_path)))
    engine = LLMEngine(EngineConfig(compile=False, model=str(sharp_path), prefill_chunk=16), loaded=loaded)
    [result] = run_to_end(engine, [(ids, params(7))])  # text only first: a baseline that must differ
    text_only = result["answer_ids"]
    state = engine.make_request(ids, params(7), images=images.copy())
    engine.add_request(state)
    while engine.has_unfinished():
        engine.step(lambda s, e: None)

    torch.manual_seed(7)
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    dev = loaded.device
    out = loaded.model.generate(
        torch.tensor([ids], device=dev), pixel_values=images.pixel_values.to(dev),
        image_position_ids=images.position_ids.to(dev),
        mm_token_type_ids=torch.tensor([images.token_types(0, len(ids))], device=dev), max_new_tokens=32,
        max_denoising_steps=12,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=2.0), t_min=0.4, t_max=0.8, stability_threshold=1,
        confidence_threshold=0.005, eos_token_id=[1],
    )  # fmt: skip
    expected = out.sequences[0, len(ids) :].tolist()
    eos = next((i for i, t in enumerate(expected) if t == 1), None)
    expected = expected if eos is None else expected[: eos + 1]
    assert state.answer_ids == expected
    assert state.answer_ids != text_only  # the pictures were read


def test_rows_with_and_without_images_answer_in_a_batch_as_alone(sharp_path, vision):
    a_ids, a_images = prompt_with(vision, [picture(5)])
    b_ids, b_images = prompt_with(vision, [picture(6, (50, 20)), picture(7)], text="Two of them.")
    text = vision[1]("Just text, no pictures at all.", add_special_tokens=False)["input_ids"]
    requests = [(a_ids, params(1), a_images), (text, params(2), None), (b_ids, params(3), b_images)]

    def run(batch):
        engine = LLMEngine(EngineConfig(compile=False, model=str(sharp_path), prefill_chunk=32, prefix_cache_tokens=0))
        states = [engine.make_request(ids, p, images=im.copy() if im is not None else None) for ids, p, im in batch]
        for state in states:
            engine.add_request(state)
        while engine.has_unfinished():
            engine.step(lambda s, e: None)
        return [s.answer_ids for s in states]

    together = run(requests)
    alone = [run([r])[0] for r in requests]
    assert together == alone


def test_prefix_cache_never_lends_one_pictures_keys_to_another(sharp_path, vision):
    """Same text, different pictures: the second prompt's image tokens (the same ids) must not hit the first's
    blocks; the same picture again does hit them, and every answer is what a cold engine gives."""
    # Text after the picture, and 32-token chunks: restores end where a cold prefill's chunks end (batch
    # invariance), so the prompt needs chunk ends on block boundaries past the picture.
    after = " ".join(["Then say which one is brighter, and why, in detail."] * 4)
    x_ids, x_images = prompt_with(vision, [picture(8, (60, 60))], after=after)
    y_ids, y_images = prompt_with(vision, [picture(9, (60, 60))], after=after)
    assert x_ids == y_ids  # the token ids alone cannot tell the pictures apart
    chunk = dict(prefill_chunk=32)

    def cold(ids, images):
        engine = LLMEngine(
            EngineConfig(compile=False, dtype=EXACT, model=str(sharp_path), prefix_cache_tokens=0, **chunk)
        )
        state = engine.make_request(ids, params(4), images=images.copy())
        engine.add_request(state)
        while engine.has_unfinished():
            engine.step(lambda s, e: None)
        return state.answer_ids

    warm = LLMEngine(EngineConfig(compile=False, dtype=EXACT, model=str(sharp_path), prefix_cache_tokens=4096, **chunk))
    answers, hits = [], []
    for ids, images in ((x_ids, x_images), (y_ids, y_images), (x_ids, x_images)):
        state = warm.make_request(ids, params(4), images=images.copy())
        warm.add_request(state)
        while warm.has_unfinished():
            warm.step(lambda s, e: None)
        answers.append(state.answer_ids)
        hits.append(state.prefix_hit)
    image_start = x_images.spans[0][0]
    assert hits[1] <= image_start  # nothing past the picture was reused for another picture
    assert hits[2] > x_images.spans[0][1] - 32  # the same picture: its blocks were reused
    assert answers[0] == answers[2] == cold(x_ids, x_images)
    assert answers[1] == cold(y_ids, y_images)
    assert answers[0] != answers[1]


# ------------------------------------------------------------------------------------------- the prompt itself


def test_the_prompt_is_what_the_processor_and_chat_template_make(tiny_path):
    """The server's path (parts -> chat template -> processor) gives the token ids and pixel values that
    transformers' processor.apply_chat_template gives for the same conversation."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    config = AutoConfig.from_pretrained(tiny_path)
    processor = load_processor(str(tiny_path), tokenizer, config)
    first, second = picture(10), picture(11, (70, 35))
    req = ChatCompletionRequest.model_validate({
        "model": "m",
        "messages": [
            {"role": "system", "content": "You describe pictures."},
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part(data_url(first))]},
            {"role": "assistant", "content": "A pattern."},
            {"role": "user", "content": [image_part(data_url(second, "JPEG")), {"type": "text", "text": "And this?"}]},
        ],
    })  # fmt: skip
    images = asyncio.run(_load_all(req))
    text = ChatFormat(tokenizer, config.model_type).prompt(req)
    ids, prompt_images = VisionPrompt(processor, config.image_token_id).encode(text, images)

    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "You describe pictures."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image", "image": first}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A pattern."}]},
        {"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(encoded(second, "JPEG")))},
                                     {"type": "text", "text": "And this?"}]},
    ]  # fmt: skip
    ref = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")  # fmt: skip
    assert ids == ref["input_ids"][0].tolist()
    assert torch.equal(prompt_images.pixel_values, ref["pixel_values"])
    assert torch.equal(prompt_images.position_ids, ref["image_position_ids"])
    assert len(prompt_images.spans) == 2
    assert ids.count(config.image_token_id) == prompt_images.soft_tokens


async def _load_all(req):
    from server.chat import image_urls

    return [await load_image(url, ImageLimits(), param) for param, url in image_urls(req)]


def test_fetching_can_be_switched_off():
    with pytest.raises(APIError) as err:
        asyncio.run(load_image("https://example.com/cat.png", ImageLimits(fetch=False), "messages[0].content[1]"))
    assert err.value.status == 400
    assert err.value.code == "image_fetch_disabled"
    assert err.value.param == "messages[0].content[1]"


# ------------------------------------------------------------------------------------------------------ server


def ask(client, parts: list[dict], **kw):
    return client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": parts}],
                                          max_tokens=kw.pop("max_tokens", 24), **kw)  # fmt: skip


def processor_ids(tiny_path, parts_images: list[Image.Image], text: str) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    processor = load_processor(str(tiny_path), tokenizer, AutoConfig.from_pretrained(tiny_path))
    content = [{"type": "text", "text": text}, *({"type": "image", "image": im} for im in parts_images)]
    ref = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)  # fmt: skip
    return list(ref["input_ids"][0])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_data_url_images_through_the_sdk(client, tiny_path, fmt):
    image = picture(12)
    url = data_url(image, fmt)
    decoded = Image.open(io.BytesIO(encoded(image, fmt))).convert("RGB")
    reply = ask(client, [{"type": "text", "text": "Describe."}, image_part(url)], seed=5)
    assert reply.usage.prompt_tokens == len(processor_ids(tiny_path, [decoded], "Describe."))
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0


def test_streamed_and_whole_answers_agree_and_images_change_them(client):
    first, second = image_part(data_url(picture(13))), image_part(data_url(picture(14)))
    parts = [{"type": "text", "text": "Describe."}, first, second]
    whole = ask(client, parts, seed=11)
    chunks = list(ask(client, parts, seed=11, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    other = ask(client, [parts[0], image_part(data_url(picture(15))), parts[2]], seed=11)
    assert other.usage.prompt_tokens == whole.usage.prompt_tokens
    assert other.choices[0].message.content != whole.choices[0].message.content


def bad(client, parts: list[dict]) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, parts, max_tokens=4)
    return err.value


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png;base64,not*base64", "invalid_image"),
        ("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode(), "invalid_image"),
        ("data:image/png;base64," + base64.b64encode(b"plain text").decode(), "invalid_image"),
        ("data:image/svg+xml;base64," + base64.b64encode(b"<svg/>").decode(), "unsupported_image_type"),
        ("data:image/bmp;base64," + base64.b64encode(encoded(picture(1), "BMP")).decode(), "unsupported_image_type"),
        ("data:text/plain,hello", "unsupported_image_type"),
        ("data:image/png;base64," + base64.b64encode(encoded(picture(1), "JPEG")).decode(), "invalid_image"),
        ("ftp://example.com/a.png", "invalid_image_url"),
        ("not a url", "invalid_image_url"),
    ],
    ids=["bad-base64", "truncated-png", "not-an-image", "svg", "bmp", "text", "jpeg-labelled-png", "ftp", "garbage"],
)
def test_bad_images_are_400s_naming_the_part(client, url, code):
    err = bad(client, [{"type": "text", "text": "Look:"}, image_part(url)])
    assert err.body["code"] == code
    assert err.body["param"] == "messages[0].content[1]"
    assert "messages[0].content[1]" in err.body["message"]


def test_too_many_pixels_is_refused_before_decoding(client):
    huge = Image.new("RGB", (5000, 4000), (10, 20, 30))  # 20 MP of one colour: a small file
    err = bad(client, [image_part(data_url(picture(1))), image_part(data_url(huge))])
    assert err.body["code"] == "image_too_large"
    assert err.body["param"] == "messages[0].content[1]"


def test_the_default_server_does_not_fetch_from_private_addresses(client, image_host):
    err = bad(client, [image_part(image_host + "/small.png")])
    assert err.body["code"] == "image_fetch_forbidden"
    assert image_host.split("//")[1].split(":")[0] in err.body["message"]
    assert image_host.requests == []  # not even one request reached it
    # ... and keeps serving.
    assert ask(client, [{"type": "text", "text": "Still there?"}], max_tokens=4).choices[0].finish_reason


class _ImageHost(str):
    requests: list[str]


@pytest.fixture(scope="module")
def image_host():
    """A local HTTP server with images to fetch: a small PNG, a large one, a slow one, a redirect, a 404."""
    small, large = encoded(picture(16)), encoded(picture(17, (300, 300)))
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            if self.path == "/slow.png":
                time.sleep(4)
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/small.png")
                self.end_headers()
                return
            body = {"/small.png": small, "/large.png": large, "/slow.png": small}.get(self.path)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host = _ImageHost(f"http://127.0.0.1:{httpd.server_address[1]}")
    host.requests = seen
    yield host
    httpd.shutdown()


@pytest.fixture(scope="module")
def limited(tiny_path):
    """A server that may fetch from private addresses, with small limits."""
    proc = ServerProcess(["--model", str(tiny_path), "--served-model-name", "tiny-random", "--dtype", EXACT,
                          "--image-fetch-private",
                          "--max-image-bytes", "60000", "--max-images", "2", "--image-fetch-timeout", "2"])  # fmt: skip
    try:
        proc.wait_ready()
        yield openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        proc.stop()


def test_fetched_images_read_like_data_urls(limited, image_host):
    fetched = ask(limited, [image_part(image_host + "/small.png")], seed=3)
    inline = ask(limited, [image_part(data_url(picture(16)))], seed=3)
    assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens
    assert fetched.choices[0].message.content == inline.choices[0].message.content
    redirected = ask(limited, [image_part(image_host + "/moved")], seed=3)
    assert redirected.choices[0].message.content == inline.choices[0].message.content


@pytest.mark.parametrize(
    ("path", "code"),
    [("/large.png", "image_too_large"), ("/missing.png", "image_fetch_failed"), ("/slow.png", "image_fetch_failed")],
    ids=["over-size-limit", "404", "timeout"],
)
def test_fetch_failures_are_400s(limited, image_host, path, code):
    err = bad(limited, [{"type": "text", "text": "See"}, image_part(image_host + path)])
    assert err.body["code"] == code
    assert err.body["param"] == "messages[0].content[1]"


def test_size_and_count_limits(limited):
    big = data_url(picture(18, (300, 300)))  # a PNG of noise: over 60,000 bytes
    err = bad(limited, [image_part(big)])
    assert err.body["code"] == "image_too_large"
    err = bad(limited, [image_part(data_url(picture(1))), image_part(data_url(picture(2))),
                        {"type": "text", "text": "and"}, image_part(data_url(picture(3)))])  # fmt: skip
    assert err.body["code"] == "too_many_images"
    assert err.body["param"] == "messages[0].content[3]"
    assert ask(limited, [image_part(data_url(picture(1))), image_part(data_url(picture(2)))]).usage.prompt_tokens


def test_a_model_without_a_vision_tower_says_so():
    sudoku = ROOT / "models" / "tiny-sudoku"
    proc = ServerProcess(["--model", str(sudoku), "--served-model-name", "tiny-sudoku"])
    try:
        proc.wait_ready()
        client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="tiny-sudoku",
                max_tokens=4,
                messages=[
                    {"role": "user", "content": [{"type": "text", "text": "Solve"}, image_part(data_url(picture(1)))]}
                ],
            )
        assert err.value.body["code"] == "images_not_supported"
        assert err.value.body["param"] == "messages[0].content[1]"
        assert "cannot read images: its tokenizer has no image tokens" in err.value.body["message"]
    finally:
        proc.stop()


def test_image_tokens_count_against_the_context(client, tiny_path):
    image = picture(19)
    prompt_len = len(processor_ids(tiny_path, [image], "Describe."))
    assert prompt_len > 60  # the image's soft tokens are in it
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, [{"type": "text", "text": "Describe."}, image_part(data_url(image))],
            max_tokens=4096 - prompt_len + 1)  # fmt: skip
    assert err.value.body["code"] == "context_length_exceeded"
    assert f"{prompt_len} in the prompt" in err.value.body["message"]
