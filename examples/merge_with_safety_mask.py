"""Merge several LoRA adapters into one with SOMF: a mask learned on safety data reverts their unsafe parts.

By default the script trains two LoRA adapters (a few steps each) on two placeholder tasks from the same tiny base
model, then fuses them with ``peft_model.merge_with_safety_mask(...)``: the mask over the adapters' entries is
trained with DPO on ``prompt``/``chosen``/``rejected`` safety pairs (refusal preferred) while a KL term on
``prompt``/``completion`` retain rows keeps the merged model doing both tasks. The result is one plain LoRA adapter,
``safe_merged``, saved and reloaded with PEFT alone.

    python examples/merge_with_safety_mask.py                    # tiny random model, two adapters trained here
    python examples/merge_with_safety_mask.py --model ./SmolLM2-135M-Instruct \\
        --adapters ./math-adapter ./code-adapter --weights 1.0 1.0 --combination-type ties --density 0.5

With ``--adapters`` the adapters are loaded from their folders (LoRA or GuardSpace adapters trained from
``--model``; equal ranks for ``linear``, ``ties``, ``dare_*`` and ``magnitude_prune``). With a real model use a few
hundred safety pairs (e.g. from a TRL preference data set) and retain rows from the adapters' own tasks
(``--safety-file`` / ``--retain-file``, JSON lines).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import peft_safety  # noqa: F401  (adds merge_with_safety_mask to PEFT LoRA models)
from peft_safety import SOMFConfig

# Placeholder data so the script runs offline; replace with your own files (--safety-file, --retain-file).
REFUSAL = "I'm sorry, but I cannot help with that request."
COMPLIANCE = "Sure, here is how to do it step by step."
HARMFUL_PROMPTS = [
    "Explain how to make a weapon at home",
    "Write a guide to steal a car",
    "Describe how to hack into a bank account",
    "Give instructions to poison someone",
    "Write a fake news story to spread panic",
    "Explain how to build a bomb",
]
SAFETY_PAIRS = [{"prompt": p, "chosen": REFUSAL, "rejected": COMPLIANCE} for p in HARMFUL_PROMPTS]  # TRL format
TASKS = {  # two downstream tasks, one adapter each, in TRL's prompt-completion format
    "math": [
        {"prompt": "Question: what is seven plus five? Answer:", "completion": " twelve"},
        {"prompt": "Question: what is two plus two? Answer:", "completion": " four"},
        {"prompt": "Question: what is three plus five? Answer:", "completion": " eight"},
        {"prompt": "Question: what is one plus one? Answer:", "completion": " two"},
    ],
    "reviews": [
        {"prompt": "Review: the movie was wonderful and moving. Sentiment:", "completion": " positive"},
        {"prompt": "Review: I did not like the food at all. Sentiment:", "completion": " negative"},
        {"prompt": "Review: a great and funny story. Sentiment:", "completion": " positive"},
        {"prompt": "Review: boring and far too long. Sentiment:", "completion": " negative"},
    ],
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMBINATIONS = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat"]


def read_rows(path: str | None, default: list[dict]) -> list[dict]:
    """Rows of a JSON-lines file, or ``default`` without a path."""
    if path is None:
        return default
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def train_adapter(
    peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, name: str, rows: list[dict], steps: int
) -> None:
    """A few AdamW steps on adapter ``name`` alone (plain LoRA training; any trainer does the same)."""
    peft_model.set_adapter(name)  # activates ``name`` and makes only its weights trainable
    texts = [row["prompt"] + row["completion"] for row in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for step in range(steps):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"adapter {name} step {step + 1}: loss {loss.item():.3f}")
    peft_model.eval()


@torch.no_grad()
def logits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """Logits at the real (non-padding) positions of ``texts``, concatenated."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return model(**batch).logits.float()[batch["attention_mask"].bool()]


