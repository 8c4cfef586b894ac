"""Bad input gets a 4xx in the OpenAI error envelope naming the field, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import ServerProcess
from tests.schemas import validate

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
OK_CHAT = {"model": "tiny-random", "messages": MSG, "max_tokens": 8, "denoising_steps": 2}

# (name, path, body, status, param, code) - body None/str means a raw, non-object body.
BAD = [
    ("invalid-json", CHAT, "{not json", 400, None, "invalid_json"),
    ("body-is-array", CHAT, "[1, 2]", 400, None, "invalid_json"),
    ("missing-model", CHAT, {"messages": MSG}, 400, "model", "missing_required_parameter"),
    ("missing-messages", CHAT, {"model": "tiny-random"}, 400, "messages", "missing_required_parameter"),
    ("empty-messages", CHAT, {"model": "tiny-random", "messages": []}, 400, "messages", "invalid_value"),
    ("bad-role", CHAT, {"model": "tiny-random", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", "invalid_value"),
    ("audio-part", CHAT, {"model": "tiny-random", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, 400,
     "messages[0].content[0].type", None),
    ("audio-beside-image", CHAT, {"model": "tiny-random", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "file", "file": {}}]}]}, 400, "messages[0].content[1].type", None),
    ("image-unreachable-host", CHAT, {"model": "tiny-random", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://no-such-host.invalid/y.png"}}]}]}, 400,
     "messages[0].content[0]", "image_fetch_failed"),
    ("temperature-string", CHAT, {**OK_CHAT, "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ("temperature-too-high", CHAT, {**OK_CHAT, "temperature": 5}, 400, "temperature", "invalid_value"),
    ("max-tokens-zero", CHAT, {**OK_CHAT, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("max-tokens-float", CHAT, {**OK_CHAT, "max_tokens": 1.5}, 400, "max_tokens", "invalid_value"),
    ("context-too-long", CHAT, {**OK_CHAT, "max_tokens": 100000}, 400, "messages", "context_length_exceeded"),
    ("n-zero", CHAT, {**OK_CHAT, "n": 0}, 400, "n", "invalid_value"),
    ("top-p-above-1", CHAT, {**OK_CHAT, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("unknown-model", CHAT, {**OK_CHAT, "model": "gpt-9"}, 404, "model", "model_not_found"),
    ("too-many-stops", CHAT, {**OK_CHAT, "stop": [str(i) for i in range(17)]}, 400, "stop", "invalid_value"),
    ("denoising-steps-zero", CHAT, {**OK_CHAT, "denoising_steps": 0}, 400, "denoising_steps", "invalid_value"),
    ("entropy-bound-negative", CHAT, {**OK_CHAT, "entropy_bound": -1}, 400, "entropy_bound", "invalid_value"),
    ("t-min-above-t-max", CHAT, {**OK_CHAT, "t_min": 0.9, "t_max": 0.5}, 400, "t_min", "invalid_schedule"),
    ("confidence-zero", CHAT, {**OK_CHAT, "confidence_threshold": 0}, 400, "confidence_threshold", "invalid_value"),
    ("stability-negative", CHAT, {**OK_CHAT, "stability_threshold": -1}, 400, "stability_threshold",
     "invalid_value"),
    ("ignore-eos-not-bool", CHAT, {**OK_CHAT, "ignore_eos": "yes"}, 400, "ignore_eos", "invalid_value"),
    ("reasoning-effort", CHAT, {**OK_CHAT, "reasoning_effort": "extreme"}, 400, "reasoning_effort", "invalid_value"),
    ("top-logprobs-without-logprobs", CHAT, {**OK_CHAT, "top_logprobs": 3}, 400, "top_logprobs", None),
    ("top-logprobs-above-20", CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs",
     "invalid_value"),
    ("logprobs-not-bool", CHAT, {**OK_CHAT, "logprobs": 3}, 400, "logprobs", "invalid_value"),
    ("completion-logprobs-above-20", COMP, {"model": "tiny-random", "prompt": "x", "logprobs": 21}, 400, "logprobs",
     "invalid_value"),
    ("stream-options-without-stream", CHAT, {**OK_CHAT, "stream_options": {"include_usage": True}}, 400,
     "stream_options", None),
    ("seed-string", CHAT, {**OK_CHAT, "seed": "abc"}, 400, "seed", "invalid_value"),
    ("seed-too-big", CHAT, {**OK_CHAT, "seed": 2**70}, 400, "seed", "invalid_value"),
    ("seed-above-int64", CHAT, {**OK_CHAT, "seed": 2**63}, 400, "seed", "invalid_value"),
    # JSON numbers only: not booleans (pydantic's lax mode took false as 0) nor numeric strings.
    ("t-min-bool", CHAT, {**OK_CHAT, "t_min": False}, 400, "t_min", "invalid_value"),
    ("temperature-numeric-string", CHAT, {**OK_CHAT, "temperature": "0.5"}, 400, "temperature", "invalid_value"),
    ("top-p-bool", COMP, {"model": "tiny-random", "prompt": "x", "top_p": True}, 400, "top_p", "invalid_value"),
    # Lengths far past the context are refused before anything is built for them (they once exhausted memory).
    ("infill-n-predict-huge", "/infill", {"input_suffix": "x", "n_predict": 6882163783571456000}, 400, "suffix",
     "context_length_exceeded"),
    ("suffix-max-tokens-huge", COMP, {"model": "tiny-random", "prompt": "x", "suffix": "y", "max_tokens": 10**18},
     400, "suffix", "context_length_exceeded"),
    ("middle-lengths-huge", COMP, {"model": "tiny-random", "prompt": "x", "suffix": "y", "middle_lengths": [10**30]},
     400, "middle_lengths", "context_length_exceeded"),
    ("template-hole-huge", CHAT, {**OK_CHAT, "max_tokens": None, "infill": {"template": [{"hole": 10**15}]}}, 400,
     "infill.template", "context_length_exceeded"),
    ("stream-not-bool", CHAT, {**OK_CHAT, "stream": "yes"}, 400, "stream", "invalid_value"),
    ("prompt-missing", COMP, {"model": "tiny-random"}, 400, "prompt", "missing_required_parameter"),
    ("prompt-token-out-of-range", COMP, {"model": "tiny-random", "prompt": [5, 999999]}, 400, "prompt", None),
    ("prompt-too-long", COMP, {"model": "tiny-random", "prompt": [10] * 5000}, 400, "prompt",
     "context_length_exceeded"),
    ("echo", COMP, {"model": "tiny-random", "prompt": "x", "echo": True}, 400, "echo", None),
    ("prompt-wrong-type", COMP, {"model": "tiny-random", "prompt": {"text": "x"}}, 400, "prompt", "invalid_value"),
    # best_of: at least n, at most 32, not with fill-in-the-middle, at most 64 candidate rows per request.
    ("best-of-below-n", COMP, {"model": "tiny-random", "prompt": "x", "n": 3, "best_of": 2}, 400, "best_of", None),
    ("best-of-too-many", CHAT, {**OK_CHAT, "best_of": 65}, 400, "best_of", "invalid_value"),
    ("best-of-with-suffix", COMP, {"model": "tiny-random", "prompt": "x", "suffix": "y", "best_of": 2}, 400,
     "best_of", None),
    ("best-of-too-many-rows", COMP, {"model": "tiny-random", "prompt": ["a", "b", "c", "d", "e"], "best_of": 32},
     400, "best_of", "too_many_choices"),
    ("effort-too-many-rows", CHAT, {**OK_CHAT, "n": 16, "reasoning_effort": "high"}, 400, "n", "too_many_choices"),
    # Canvas constraints: infill templates, predictions, fill-in-the-middle.
    ("hole-zero", CHAT, {**OK_CHAT, "infill": {"template": ["a", {"hole": 0}]}}, 400, "infill.template[1].hole",
     None),
    ("hole-fractional", CHAT, {**OK_CHAT, "infill": {"template": ["a", {"hole": 2.5}]}}, 400,
     "infill.template[1].hole", None),
    ("hole-not-int", COMP, {"model": "tiny-random", "prompt": "x", "infill": {"template": [{"hole": "3"}]}}, 400,
     "infill.template[0].hole", None),
    ("unknown-segment", CHAT, {**OK_CHAT, "infill": {"template": ["a", {"gap": 3}]}}, 400, "infill.template[1]",
     None),
    ("empty-template", CHAT, {**OK_CHAT, "infill": {"template": []}}, 400, "infill.template", "invalid_value"),
    ("template-beyond-context", CHAT, {**OK_CHAT, "max_tokens": None, "infill": {"template": [{"hole": 10**5}]}},
     400, "infill.template", "context_length_exceeded"),
    ("template-over-max-tokens", CHAT, {**OK_CHAT, "infill": {"template": ["a", {"hole": 30}]}}, 400, "max_tokens",
     "template_too_long"),
    ("template-and-schema", CHAT, {**OK_CHAT, "max_tokens": None, "infill": {"template": [{"hole": 3}]},
     "response_format": {"type": "json_object"}}, 400, "infill", None),
    ("prediction-image-part", CHAT, {**OK_CHAT, "prediction": {"type": "content", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}}, 400, "prediction.content[0].type", None),
    ("prediction-type", CHAT, {**OK_CHAT, "prediction": {"type": "diff", "content": "x"}}, 400, "prediction.type",
     "invalid_value"),
    ("prediction-and-template", CHAT, {**OK_CHAT, "max_tokens": None, "infill": {"template": [{"hole": 3}]},
     "prediction": {"type": "content", "content": "x"}}, 400, "prediction", None),
    ("suffix-and-template", COMP, {"model": "tiny-random", "prompt": "x", "suffix": "y",
     "infill": {"template": [{"hole": 3}]}}, 400, "suffix", None),
    ("middle-lengths-without-suffix", COMP, {"model": "tiny-random", "prompt": "x", "middle_lengths": [3]}, 400,
     "middle_lengths", None),
    ("middle-length-zero", COMP, {"model": "tiny-random", "prompt": "x", "suffix": "y", "middle_lengths": [0]}, 400,
     "middle_lengths[0]", "invalid_value"),
    ("suffix-beyond-context", COMP, {"model": "tiny-random", "prompt": "x", "suffix": "y", "max_tokens": 10**5},
     400, "suffix", "context_length_exceeded"),
    ("infill-n-predict-string", "/infill", {"input_prefix": "a", "n_predict": "many"}, 400, "n_predict",
     "invalid_value"),
    ("infill-bad-temperature", "/infill", {"input_prefix": "a", "temperature": "hot"}, 400, "temperature", None),
]  # fmt: skip


@pytest.mark.parametrize("name,path,body,status,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_4xx(server, name, path, body, status, param, code):
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        if isinstance(body, str):
            r = http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = http.post(path, json=body)
        assert r.status_code == status, r.text
        payload = r.json()
        validate(payload, "ErrorResponse")
        err = payload["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] == param, err
        assert err["code"] == code, err
        assert err["message"]
        if param and code != "context_length_exceeded":
            assert param in err["message"], err
        # ... and the server keeps serving.
        ok = http.post(CHAT, json=OK_CHAT)
        assert ok.status_code == 200, ok.text


def test_sdk_raises_without_retrying(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=2)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny-random", messages=MSG, max_tokens=100000)
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)


def test_unknown_route_and_method(server):
    r = httpx.get(server.base_url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    validate(r.json(), "ErrorResponse")
    r = httpx.get(server.base_url + CHAT)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]
    validate(r.json(), "ErrorResponse")


def test_unknown_fields_are_ignored(server):
    r = httpx.post(server.base_url + CHAT, json={**OK_CHAT, "seed": 5, "some_future_field": {"a": 1},
                                                 "presence_penalty": 0.5}, timeout=60)  # fmt: skip
    assert r.status_code == 200
    plain = httpx.post(server.base_url + CHAT, json={**OK_CHAT, "seed": 5}, timeout=60)
    assert r.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["message"]["content"]


def test_model_that_fails_to_load_reports_503(tmp_path):
    proc = ServerProcess(["--model", str(tmp_path / "missing-model")])
    try:
        import time

        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(proc.base_url + "/health", timeout=1)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for _ in range(100):
            r = httpx.get(proc.base_url + "/v1/models")
            if r.json()["error"]["code"] == "model_load_failed":
                break
            time.sleep(0.2)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
        assert httpx.get(proc.base_url + "/ready").status_code == 503
    finally:
        proc.stop()


def test_an_exception_while_building_the_prompt_is_a_400_for_that_request(server):
    """chat_template_kwargs that clash with the server's own arguments make building the prompt raise: that
    request gets a 400 invalid_messages in the envelope, and the next one is served."""
    body = {**OK_CHAT, "chat_template_kwargs": {"add_generation_prompt": False}}
    r = httpx.post(server.base_url + CHAT, json=body, timeout=30)
    assert r.status_code == 400, r.text
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["code"] == "invalid_messages" and r.json()["error"]["param"] == "messages"
    assert httpx.post(server.base_url + CHAT, json=OK_CHAT, timeout=60).status_code == 200
