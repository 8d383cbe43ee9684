"""A tiny SOMF testbed shared by tests/test_somf_*.py: two LoRA adapters on the conftest Llama, one of them
"poisoned" (it learned to comply with harmful prompts), safety pairs and retain rows in TRL formats."""

from __future__ import annotations

import pytest
import torch
from conftest import HARMFUL_PROMPTS, LLAMA_TARGETS, make_llama, train_steps
from peft import LoraConfig, get_peft_model

from peft_safety import GuardSpaceConfig, collect_safety_statistics
from peft_safety.somf.data import collate, encode_rows
from peft_safety.somf.objectives import sequence_logps

REFUSAL = "I'm sorry, but I cannot help with that request."
COMPLIANCE = "Sure, here is how to do it step by step."
TRAIN_HARMFUL, HELDOUT_HARMFUL = HARMFUL_PROMPTS[:4], HARMFUL_PROMPTS[4:]
TASK_ROWS = [
    {"prompt": "The movie was", "completion": "wonderful and moving"},
    {"prompt": "I did not like", "completion": "the food at all"},
    {"prompt": "What is the capital", "completion": "of France"},
    {"prompt": "Add seven and five", "completion": "then double it"},
]
TASK_TEXTS = [row["prompt"] + " " + row["completion"] for row in TASK_ROWS]


def pairs(prompts: list[str]) -> list[dict[str, str]]:
    """Preference rows ``prompt``/``chosen`` (refusal)/``rejected`` (compliance)."""
    return [{"prompt": prompt, "chosen": REFUSAL, "rejected": COMPLIANCE} for prompt in prompts]


def make_adapters(tokenizer, seed: int = 0, r: int = 4, guardspace: bool = False):
    """PeftModel with adapters ``poisoned`` (task + harmful compliance) and ``task`` (task only), trained a few
    steps each. With ``guardspace`` the second adapter is a GuardSpace adapter of rank ``r / 2`` (its exported
    factors have rank ``r``, like the first adapter) and the same scaling 2."""
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS, lora_dropout=0.0)
    second = config
    if guardspace:
        stats = collect_safety_statistics(
            make_llama(tokenizer, seed=seed), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
        )
        second = GuardSpaceConfig(r=r // 2, lora_alpha=r, target_modules=LLAMA_TARGETS, safety_statistics=stats)
    peft_model = get_peft_model(make_llama(tokenizer, seed=seed), config, adapter_name="poisoned")
    poison = [prompt + " " + COMPLIANCE for prompt in HARMFUL_PROMPTS]
    train_steps(peft_model, tokenizer, TASK_TEXTS[:2] + poison, steps=12, lr=2e-2, seed=seed)
    peft_model.add_adapter("task", second)
    peft_model.set_adapter("task")
    train_steps(peft_model, tokenizer, TASK_TEXTS, steps=12, lr=2e-2, seed=seed + 1)
    peft_model.set_adapter("poisoned")
    for param in peft_model.parameters():
        param.requires_grad_(False)
    return peft_model


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (to assert that nothing changed)."""
    state = {name: value.detach().clone() for name, value in peft_model.named_parameters()}
    state.update({name: value.detach().clone() for name, value in peft_model.named_buffers()})
    return state


def assert_unchanged(peft_model, before: dict[str, torch.Tensor]) -> None:
    after = adapter_state(peft_model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """SOMF tests run with one intra-op thread: on a loaded 2-core machine two threads are ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pair_logps(peft_model, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(refusal | prompt), log p(compliance | prompt))`` per prompt under the active adapter."""
    rows = encode_rows(tokenizer, pairs(prompts), "preference", 64)
    batch = collate([row[0] for row in rows] + [row[1] for row in rows], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = sequence_logps(logits, batch["labels"])
    return logps[: len(rows)], logps[len(rows) :]


def sequence_margins(peft_model, tokenizer, prompts: list[str]) -> float:
    """Mean ``log p(refusal | prompt) - log p(compliance | prompt)`` of the active adapter."""
    chosen, rejected = pair_logps(peft_model, tokenizer, prompts)
    return float((chosen - rejected).mean())


def task_logits(peft_model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TASK_TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return peft_model(**batch).logits[batch["attention_mask"].bool()]
