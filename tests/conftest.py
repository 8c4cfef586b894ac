"""Shared fixtures: one tiny-random checkpoint per test session, built in a temporary cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(os.environ.get("PRESS_TEST_CACHE_DIR") or tmp_path_factory.mktemp("press-cache"))
    return path


@pytest.fixture(scope="session")
def tiny_path(cache_dir: Path) -> Path:
    from engine.tiny_random import ensure_tiny_random

    return ensure_tiny_random(cache_dir)


@pytest.fixture(scope="session")
def engine(tiny_path: Path):
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(tiny_path)))
