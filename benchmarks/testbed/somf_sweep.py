"""SOMF settings on the testbed: which revert budget, final mask and step count realign a poisoned adapter.

The plain-LoRA SST-2 adapter of the quick run (same data, seed and steps as ``run.py --quick``; cached after the
first run) is realigned with ``merge_with_safety_mask`` under each setting; every row is evaluated like the quick
run (harmful score, over-refusal, SST-2) and also counts the *empty* answers to harmful prompts, which the keyword
judge scores as refusals (a mask that learns to stop answering is not a safe model).

    python -m benchmarks.testbed.somf_sweep --budgets 0.3 --final-masks expected budget --steps 30 \
        --learning-rates 0.05 0.25
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.testbed.aligned import ALIGNED_DIR, load_aligned
from benchmarks.testbed.model import CACHE_DIR
from benchmarks.testbed.run import (
    QUICK,
    empty_fraction,
    eval_sets,
    evaluate,
    load_adapters,
    retain_rows,
    somf_data,
    train_task,
)
from peft_safety.somf import SOMFConfig

ADAPTER_DIR = CACHE_DIR / "quick_adapters"


def poisoned_adapters(cfg: dict, names: list[str], threads: int):
    """The quick run's plain-LoRA adapters (SST-2, and AG News for merges) on the aligned start, trained once by
    ``run.train_task`` (same data, seeds and steps as the quick run; float results differ when the thread count
    does), then loaded from the cache (retrained when the aligned start is newer)."""
    load_aligned()  # built first when missing
    for name in names:
        folder = ADAPTER_DIR / name
        if folder.is_dir() and folder.stat().st_mtime < (ALIGNED_DIR / "config.json").stat().st_mtime:
            shutil.rmtree(folder)  # trained on an earlier aligned start
        if not (folder / "adapter_config.json").is_file():
            ADAPTER_DIR.mkdir(parents=True, exist_ok=True)
            train_task(cfg, cfg["p"][0], name, ADAPTER_DIR, "quick", threads=threads)
    return load_adapters(ADAPTER_DIR, names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3])
    parser.add_argument("--final-masks", nargs="+", default=["expected"])
    parser.add_argument("--steps", type=int, nargs="+", default=[30])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[0.25])
    parser.add_argument("--rpo-alphas", type=float, nargs="+", default=[0.3])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4], help="safety pairs per mask step")
    parser.add_argument("--merge", action="store_true", help="the two-adapter merge (SST-2 + AG News, cat)")
    parser.add_argument("--pairs", type=int, default=QUICK["somf_pairs"], help="AdvBench safety pairs")
    parser.add_argument("--hate-pairs", type=int, default=QUICK["somf_hate_pairs"], help="I-CoNa safety pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "somf_sweep.json")
    parser.add_argument("--skip-lora", action="store_true", help="do not evaluate the unrealigned adapter again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = {**QUICK, "somf_pairs": args.pairs, "somf_hate_pairs": args.hate_pairs}
    sets = eval_sets(cfg)
    adapters = ["sst2", "agnews"] if args.merge else ["sst2"]
    retain = retain_rows(cfg, adapters)
    peft_model, tok = poisoned_adapters(cfg, adapters, args.threads)
    rows = []

    def record(name: str, metrics: dict, info: dict) -> None:
        row = {k: round(v.score, 3) for k, v in metrics.items()}
        row["empty_harmful"] = round(empty_fraction(metrics["harmful"]), 3)
        row["empty_over_refusal"] = round(empty_fraction(metrics["over_refusal"]), 3)
        rows.append({"name": name, **row, **info})
        print(f"== {name}: {row} {info}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "command": "python -m benchmarks.testbed.somf_sweep " + " ".join(sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": cfg,
        }
        args.out.write_text(json.dumps({**header, "rows": rows}, indent=2))

    if args.merge:
        peft_model.add_weighted_adapter(adapters, [1.0, 1.0], "unmasked", combination_type="cat")
    peft_model.set_adapter("unmasked" if args.merge else "sst2")
    if not args.skip_lora:
        record(
            "task arithmetic" if args.merge else "lora", evaluate(peft_model, tok, cfg, sets, agnews=args.merge), {}
        )
    grid = itertools.product(
        args.steps, args.learning_rates, args.rpo_alphas, args.batch_sizes, args.budgets, args.final_masks
    )
    for steps, learning_rate, rpo_alpha, batch_size, budget, final in grid:
        config = SOMFConfig(
            max_steps=steps,
            learning_rate=learning_rate,
            rpo_alpha=rpo_alpha,
            batch_size=batch_size,
            revert_budget=budget,
            final_mask=final,
            max_length=cfg["max_length"],
            eval_batches=1,
            progress_bar=False,
            seed=0,
        )
        start = time.perf_counter()
        name = (
            f"somf steps={steps} lr={learning_rate:g} rpo={rpo_alpha:g} batch={batch_size} budget={budget:g} "
            f"final={final}"
        )
        masks = peft_model.merge_with_safety_mask(
            adapters=adapters,
            weights=[1.0] * len(adapters),
            adapter_name="realigned",
            safety_data=somf_data(cfg),
            tokenizer=tok,
            combination_type="cat" if args.merge else "linear",
            config=config,
            retain_data=retain,
        )
        seconds = time.perf_counter() - start
        peft_model.set_adapter("realigned")
        history = masks.history
        info = {
            "kept": round(masks.kept_fraction()["per_adapter"]["sst2"], 3),
            "dpo_loss": [round(history[f"safety_loss_{k}"], 3) for k in ("before", "relaxed", "deployed")],
            "somf_s": round(seconds, 1),
        }
        record(name, evaluate(peft_model, tok, cfg, sets, agnews=args.merge), info)
        peft_model.set_adapter(adapters[0])
        peft_model.delete_adapter("realigned")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
