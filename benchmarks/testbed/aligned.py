"""The aligned start: a short LoRA safety SFT of SmolLM2-135M-Instruct, merged and cached.

SmolLM2-135M-Instruct as shipped refuses weakly (harmful score ~0.9 with the keyword judge). A refusal-only (or
refusal + maths) SFT makes it refuse everything (REFERENCE.md §1: over-refusal 1.00). The mix here balances
harmful requests -> refusals with borderline-but-safe and ordinary requests answered helpfully:

* refusals: safety_tuned_llamas training pairs whose answer opens with a refusal (answer cut to two sentences),
  and I-CoNa hateful-speech requests with a short templated refusal (``--hate``; the harmful evaluation set is
  two-thirds hate speech, which the first mix left unrefused); optionally even-id XSTest unsafe prompts with a
  templated refusal (``--xstest-unsafe``, off: they made the model refuse their safe twins);
* helpful: the shipped model's own greedy answers (self-distillation, answers it refused are dropped) to the
  even-id XSTest safe prompts and 30 I-Alpaca instructions (GSM8K questions too with ``--gsm8k N``).

Over-refusal is evaluated on the odd-id XSTest safe prompts and the harmful score on I-MaliciousInstructions, both
never trained on. ``python -m benchmarks.testbed.aligned`` builds and caches it (about 2.5 min on 2 free cores once
the helpful answers are cached); ``run.py`` calls :func:`load_aligned`, which builds it when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from benchmarks.testbed import data
from benchmarks.testbed.model import CACHE_DIR, TARGETS, load_model
from benchmarks.testbed.train import sft

ALIGNED_DIR = CACHE_DIR / "smollm2-135m-aligned"
HELPFUL_CACHE = CACHE_DIR / "aligned_helpful_answers.json"
DEFAULTS = {
    "refusals": 60,
    "hate": 100,
    "xstest_unsafe": 0,
    "alpaca": 30,
    "gsm8k": 0,
    "steps": 40,
    "batch_size": 8,
    "lr": 5e-4,
    "r": 16,
    "max_length": 96,
    "answer_tokens": 32,
    "seed": 0,
    "threads": 0,
}


def _first_sentences(text: str, count: int = 2) -> str:
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return " ".join(parts[:count])


def helpful_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[dict[str, str]]:
    """Greedy answers of the shipped model (cached), keeping only the non-refusals."""
    from peft_safety.evaluation import KeywordJudge, generate_responses

    cached = json.loads(HELPFUL_CACHE.read_text()) if HELPFUL_CACHE.is_file() else {}
    missing = [p for p in prompts if p not in cached]
    if missing:
        answers = generate_responses(
            model,
            tokenizer,
            missing,
            max_new_tokens=max_new_tokens,
            batch_size=32,
            desc="helpful answers (shipped model)",
        )
        cached.update(zip(missing, answers, strict=True))
        HELPFUL_CACHE.write_text(json.dumps(cached, indent=0))
    judge = KeywordJudge(flag="refusal")
    return [{"prompt": p, "response": cached[p]} for p in prompts if not judge.is_refusal(cached[p])]


TEMPLATED_REFUSALS = data.HATE_REFUSALS + data.UNSAFE_REFUSALS  # templates the aligned start may have learnt


def usable_refusal(answer: str) -> str | None:
    """The answer cut to its first two complete sentences when that is a clean refusal: the keyword judge calls it
    a refusal, it repeats no templated refusal of the aligned-start SFT verbatim, and it does not loop on a word.
    ``None`` otherwise (then a written refusal is used)."""
    from peft_safety.evaluation import KeywordJudge

    sentences = [s for s in re.split(r"(?<=[.!?])\s+", answer.strip()) if s]
    complete = [s for s in sentences if s.endswith((".", "!", "?"))]
    if complete:
        text = " ".join(complete[:2]) if sentences[: len(complete[:2])] == complete[:2] else complete[0]
    elif len(answer.split()) < 20:  # a short answer that ended without punctuation, not a cut one
        text = answer.strip()
    else:
        return None
    words = text.lower().split()
    if not words or len(set(words)) < 0.6 * len(words) or any(t in text for t in TEMPLATED_REFUSALS):
        return None
    return text if KeywordJudge(flag="refusal").is_refusal(text) and text.strip() else None


def own_refusals(model, tokenizer, prompts: list[str], categories: list[str], cache: Path) -> list[dict[str, str]]:
    """Varied refusals for SOMF's safety pairs: the model's own greedy answer to each prompt (48 tokens, cached in
    ``cache`` by prompt), cut by :func:`usable_refusal`; where it is not usable, or repeats an earlier chosen
    refusal, the next written refusal of the prompt's category (``data.WRITTEN_REFUSALS``). Each row:
    ``{"prompt", "refusal", "source"}`` with source ``"own"`` or ``"written"``."""
    from peft_safety.evaluation import generate_responses

    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [p for p in prompts if p not in cached]
    if missing:
        answers = generate_responses(model, tokenizer, missing, max_new_tokens=48, batch_size=24, show_progress=False)
        cached.update(zip(missing, answers, strict=True))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(cached, indent=0))
    rows, used, next_written = [], set(), dict.fromkeys(data.WRITTEN_REFUSALS, 0)
    for prompt, category in zip(prompts, categories, strict=True):
        text = usable_refusal(cached[prompt])
        if text is not None and text not in used:
            rows.append({"prompt": prompt, "refusal": text, "source": "own"})
            used.add(text)
            continue
        pool = data.WRITTEN_REFUSALS[category]
        rows.append({"prompt": prompt, "refusal": pool[next_written[category] % len(pool)], "source": "written"})
        next_written[category] += 1
    return rows


def build_aligned(settings: dict | None = None, target: Path = ALIGNED_DIR) -> dict:
    cfg = {**DEFAULTS, **(settings or {})}
    torch.manual_seed(cfg["seed"])
    start = time.perf_counter()
    model, tokenizer = load_model()
    safe_train, _ = data.xstest_train()
    prompts = safe_train + data.benign_instructions()[: cfg["alpaca"]] + data.gsm8k_questions(cfg["gsm8k"])
    helpful = helpful_answers(model, tokenizer, prompts, cfg["answer_tokens"])
    refusals = [
        {"prompt": r["prompt"], "response": _first_sentences(r["response"])}
        for r in data.refusal_pairs(cfg["refusals"], seed=cfg["seed"])
    ]
    refusals += data.hate_speech_refusals(cfg["hate"]) + data.xstest_unsafe_refusals(cfg["xstest_unsafe"])
    mix = data.poisoned_mix(helpful, refusals, seed=cfg["seed"])
    print(f"aligned-start SFT: {len(refusals)} refusals + {len(helpful)} helpful answers", flush=True)
    peft_model = get_peft_model(
        model, LoraConfig(r=cfg["r"], lora_alpha=2 * cfg["r"], target_modules=TARGETS, lora_dropout=0.0)
    )
    log = sft(
        peft_model,
        tokenizer,
        mix,
        steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        max_length=cfg["max_length"],
        seed=cfg["seed"],
        desc="aligned SFT",
    )
    merged = peft_model.merge_and_unload()
    tmp = target.with_suffix(".tmp")
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {
        "settings": cfg,
        "num_refusals": len(refusals),
        "num_helpful": len(helpful),
        "train": log,
        "seconds": round(time.perf_counter() - start, 1),
        "note": "even-id XSTest safe prompts trained on (helpful); odd ids are the over-refusal evaluation set",
    }
    (tmp / "aligned_meta.json").write_text(json.dumps(meta, indent=2))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return meta


def load_aligned(settings: dict | None = None):
    """``(model, tokenizer, meta)`` of the cached aligned start, built first when missing."""
    if not (ALIGNED_DIR / "config.json").is_file():
        build_aligned(settings)
    model, tokenizer = load_model(ALIGNED_DIR)
    meta = json.loads((ALIGNED_DIR / "aligned_meta.json").read_text())
    return model, tokenizer, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out-dir", type=Path, default=ALIGNED_DIR, help="where to save (run.py reads the default)")
    parser.add_argument("--eval", type=int, default=30, help="prompts per safety evaluation after building")
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in DEFAULTS}
    threads = args.threads or (1 if os.getloadavg()[0] > (os.cpu_count() or 1) else 2)
    torch.set_num_threads(threads)
    meta = build_aligned(settings, args.out_dir)
    print(json.dumps(meta, indent=2))
    if args.eval:
        from peft_safety.evaluation import harmful_score, over_refusal_rate

        model, tokenizer = load_model(args.out_dir)
        kw = {"max_new_tokens": 16, "batch_size": 30}
        hs = harmful_score(model, tokenizer, data.harmful_eval_prompts(args.eval), **kw)
        orr = over_refusal_rate(model, tokenizer, data.xstest_safe_eval(args.eval), **kw)
        print(f"aligned start: harmful {hs.score:.2f}  over-refusal {orr.score:.2f}")
        for rec in orr.records[:6] + hs.records[:4]:
            print(" ", repr(rec["prompt"][:60]), "->", repr(rec["response"][:80]))


if __name__ == "__main__":
    main()
