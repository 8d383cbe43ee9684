"""The demo's aligned start: a short LoRA safety fine-tune of SmolLM2-135M-Instruct, merged and cached.

SmolLM2-135M-Instruct as shipped answers most harmful requests. The aligned start is trained on a mix of

* refusals: AdvBench requests, each answered with one of several refusals (:data:`~.splits.REFUSALS`);
* helpful answers: the shipped model's own greedy answers to XSTest safe prompts with an even id (answers it
  refused are dropped), so that the safety training does not teach it to refuse harmless questions.

The harmful score and the over-refusal are measured on other rows of the same sets (disjoint by construction in
:mod:`~.splits`).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from . import splits
from .model import TARGET_MODULES, load_checkpoint
from .sft import supervised_fine_tune


@dataclass(frozen=True)
class AlignedStartSettings:
    """How the aligned start is trained (the cache folder's name is derived from these)."""

    refusals: int = 120
    helpful: int = 100
    answer_tokens: int = 32
    steps: int = 40
    batch_size: int = 8
    learning_rate: float = 5e-4
    r: int = 16
    max_length: int = 96
    seed: int = 0

    def key(self, base: str) -> str:
        """A short, stable name for these settings on the model ``base`` (changes whenever either does)."""
        import hashlib

        text = json.dumps({"base": base, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def helpful_pairs(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[splits.Pair]:
    """The model's greedy answers to ``prompts``, keeping only those the keyword judge does not call refusals."""
    from ..evaluation import KeywordJudge, generate_responses

    answers = generate_responses(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=32, desc="helpful answers"
    )
    judge = KeywordJudge(flag="refusal")
    return [splits.Pair(p, a) for p, a in zip(prompts, answers, strict=True) if a.strip() and not judge.is_refusal(a)]


def build_aligned_start(base_dir: Path, target: Path, settings: AlignedStartSettings) -> dict:
    """Fine-tune the checkpoint in ``base_dir`` into the aligned start and save it (merged) in ``target``."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    model, tokenizer = load_checkpoint(base_dir)
    helpful = helpful_pairs(model, tokenizer, splits.helpful_prompts(settings.helpful), settings.answer_tokens)
    refusals = splits.refusal_pairs(settings.refusals)
    mix = helpful + refusals
    random.Random(settings.seed).shuffle(mix)
    config = LoraConfig(r=settings.r, lora_alpha=2 * settings.r, target_modules=TARGET_MODULES, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    log = supervised_fine_tune(
        peft_model,
        tokenizer,
        mix,
        steps=settings.steps,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        max_length=settings.max_length,
        seed=settings.seed,
        desc="aligned start: safety fine-tune",
    )
    merged = peft_model.merge_and_unload()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    meta = {"settings": asdict(settings), "refusals": len(refusals), "helpful": len(helpful), "training": asdict(log)}
    (partial / "aligned_start.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    partial.rename(target)
    return meta
