"""The fused adapter is a plain LoRA adapter (plain ``peft`` reloads it, in a process without ``peft_safety``), and
GuardSpace adapters are fused with their projector honoured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from somf_testbed import (  # noqa: F401 (one_thread is an autouse fixture)
    TASK_ROWS,
    TASK_TEXTS,
    TRAIN_HARMFUL,
    adapter_state,
    make_adapters,
    one_thread,
    pairs,
)

from peft_safety import SOMFConfig, SOMFMerger

TESTS = os.path.dirname(os.path.abspath(__file__))
PLAIN_PEFT_LOAD = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from conftest import build_tokenizer, make_llama
from peft import PeftModel
tok = build_tokenizer()
model = PeftModel.from_pretrained(make_llama(tok, seed=0), {path!r})
batch = tok({texts!r}, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**batch).logits
assert not any(name.startswith("peft_safety") for name in sys.modules), "peft_safety was imported"
print(json.dumps(logits.flatten().tolist()))
"""


def test_fused_adapter_reloads_with_plain_peft_in_a_fresh_process(tokenizer, tmp_path):
    peft_model = make_adapters(tokenizer)
    masks = peft_model.merge_with_safety_mask(
        adapters=["poisoned", "task"],
        weights=[1.0, 0.5],
        adapter_name="safe_merged",
        safety_data=pairs(TRAIN_HARMFUL),
        tokenizer=tokenizer,
        combination_type="ties",
        density=0.8,
        retain_data=TASK_ROWS,
        config=SOMFConfig(progress_bar=False, max_steps=3),
    )
    assert masks.adapters == ["poisoned", "task"]
    peft_model.save_pretrained(tmp_path, selected_adapters=["safe_merged"])
    peft_model.set_adapter("safe_merged")
    batch = tokenizer(TASK_TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = peft_model(**batch).logits.flatten()
    path = os.path.join(tmp_path, "safe_merged")
    config = json.load(open(os.path.join(path, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    code = PLAIN_PEFT_LOAD.format(tests=TESTS, path=path, texts=TASK_TEXTS)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    reloaded = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-4)


def _delta(module, adapter: str) -> torch.Tensor:
    return module.get_delta_weight(adapter).float()


def test_guardspace_adapter_is_fused_with_its_projector(tokenizer):
    peft_model = make_adapters(tokenizer, guardspace=True)
    assert type(peft_model.peft_config["task"]).__name__ == "GuardSpaceConfig"
    SOMFMerger().merge(peft_model, ["poisoned", "task"], [1.0, 0.5], "cat_merge", combination_type="cat")
    layers = [m for m in peft_model.modules() if hasattr(m, "lora_guard") and "task" in m.lora_guard]
    assert len(layers) == 14
    for module in layers:  # cat is exact: the fused update is the weighted sum of the GuardSpace-aware updates
        expected = _delta(module, "poisoned") + 0.5 * _delta(module, "task")
        torch.testing.assert_close(_delta(module, "cat_merge"), expected, atol=1e-5, rtol=1e-4)
    before = adapter_state(peft_model)
    masks = peft_model.merge_with_safety_mask(
        adapters=["poisoned", "task"],
        weights=[1.0, 1.0],
        adapter_name="safe_merged",
        safety_data=pairs(TRAIN_HARMFUL),
        tokenizer=tokenizer,
        retain_data=TASK_ROWS,
        config=SOMFConfig(progress_bar=False, max_steps=4),
    )
    assert masks.history["safety_loss_deployed"] < masks.history["safety_loss_before"]
    after = {k: v for k, v in adapter_state(peft_model).items() if ".safe_merged." not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert type(peft_model.peft_config["safe_merged"]).__name__ == "LoraConfig"
