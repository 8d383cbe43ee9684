"""Smoke tests: the example scripts run offline on the tiny model with a couple of steps."""

from __future__ import annotations

import ast
import json
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


@pytest.mark.slow
def test_sft_example(tmp_path):
    pytest.importorskip("trl")
    done = run_example("train_guardspace_sft.py", "--max-steps", "2", "--output-dir", str(tmp_path))
    assert "step    2: harmful score" in done.stdout
    assert "GuardSpace: 14 layers" in done.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # SFTTrainer passed the GuardSpaceConfig to get_peft_model unchanged: a GuardSpace adapter was trained and saved
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "guardspace" and config["peft_type"] == "LORA"
    assert len(config["null_space_dims"]) == 14


@pytest.mark.slow
def test_qlora_example(tmp_path):
    pytest.importorskip("bitsandbytes")
    done = run_example("train_guardspace_qlora.py", "--max-steps", "2", "--output-dir", str(tmp_path))
    assert "base loaded in 4 bit: True" in done.stdout
    assert "adapted layer type: peft_safety.guardspace.bnb.GuardSpaceLinear4bit" in done.stdout
    assert "GuardSpace: 14 layers" in done.stdout
    numbers = {line.split(":")[0]: line for line in done.stdout.splitlines()}
    change = numbers["max |logit change| vs the 4-bit base"]
    task, calibration = (float(part.rsplit(" ", 1)[1]) for part in change.split(":", 1)[1].split(","))
    assert task > 1e-3  # it trained (measured 8e-3 after 2 steps at lr 2e-4: the pace of plain LoRA)
    assert calibration < 1e-2 * task  # and left the calibration prompts alone (measured 1e-4)
    assert float(numbers["reloaded adapter"].rsplit(" ", 1)[1]) < 1e-5  # fresh 4-bit base + saved adapter
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


PLAIN_PEFT_LOAD = """
import sys
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]).eval()
layers = [type(m).__module__ for m in model.modules() if isinstance(m, LoraLayer)]
with torch.no_grad():
    logits = model(input_ids=torch.tensor([[4, 5, 6]])).logits
assert torch.isfinite(logits).all()
print("peft_safety imported:", "peft_safety" in sys.modules, "layers:", len(layers), set(layers))
"""


@pytest.mark.slow
def test_merge_example(tmp_path):
    first = tmp_path / "trained"
    done = run_example(
        "merge_with_safety_mask.py", "--max-steps", "2", "--train-steps", "2", "--output-dir", str(first)
    )
    assert "SOMF masks for ['math', 'reviews'] (final mask: expected)" in done.stdout
    assert "safety_loss_deployed" in done.stdout and "kept fraction per adapter: math=" in done.stdout
    assert "merged adapter reloaded as peft.tuners.lora.layer.Linear" in done.stdout
    reload_line = next(line for line in done.stdout.splitlines() if line.startswith("reloaded merged adapter"))
    assert float(reload_line.rsplit(" ", 1)[1]) < 1e-5
    merged = first / "merged" / "safe_merged"
    assert json.loads((merged / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (first / "masks.safetensors").is_file()

    # the merged adapter loads with plain PEFT, without peft_safety
    loaded = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT_LOAD, str(first / "tiny-base"), str(merged)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "peft_safety imported: False layers: 14 {'peft.tuners.lora.layer'}" in loaded.stdout

    # the adapters saved by the first run, merged from their folders (--adapters), with TIES
    second = tmp_path / "from-folders"
    adapters = [str(first / "adapters" / name) for name in ("math", "reviews")]
    done = run_example(
        "merge_with_safety_mask.py",
        *("--model", str(first / "tiny-base"), "--adapters", *adapters),
        *("--combination-type", "ties", "--density", "0.5", "--max-steps", "2", "--output-dir", str(second)),
    )
    assert "SOMF masks for ['math', 'reviews']" in done.stdout
    assert (second / "merged" / "safe_merged" / "adapter_model.safetensors").is_file()


def plain_lora_version(source: str) -> str:
    """What the training examples' docstrings promise: drop the ``# GuardSpace`` lines, ``LoraConfig(`` for the
    config line, and import ``LoraConfig`` from ``peft``."""
    lines = []
    for line in source.splitlines():
        if "GuardSpaceConfig(safety_statistics=statistics,  # GuardSpace" in line:
            lines.append(line.split("GuardSpaceConfig(")[0] + "LoraConfig(")
        elif "# GuardSpace" not in line:
            lines.append(line)
    return "from peft import LoraConfig\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "name", ["train_guardspace_trainer.py", "train_guardspace_sft.py", "train_guardspace_qlora.py"]
)
def test_training_examples_differ_from_plain_lora_by_the_guardspace_lines(name):
    with open(os.path.join(ROOT, "examples", name), encoding="utf-8") as handle:
        source = handle.read()
    assert source.count("GuardSpaceConfig(safety_statistics=statistics,  # GuardSpace") == 1
    tree = ast.parse(plain_lora_version(source))
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    guardspace = {"GuardSpaceConfig", "collect_safety_statistics", "guardspace_report", "statistics", "report"}
    assert not (names | imported) & guardspace  # nothing GuardSpace is left, and nothing dangles
    assert "LoraConfig" in names
