"""Smoke tests: the example scripts run offline on the tiny model with a couple of steps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    script = os.path.join(ROOT, "examples", name)
    done = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_trainer_example(tmp_path):
    done = run_example("train_guardspace_trainer.py", "--max-steps", "2", "--output-dir", str(tmp_path))
    assert "step    2: harmful score" in done.stdout
    assert "GuardSpace: 14 layers" in done.stdout
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_quickstart_example(tmp_path):
    done = run_example("quickstart.py", "--max-steps", "2", "--output-dir", str(tmp_path))
    assert "step 2: loss" in done.stdout
    lines = {line.split(":")[0]: line for line in done.stdout.splitlines()}
    for folder in ("guardspace-adapter", "guardspace-adapter-as-lora"):
        assert float(lines[folder].rsplit(" ", 1)[1]) < 1e-4  # reload / export reproduce the trained model
    assert (tmp_path / "stats.safetensors").is_file()
