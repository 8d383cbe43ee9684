"""GuardSpace initial factor scales on the testbed (``bounded``, ``paper``, ``balanced``), evaluated in fp32 and bf16.

Each variant is ``factor_scale:learning_rate``; the null-space threshold is the package default. The recorded results
(``results/guardspace_balance.json``) predate ``bounded`` and ``"auto"``: they compare the paper's and balanced factors
at the then-default threshold 1e-6.

Each variant trains like the quick run's ``guardspace`` row (same data, steps, statistics; learning rate per
variant) and is evaluated twice: in float32 and under bf16 autocast (as most GPU deployments run), against the
aligned start evaluated the same way.

    python -m benchmarks.testbed.guardspace_balance --variants paper:5e-4 balanced:5e-4 balanced:5e-3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import get_peft_model

from benchmarks.testbed.run import (
    QUICK,
    _mixes,
    eval_sets,
    evaluate,
    guardspace_config,
    load_start,
    statistics_for,
    train_settings,
)
from benchmarks.testbed.train import sft


def evaluations(model, tok, cfg, sets) -> dict:
    """Scores in float32 and under bf16 autocast."""
    model.eval()
    out = {}
    for precision, context in (("fp32", contextlib.nullcontext()), ("bf16", torch.autocast("cpu", torch.bfloat16))):
        with context:
            out[precision] = {k: round(v.score, 3) for k, v in evaluate(model, tok, cfg, sets).items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["paper:5e-4", "balanced:5e-4", "balanced:5e-3"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "guardspace_balance.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dict(QUICK)
    sets = eval_sets(cfg)
    _, sst2_mix, _ = _mixes(cfg, cfg["p"][0])
    model, tok, _ = load_start()
    stats = statistics_for(model, tok, cfg["calibration"])
    rows = {"aligned": evaluations(model, tok, cfg, sets)}
    print("aligned", rows["aligned"], flush=True)
    del model
    for variant in args.variants:
        kind, lr = variant.split(":")
        torch.manual_seed(0)
        model, tok, _ = load_start()
        peft_model = get_peft_model(model, guardspace_config(cfg, stats, factor_scale=kind))
        train_kw = {**train_settings(cfg), "lr": float(lr)}
        log = sft(peft_model, tok, sst2_mix, desc=f"guardspace {variant}", **train_kw)
        rows[variant] = {**evaluations(peft_model, tok, cfg, sets), "last_loss": round(log["last_loss"], 3)}
        print(variant, rows[variant], flush=True)
        args.out.write_text(
            json.dumps(
                {
                    "command": "python -m benchmarks.testbed.guardspace_balance " + " ".join(sys.argv[1:]),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "settings": cfg,
                    "rows": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
