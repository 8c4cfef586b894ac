"""The benchmark scripts that a lent GPU runs unchanged (bench/device_check.sh), smoke-run here on the tiny model so
a broken option or report is found on CPU, not in scarce device time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_engine_bench_profiles_where_a_pass_goes(tmp_path):
    """`bench/engine.py --profile` adds, per profiled mode, a pass's time split by part (expert GEMMs, other
    GEMMs, attention, ...) and its top ops, to the printed table and to the JSON."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine.py"), "--size", "tiny", "--batches", "1", "--steps", "4",
         "--repeats", "1", "--invariance", "0", "--kernels", "stock", "--profile", "stock", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "engine-tiny-cpu.json").read_text())
    profile = report["profiles"]["stock"]
    assert profile["batch"] == 1 and profile["passes"] == 3  # the passes after the first (admission, prefill)
    parts = profile["parts_ms"]
    # The tiny model's experts run through transformers' grouped_mm; its projections and LM head are plain GEMMs.
    assert parts["expert GEMMs (grouped)"] > 0 and parts["other GEMMs"] > 0 and parts["attention"] > 0
    assert abs(sum(parts.values()) - profile["busy_ms"]) < 1e-6
    assert 0 < profile["busy_ms"] < profile["wall_ms"]
    assert any(t["name"] == "aten::mm" for t in profile["top"])
    table = (tmp_path / "engine-tiny-cpu.md").read_text()
    assert "Profile, Press stock, batch 1, 3 passes after the first" in table
    assert "| expert GEMMs (grouped) |" in table


def test_engine_bench_interleaves_transformers_and_press(tmp_path):
    """`bench/engine.py --interleave`: transformers and the engine take turns across batch sizes (each round times
    every batch size and mode once), and the report says so."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine.py"), "--size", "tiny", "--batches", "1,2", "--steps", "2",
         "--repeats", "2", "--invariance", "0", "--kernels", "stock", "--interleave", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "engine-tiny-cpu.json").read_text())
    assert report["interleaved"] is True
    assert report["turns"] == ["transformers batch 1", "stock batch 1", "transformers batch 2", "stock batch 2"]
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    assert all(r["hf_pass_ms"] > 0 and r["stock_pass_ms"] > 0 for r in report["rows"])
    assert "taking turns" in (tmp_path / "engine-tiny-cpu.md").read_text()
