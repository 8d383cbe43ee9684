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
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from benchmarks.testbed import data
from benchmarks.testbed.aligned import load_aligned
from benchmarks.testbed.model import CACHE_DIR
from benchmarks.testbed.run import QUICK, _mixes, eval_sets, evaluate, lora_config, somf_data
from benchmarks.testbed.train import sft
from peft_safety.somf import SOMFConfig

ADAPTER_DIRS = {"sst2": CACHE_DIR / "quick_lora_sst2", "agnews": CACHE_DIR / "quick_lora_agnews"}


def poisoned_adapters(cfg: dict, names: list[str]):
    """The quick run's plain-LoRA adapters (SST-2, and AG News for merges) on the aligned start, each trained once on
    its poisoned mix and then loaded from the cache."""
    model, tok, _ = load_aligned()
    _, sst2_mix, agnews_mix = _mixes(cfg, cfg["p"][0])
    mixes = {"sst2": sst2_mix, "agnews": agnews_mix}
    train_kw = {k: cfg[k] for k in ("steps", "batch_size", "lr", "max_length")}
    peft_model = None
    for name in names:
        folder = ADAPTER_DIRS[name]
        if (folder / "adapter_config.json").is_file():
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, folder, adapter_name=name)
            else:
                peft_model.load_adapter(folder, adapter_name=name)
            continue
        if peft_model is None:
            peft_model = get_peft_model(model, lora_config(cfg), adapter_name=name)
        else:
            peft_model.add_adapter(name, lora_config(cfg))
        peft_model.set_adapter(name)
        sft(peft_model, tok, mixes[name], desc=f"quick lora {name}", **train_kw)
        peft_model.save_pretrained(folder.parent / "tmp_adapters", selected_adapters=[name])
        (folder.parent / "tmp_adapters" / name).rename(folder)
    return peft_model, tok


def empty_fraction(result) -> float:
    return sum(not record["response"].strip() for record in result.records) / len(result.records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--final-masks", nargs="+", default=["expected", "budget"])
    parser.add_argument("--steps", type=int, nargs="+", default=[30])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[0.25])
    parser.add_argument("--rpo-alphas", type=float, nargs="+", default=[0.0])
    parser.add_argument("--merge", action="store_true", help="the two-adapter merge (SST-2 + AG News, cat)")
    parser.add_argument("--pairs", type=int, default=QUICK["somf_pairs"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "somf_sweep.json")
    parser.add_argument("--skip-lora", action="store_true", help="do not evaluate the unrealigned adapter again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = {**QUICK, "somf_pairs": args.pairs}
    sets = eval_sets(cfg)
    retain = [
        {"prompt": r["prompt"], "completion": r["response"]}
        for r in data.sst2_train(cfg["n"] + cfg["retain"])[cfg["n"] :]
    ]
    adapters = ["sst2", "agnews"] if args.merge else ["sst2"]
    if args.merge:
        retain = retain[: cfg["retain"] // 2] + [
            {"prompt": r["prompt"], "completion": r["response"]}
            for r in data.agnews_train(cfg["n"] + cfg["retain"] // 2)[cfg["n"] :]
        ]
    peft_model, tok = poisoned_adapters(cfg, adapters)
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
    grid = itertools.product(args.steps, args.learning_rates, args.rpo_alphas, args.budgets, args.final_masks)
    for steps, learning_rate, rpo_alpha, budget, final in grid:
        config = SOMFConfig(
            max_steps=steps,
            learning_rate=learning_rate,
            rpo_alpha=rpo_alpha,
            revert_budget=budget,
            final_mask=final,
            max_length=cfg["max_length"],
            eval_batches=1,
            progress_bar=False,
            seed=0,
        )
        start = time.perf_counter()
        name = f"somf steps={steps} lr={learning_rate:g} rpo={rpo_alpha:g} budget={budget:g} final={final}"
        masks = peft_model.merge_with_safety_mask(
            adapters=adapters,
            weights=[1.0] * len(adapters),
            adapter_name="realigned",
            safety_data=somf_data(cfg, 0),
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
