"""Whole-model guarantee under stress training: GuardSpace (defaults, and the paper's factors) against plain LoRA.

Tiny random Llama and GPT-2 (hidden 128, 2 layers), 8 AdvBench prompts for calibration (4 or 64 in two settings),
30 AdamW steps at lr 1e-2 (weight decay 0.1, gradient clipping 1) on benign texts, rank 8, alpha 16. For each method
and setting it prints the relative change of the logits on the calibration prompts (``||logits - base|| / ||base||``),
the same on the benign training texts (what was learnt), ``merge_and_unload`` against the unmerged model, and
GuardSpace's leakage certificate. Settings: fp32; a bf16 base (statistics, training and reference in bf16); trained
in fp32 then cast with ``model.to(torch.bfloat16)`` (reference: the base in bf16); 4 calibration prompts at
lr 5e-3; 64 calibration prompts (more tokens than features: no exact null space, the paper's 1e-6 rule everywhere).
The bounded-leakage variant runs in the last setting only (elsewhere nothing leaks and it equals the defaults).

    python -m benchmarks.bench_guarantee            # AdvBench from $PEFT_SAFETY_ADVBENCH or the shared data folder
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peft_safety  # noqa: F401  (registers GuardSpace)
from benchmarks.common import LLAMA_TARGETS, build_tokenizer, load_harmful_prompts, machine_description
from peft_safety import GuardSpaceConfig, collect_safety_statistics, guardspace_report

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
BENIGN = [
    "The movie was wonderful and moving",
    "I did not like the food at all",
    "What is the capital of France",
    "Add seven and five then double it",
]
METHODS = {
    "plain LoRA": None,
    "GuardSpace (defaults)": {},
    "GuardSpace (paper factors, 1e-6)": {"factor_scale": "paper", "null_space_threshold": 1e-6},
    "GuardSpace (defaults, max_calibration_leakage 1e-6)": {"max_calibration_leakage": 1e-6},
}
SETTINGS = ("fp32", "bf16 base", "cast to bf16", "4 prompts, lr 5e-3", "64 prompts (no exact null space)")


def llama(vocab: int, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def gpt2(vocab: int, dtype: torch.dtype) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=128, n_layer=2, n_head=4, n_positions=128)).to(dtype).eval()  # noqa: E501  # fmt: skip


ARCHITECTURES = {"llama": (llama, LLAMA_TARGETS), "gpt2": (gpt2, GPT2_TARGETS)}


@torch.no_grad()
def logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return model(**batch).logits[batch["attention_mask"].bool()].float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def train(model, tokenizer, steps: int, lr: float) -> None:
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    batch = tokenizer(BENIGN, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def run(arch: str, options: dict | None, tokenizer, calibration: list[str], setting: str) -> dict[str, float]:
    make, targets = ARCHITECTURES[arch]
    vocab = len(tokenizer)
    dtype = torch.bfloat16 if setting == "bf16 base" else torch.float32
    if options is None:
        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    else:
        stats = collect_safety_statistics(make(vocab, dtype), tokenizer, calibration, targets, show_progress=False)
        config = GuardSpaceConfig(r=8, lora_alpha=16, target_modules=targets, safety_statistics=stats, **options)
    torch.manual_seed(0)
    model = get_peft_model(make(vocab, dtype), config)
    train(model, tokenizer, 30, 5e-3 if setting == "4 prompts, lr 5e-3" else 1e-2)
    reference = make(vocab, dtype)
    if setting == "cast to bf16":
        model, reference = model.to(torch.bfloat16), make(vocab, torch.bfloat16)
    row = {
        "calibration": relative(logits(model, tokenizer, calibration), logits(reference, tokenizer, calibration)),
        "benign": relative(logits(model, tokenizer, BENIGN), logits(reference, tokenizer, BENIGN)),
    }
    if options is not None:
        row["certificate"] = guardspace_report(model).total_leakage
    if setting == "fp32":
        texts = calibration + BENIGN
        unmerged = logits(model, tokenizer, texts)
        row["merge"] = relative(logits(model.merge_and_unload(), tokenizer, texts), unmerged)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--advbench", help="AdvBench CSV (column goal)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    prompts, source = load_harmful_prompts(64, args.advbench)
    tokenizer = build_tokenizer(prompts + BENIGN, vocab_size=512)
    print(f"# {machine_description()}; calibration: AdvBench prompts ({os.path.basename(source)})")
    print(
        "| model | setting | method | calibration drift | vs LoRA | benign change | merged vs unmerged | certificate |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for arch in ARCHITECTURES:
        for setting in SETTINGS:
            calibration = prompts[: int(setting.split()[0])] if "prompts" in setting else prompts[:8]
            lora_drift = None
            for method, options in METHODS.items():
                if options and "max_calibration_leakage" in options and "no exact" not in setting:
                    continue
                row = run(arch, options, tokenizer, calibration, setting)
                lora_drift = lora_drift or row["calibration"]
                if options is None:
                    ratio = "1"
                elif row["calibration"] == 0:
                    ratio = "0 (bit-exact)"
                else:
                    ratio = f"1/{lora_drift / row['calibration']:.3g}"
                merge = f"{row['merge']:.1e}" if "merge" in row else "–"
                certificate = f"{row['certificate']:.1e}" if "certificate" in row else "–"
                print(
                    f"| {arch} | {setting} | {method} | {row['calibration']:.2e} | {ratio} | {row['benign']:.2f} | "
                    f"{merge} | {certificate} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
