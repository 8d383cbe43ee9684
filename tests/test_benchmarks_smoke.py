"""Keeps ``benchmarks/bench_guardspace.py`` runnable: its ``main`` on the smallest settings, in-process."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("attr", reason="peft's CorDA module imports `attr` (package attrs)")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_guardspace.py"
TINY = [
    "--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--vocab", "256",
    "--prompts", "6", "--r", "2", "--batch", "2", "--seq", "8",
    "--init-repeats", "1", "--warmup", "1", "--repeats", "2", "--threads", "1",
]  # fmt: skip


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_guardspace", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_guardspace_main_runs_on_tiny_settings(capsys):
    results = _load_script().main(TINY)
    printed = capsys.readouterr().out
    assert "| statistics + init (s), vs CorDA kpm |" in printed
    assert "| training step fwd+bwd+AdamW (ms), vs LoRA |" in printed
    for value in (results["init"]["ratio"], results["step"]["ratio"]):
        assert math.isfinite(value) and value > 0
    memory = results["memory"]
    assert memory["guardspace"]["param_bytes"] == memory["lora"]["param_bytes"]  # same r, same targets
    assert memory["lora"]["buffer_bytes"] == 0
    assert memory["guardspace"]["square_buffers"] == []  # never an n x n tensor per module
    assert results["settings"]["prompts"] == 6
