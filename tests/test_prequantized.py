"""Checkpoints published already quantized in compressed-tensors format (engine/prequantized.py): tiny-sudoku
written in the published DiffusionGemma layout (experts split into one linear layer per expert, each with its
scales) by compressed-tensors' own compressor, then served by Press in the checkpoint's format."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import EngineConfig
from engine.engine import LLMEngine
from tests.test_quantization import MIN_AGREEMENT, SHIPPED, _answers, _sudoku_engine

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="tiny-sudoku not shipped")
ROOT = Path(__file__).resolve().parents[1]
# Kept in full precision, as in the published checkpoints (their ignore lists).
IGNORE = ["re:.*router.*", "re:.*self_conditioning.*", "re:.*vision.*", "re:.*embed.*", "lm_head"]


def _attach(root: nn.Module, name: str, weight: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    module.add_module(leaf, linear)


def write_compressed_checkpoint(out: Path, scheme: str, group_size: int | None = None) -> Path:
    """tiny-sudoku as llm-compressor publishes DiffusionGemma: `experts.{e}.gate_proj/up_proj/down_proj` linear
    layers, every text projection quantized with a compressed-tensors preset scheme (min-max scales), compressed
    by compressed-tensors, config.json's quantization_config written by it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file, save_file

    state = load_file(SHIPPED / "model.safetensors")
    root, rest = nn.Module(), {}
    for name, tensor in state.items():
        if name.endswith(".experts.gate_up_proj"):  # (experts, 2 * intermediate, hidden): gate rows, then up rows
            base, half = name.removesuffix("gate_up_proj"), tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                _attach(root, f"{base}{e}.gate_proj", tensor[e, :half])
                _attach(root, f"{base}{e}.up_proj", tensor[e, half:])
        elif name.endswith(".experts.down_proj"):
            for e in range(tensor.shape[0]):
                _attach(root, f"{name.removesuffix('down_proj')}{e}.down_proj", tensor[e])
        elif name.endswith(".weight") and tensor.ndim == 2 and "vision" not in name and "embed" not in name:
            _attach(root, name.removesuffix(".weight"), tensor)
        else:
            rest[name] = tensor
    preset = copy.deepcopy(PRESET_SCHEMES[scheme])
    if group_size:
        preset["weights"].group_size = group_size
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], **preset)},
                                ignore=IGNORE, quantization_status=QuantizationStatus.FROZEN)  # fmt: skip
    apply_quantization_config(root, config)
    for module in root.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        w = module.weight.data.float()
        if args.group_size:
            w = w.reshape(w.shape[0], -1, args.group_size)
        low, high = w.amin(-1, keepdim=not args.group_size), w.amax(-1, keepdim=not args.group_size)
        scale, zero = calculate_qparams(low, high, args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(
                module.weight_zero_point.shape
            )
    compressor = ModelCompressor.from_pretrained_model(root)
    compressor.compress_model(root)
    out.mkdir(parents=True)
    tensors = {**rest, **{k: v.contiguous() for k, v in root.state_dict().items()}}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for f in SHIPPED.glob("*.json"):
        shutil.copy(f, out / f.name)
    compressor.update_config(str(out))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("prequantized")
    return {
        "fp8": write_compressed_checkpoint(base / "fp8-dynamic", "FP8_DYNAMIC"),
        "int4": write_compressed_checkpoint(base / "w4a16", "W4A16", group_size=32),
        "int8": write_compressed_checkpoint(base / "w8a8", "W8A8"),
    }


def test_the_fixture_has_the_published_layout(checkpoints):
    from safetensors import safe_open

    with safe_open(str(checkpoints["fp8"] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.decoder.layers.0.experts.3.down_proj.weight").dtype == torch.float8_e4m3fn
    assert "model.decoder.layers.0.experts.3.gate_proj.weight_scale" in names
    assert "model.decoder.layers.0.experts.gate_up_proj" not in names
    assert "model.decoder.layers.0.router.proj.weight_scale" not in names  # routers stay precise


def test_an_fp8_checkpoint_serves_exactly_like_fp8_at_load(checkpoints):
    """Its per-channel FP8 weights dequantized and quantized again by torchao are the same weights: the answers
    are token for token those of the full-precision model quantized with --quantization fp8."""
    engine = LLMEngine(EngineConfig(compile=False, model=str(checkpoints["fp8"]), max_num_seqs=16))
    assert engine.loaded.quantization == "fp8" and engine.loaded.dtype == torch.float32
    assert type(engine.loaded.model.model.decoder.layers[0].self_attn.q_proj.weight).__module__.startswith("torchao")
    assert _answers(engine) == _answers(_sudoku_engine("fp8"))
    # The split experts' conversion was registered for the load only (a model saved later keeps its layout).
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    assert not get_checkpoint_conversion_mapping("diffusion_gemma")


@pytest.mark.parametrize(
    ("checkpoint", "dtype"),
    [
        ("int4", torch.bfloat16),  # pack-quantized W4A16 experts: unpacked by transformers
        ("int8", torch.float32),  # int-quantized W8A8 experts: transformers hands them back empty, Press scales them
    ],
)
def test_an_integer_checkpoint_serves_in_its_format_and_answers_like_full_precision(checkpoints, checkpoint, dtype):
    engine = LLMEngine(EngineConfig(compile=False, model=str(checkpoints[checkpoint]), max_num_seqs=16))
    assert engine.loaded.quantization == checkpoint and engine.loaded.dtype == dtype
    answers, full = _answers(engine), _answers(_sudoku_engine("none"))
    same = sum(a == b for x, y in zip(answers, full, strict=True) for a, b in zip(x, y, strict=False))
    agreement = same / sum(max(len(x), len(y)) for x, y in zip(answers, full, strict=True))
    print(f"{checkpoint} checkpoint: {agreement:.3f} of answer tokens equal to full precision")
    assert agreement >= MIN_AGREEMENT[checkpoint]


@pytest.mark.parametrize(
    ("change", "named"),
    [({"symmetric": False}, "asymmetric channel"), ({"strategy": "group", "group_size": 32}, "group")],
)
def test_int8_experts_with_zero_points_or_groups_are_refused(checkpoints, tmp_path, change, named):
    """Press's op multiplies by one scale per channel or tensor: other int8 schemes are refused before loading."""
    config = json.loads((checkpoints["int8"] / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(change)
    for f in checkpoints["int8"].iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"int-quantized weights with {named} scales are not supported"):
        LLMEngine(EngineConfig(compile=False, model=str(tmp_path)))


def test_plan_and_server_take_the_checkpoints_format(checkpoints):
    import httpx
    import openai

    from models.sudoku.evaluate import load_heldout
    from tests.conftest import ServerProcess

    plan = subprocess.run([sys.executable, "-m", "server.cli", "plan", "--model", str(checkpoints["fp8"]),
                           "--plan-device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert plan.returncode == 0 and "fp8 weights" in plan.stdout, plan.stdout + plan.stderr
    proc = ServerProcess(["--model", str(checkpoints["fp8"])])
    try:
        proc.wait_ready()
        assert httpx.get(proc.base_url + "/health").json()["quantization"] == "fp8"
        client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        puzzle, solution = next(p for p in load_heldout() if 81 - p[0].count(".") >= 45)
        reply = client.chat.completions.create(
            model=str(checkpoints["fp8"]), messages=[{"role": "user", "content": puzzle}], seed=0
        )
        assert reply.choices[0].message.content.replace("\n", "") == solution
    finally:
        proc.stop()
