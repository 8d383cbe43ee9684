"""The leakage certificate of the testbed's GuardSpace adapter, on the calibration prompts and on held-out ones.

    python -m benchmarks.testbed.leakage --p 0.2 --calibration 128 300 --threads 1 \
        --out benchmarks/testbed/results/leakage_quick.json

For each calibration size, the quick run's GuardSpace adapter (``run.py``: same data mix, seed, steps and package
defaults unless ``--factor-scale`` / ``--threshold`` say otherwise) is trained again, then
``guardspace_report(model, heldout_statistics=...)`` is taken with statistics of the start model on held-out harmful
prompts: I-MaliciousInstructions (the harmful evaluation set, never in the calibration rows, which are AdvBench),
chat template. Per layer: null dimension, leaking dimensions (0 where the exact null space is used), calibration
leakage ``tr(dW C dW^T) / tr(W C W^T)`` and the same ratio on the held-out second moment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import get_peft_model

import peft_safety
from benchmarks.testbed import data, run
from benchmarks.testbed.train import sft
from peft_safety import GuardSpaceReport, guardspace_report

HELDOUT = 100  # I-MaliciousInstructions prompts (the whole set)


def heldout_statistics(model, tokenizer, count: int = HELDOUT):
    """Statistics of ``model`` on ``count`` held-out harmful prompts (I-MaliciousInstructions, chat template)."""
    return run.testbed_statistics(model, tokenizer, data.harmful_eval_prompts(count))


def rule(layer, r: int) -> str:
    """``"exact"`` when the layer uses the exact null space (no leaking direction, at least ``r`` directions), else
    ``"1e-6"`` (the relative-threshold fallback of ``"auto"``, or an explicit threshold)."""
    return "exact" if layer.leaking_dims == 0 and layer.null_dim >= r else "threshold"


def summarize(report: GuardSpaceReport, r: int, top: int = 5) -> dict:
    """The figures the docs quote: totals, largest layers, rule counts, dead layers, held-out ratios."""
    layers = list(report.layers)
    largest = sorted(layers, key=lambda layer: layer.leakage, reverse=True)[:top]
    exact = [layer for layer in layers if rule(layer, r) == "exact"]
    fallback = [layer for layer in layers if rule(layer, r) != "exact"]
    out = {
        "total_leakage": report.total_leakage,
        "max_leakage": report.max_leakage,
        "largest": [
            {"name": x.name, "leakage": x.leakage, "null_dim": x.null_dim, "leaking_dims": x.leaking_dims}
            for x in largest
        ],
        "layers": len(layers),
        "exact_layers": len(exact),
        "threshold_layers": len(fallback),
        "exact_null_dim_median": statistics.median([x.null_dim for x in exact]) if exact else None,
        "threshold_null_dim_median": statistics.median([x.null_dim for x in fallback]) if fallback else None,
        "threshold_leaking_dims_median": statistics.median([x.leaking_dims for x in fallback]) if fallback else None,
        "dead_layers": report.dead_layers,
    }
    if report.max_heldout_leakage is not None:
        held = [x.heldout_leakage for x in layers]
        # the calibration leakage of an exact layer is 0: its ratio is only defined on the threshold layers
        ratios = [x.heldout_leakage / x.leakage for x in fallback if x.leakage > 0]
        out["heldout"] = {
            "median": statistics.median(held),
            "max": max(held),
            "largest": [
                {"name": x.name, "heldout_leakage": x.heldout_leakage, "leakage": x.leakage}
                for x in sorted(layers, key=lambda x: x.heldout_leakage, reverse=True)[:top]
            ],
            "exact_layers_median": statistics.median([x.heldout_leakage for x in exact]) if exact else None,
            "threshold_layers_median": statistics.median([x.heldout_leakage for x in fallback]) if fallback else None,
            "ratio_median_threshold_layers": statistics.median(ratios) if ratios else None,
            "first_block": [
                {
                    "name": x.name,
                    "null_dim": x.null_dim,
                    "leaking_dims": x.leaking_dims,
                    "leakage": x.leakage,
                    "heldout_leakage": x.heldout_leakage,
                }
                for x in layers
                if ".layers.0." in f".{x.name}"
            ],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, default=0.2, help="poison fraction of the training mix")
    parser.add_argument("--calibration", type=int, nargs="+", default=[run.QUICK["calibration"]])
    parser.add_argument("--factor-scale", default=None, help="GuardSpace factor_scale (default: the package's)")
    parser.add_argument("--threshold", type=run._threshold, default=None, help="null_space_threshold")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the quick run's)")
    parser.add_argument("--evaluate", action="store_true", help="also the quick run's harmful / XSTest / SST-2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = dict(run.QUICK)
    if args.lr is not None:
        cfg["lr"] = args.lr
    options = {}
    if args.factor_scale:
        options["factor_scale"] = args.factor_scale
    if args.threshold is not None:
        options["null_space_threshold"] = args.threshold
    _, sst2_mix, _ = run._mixes(cfg, args.p)
    calib = set(data.calibration_prompts(max(args.calibration)))
    assert not (calib & set(data.harmful_eval_prompts(HELDOUT))), "held-out prompts overlap calibration"

    out = {
        "command": "python -m benchmarks.testbed.leakage " + " ".join(__import__("sys").argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "peft_safety": peft_safety.__version__},
        "settings": {**run.train_settings(cfg), "n": cfg["n"], "p": args.p, "r": cfg["r"], "options": options},
        "heldout": f"I-MaliciousInstructions, {HELDOUT} prompts, chat template, statistics of the start model",
        "runs": {},
    }
    t0 = time.perf_counter()
    model, tok, _ = run.load_start()
    held = heldout_statistics(model, tok)
    out["seconds_heldout_statistics"] = round(time.perf_counter() - t0, 1)
    reference = run.calibration_logits(model, tok)
    del model
    for count in args.calibration:
        t0 = time.perf_counter()
        base, tok, _ = run.load_start()
        stats = run.statistics_for(base, tok, count)
        gs = get_peft_model(base, run.guardspace_config(cfg, stats, **options))
        train = sft(gs, tok, sst2_mix, desc=f"guardspace cal={count}", **run.train_settings(cfg))
        report = guardspace_report(gs, heldout_statistics=held)
        entry = {
            "calibration_prompts": count,
            "train": train,
            "calibration_drift": run.calibration_drift(gs, tok, reference),
            "summary": summarize(report, cfg["r"]),
            "report": report.to_dict(),
        }
        if args.evaluate:
            entry["metrics"] = {
                k: v.score for k, v in run.evaluate(gs, tok, cfg, run.eval_sets(cfg)).items() if hasattr(v, "score")
            }
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        out["runs"][str(count)] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
        print(str(report).splitlines()[0])
        print(json.dumps({k: v for k, v in entry.items() if k not in ("report",)}, indent=1)[:3000], flush=True)
        del gs, base


if __name__ == "__main__":
    main()