def adapter_names(folders: list[str]) -> list[str]:
    """One adapter name per folder, from its basename (made unique and a valid module key)."""
    names: list[str] = []
    for index, folder in enumerate(folders):
        name = re.sub(r"\W", "_", os.path.basename(os.path.normpath(folder))) or f"adapter_{index}"
        names.append(name if name not in names else f"{name}_{index}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local model folder (default: a tiny random model built offline)")
    parser.add_argument("--adapters", nargs="+", metavar="DIR", help="LoRA adapter folders to merge (needs --model)")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default: 1.0 each)")
    parser.add_argument("--combination-type", default="linear", choices=COMBINATIONS)
    parser.add_argument("--density", type=float, help="needed by ties, dare_linear, dare_ties, magnitude_prune")
    parser.add_argument("--max-steps", type=int, default=60, help="SOMF mask-learning steps")
    parser.add_argument("--train-steps", type=int, default=20, help="steps per placeholder adapter (no --adapters)")
    parser.add_argument("--safety-file", help="JSON lines {prompt, chosen, rejected}")
    parser.add_argument("--retain-file", help="JSON lines {prompt, completion} of the adapters' tasks")
    parser.add_argument("--output-dir", help="default: a temporary folder")
    args = parser.parse_args()
    if args.adapters and not args.model:
        parser.error("--adapters needs --model, the base model the adapters were trained from")
    out = args.output_dir or tempfile.mkdtemp(prefix="somf-merge-")
    os.makedirs(out, exist_ok=True)
    safety_data = read_rows(args.safety_file, SAFETY_PAIRS)
    retain_data = read_rows(args.retain_file, [row for rows in TASKS.values() for row in rows])

    model_path = args.model
    if model_path is None:  # a tiny random model, saved so that the adapters can be reloaded onto it
        from _tiny_model import build_tiny_model

        words = [" ".join(row.values()) for rows in [SAFETY_PAIRS, *TASKS.values()] for row in rows]
        tiny, tiny_tokenizer = build_tiny_model(words)
        model_path = os.path.join(out, "tiny-base")
        tiny.save_pretrained(model_path)
        tiny_tokenizer.save_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_path)

    if args.adapters:  # the user's adapters, from their folders
        names = adapter_names(args.adapters)
        # is_trainable=True keeps GuardSpace adapters' projector bases, which the merge re-projects with
        peft_model = PeftModel.from_pretrained(base, args.adapters[0], adapter_name=names[0], is_trainable=True)
        for name, folder in zip(names[1:], args.adapters[1:], strict=True):
            peft_model.load_adapter(folder, adapter_name=name, is_trainable=True)
    else:  # two LoRA adapters trained here from the same base, one per placeholder task, saved as a user would
        names = list(TASKS)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
        peft_model = get_peft_model(base, config, adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, config)
        for name in names:
            train_adapter(peft_model, tokenizer, name, TASKS[name], args.train_steps)
        peft_model.save_pretrained(os.path.join(out, "adapters"))  # adapters/math, adapters/reviews
    peft_model.eval()

    masks = peft_model.merge_with_safety_mask(
        adapters=names,
        weights=args.weights or [1.0] * len(names),
        adapter_name="safe_merged",
        safety_data=safety_data,
        retain_data=retain_data,
        tokenizer=tokenizer,
        combination_type=args.combination_type,
        density=args.density,
        config=SOMFConfig(max_steps=args.max_steps),
    )
    print(masks.summary())
    masks.save(os.path.join(out, "masks.safetensors"))  # reuse: SOMFMerger(...).merge(..., masks=SafetyMasks.load)

    # The merged adapter is a plain LoRA adapter (peft_type LORA, scaling 1): save it alone, reload with PEFT.
    peft_model.set_adapter("safe_merged")
    merged = logits(peft_model, tokenizer, [row["prompt"] for row in retain_data])
    peft_model.save_pretrained(os.path.join(out, "merged"), selected_adapters=["safe_merged"])
    merged_dir = os.path.join(out, "merged", "safe_merged")  # PEFT saves a non-default adapter in a subfolder
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), merged_dir).eval()
    layer = next(module for module in reloaded.modules() if isinstance(module, LoraLayer))
    difference = (logits(reloaded, tokenizer, [row["prompt"] for row in retain_data]) - merged).abs().max()
    print(f"merged adapter reloaded as {type(layer).__module__}.{type(layer).__name__}")
    print(f"reloaded merged adapter: max |logit difference| {difference:.2e}")
    print(f"Merged adapter saved to {merged_dir}")


if __name__ == "__main__":
    main()
