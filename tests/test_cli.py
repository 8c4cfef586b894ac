"""The `press` command line: generate shows passes and the answer; config precedence."""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from engine.host_allocator import tune_host_allocator
from server.cli import engine_config

ROOT = Path(__file__).resolve().parents[1]


def test_generate_prints_passes_answer_and_tokens_per_forward(tiny_path):
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "Hello", "--model", str(tiny_path), "--max-tokens", "40",
         "--denoising-steps", "4", "--seed", "1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    passes = [line for line in out.stdout.splitlines() if line.startswith("[canvas")]
    assert passes[0].startswith("[canvas 0 pass   1/4") and len(passes) == 8  # two canvases of four passes
    assert "tokens per forward" in out.stderr and "finish: length | 40 tokens | 2 canvases | 8 passes" in out.stderr


def _ns(**kw) -> argparse.Namespace:
    base = dict.fromkeys(
        ["config", "model", "dtype", "device", "max_model_len", "default_max_tokens", "max_num_seqs",
         "served_model_name", "cache_dir"]
    )  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_config_precedence_flag_over_env_over_yaml(tmp_path, monkeypatch):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: from-yaml\nmax_num_seqs: 2\nmax_model_len: 100\ndefault_max_tokens: 50\n")
    monkeypatch.setenv("PRESS_MAX_NUM_SEQS", "3")
    monkeypatch.setenv("PRESS_MAX_MODEL_LEN", "200")
    cfg = engine_config(_ns(config=str(preset), max_model_len=300))
    assert cfg.model == "from-yaml"  # YAML over default
    assert cfg.max_num_seqs == 3  # env over YAML
    assert cfg.max_model_len == 300  # flag over env
    assert cfg.default_max_tokens == 50
    from engine.loader import default_model

    assert engine_config(_ns()).model == default_model()  # tiny-sudoku where it ships, else tiny-random


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_host_allocator_thresholds_are_accepted_by_glibc():
    assert tune_host_allocator()
