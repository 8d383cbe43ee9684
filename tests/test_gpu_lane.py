"""The GPU lane without a GPU: ``benchmarks/gpu.sh`` fails fast and clearly, ``bench_gpu_7b.py`` runs at tiny shapes
on the CPU, and the memory model's formula equals the bytes GuardSpace actually allocates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_gpu_7b, memory_model  # noqa: E402

TINY = [
    "--device", "cpu", "--hidden", "32", "--intermediate", "64", "--heads", "2", "--vocab", "128",
    "--prompts", "4", "--prompt-tokens", "8", "--steps", "2", "--batch", "2", "--seq", "8",
]  # fmt: skip
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@no_cuda
def test_gpu_lane_stops_at_once_without_cuda():
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr


@no_cuda
def test_bench_gpu_7b_refuses_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        bench_gpu_7b.main(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_gpu_7b_runs_at_tiny_shapes_on_cpu(capsys):
    results = bench_gpu_7b.main(TINY)
    assert "| peak memory above the model during training (GiB) |" in capsys.readouterr().out
    lora, guard = results["lora"], results["guardspace"]
    assert guard["adapter_gib"] > lora["adapter_gib"] > 0  # GuardSpace adds its buffers to the same factors
    assert 0.0 <= guard["leakage"] < 1e-6  # the certificate is reported, and small at the default threshold


def test_memory_formula_equals_allocated_bytes():
    rows = memory_model.validate(thresholds=("auto", 1e-2))
    assert all(predicted == allocated for _, predicted, allocated in rows), rows
    assert rows[0][1] != rows[1][1]  # the thresholds give different null spaces: the check is not vacuous


def test_memory_model_at_llama_shapes():
    assert memory_model.LLAMA_2_7B.base_parameters() == pytest.approx(6.74e9, rel=1e-3)
    assert memory_model.LLAMA_3_8B.base_parameters() == pytest.approx(8.03e9, rel=1e-3)
    empty = memory_model.model_memory(memory_model.LLAMA_2_7B, 8, lambda _d, _s: (0.0, 0.0))
    # no null space: GuardSpace's buffers are the frozen copies of A0 P and B0, as many floats as LoRA's factors
    assert empty["guard_buffers"] == pytest.approx(empty["lora_training"] / 4, rel=1e-3)
