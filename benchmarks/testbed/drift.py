"""Calibration-logit drift along training, fp32 and cast to bf16: plain LoRA and GuardSpace (two settings).

    python -m benchmarks.testbed.drift --p 0.2 --checkpoints 0 4 8 16 32 64 --threads 1 \
        --out benchmarks/testbed/results/drift_quick.json --plot docs/results_drift.png

Each method trains once for ``max(checkpoints)`` steps on the quick run's poisoned SST-2 mix (``run.py``: same
data, seed, batch size, learning rate and cosine schedule, the schedule spanning the whole run) and is measured at
each checkpoint: ``||logits - reference|| / ||reference||`` on the first 32 calibration prompts (``run.py``'s
``calibration_logits``), with the start model's logits as the reference, in fp32 and with a copy of the trained
model cast to bf16 (``model.to(torch.bfloat16)``) against the start model in bf16. The measurement does not
change the training run (no parameter or random state is touched).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import get_peft_model

import peft_safety
from benchmarks.testbed import data, run
from benchmarks.testbed.train import sft
from peft_safety import guardspace_report

METHODS = {
    "lora": None,
    "guardspace (defaults)": {},
    "guardspace (bounded everywhere)": {"factor_scale": "bounded"},
    "guardspace (paper, τ 1e-6)": {"factor_scale": "paper", "null_space_threshold": 1e-6},
}


def relative(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).norm() / reference.norm())


@torch.no_grad()
def measure(model, tokenizer, ref32: torch.Tensor, ref16: torch.Tensor) -> dict:
    """fp32 drift of ``model`` and bf16 drift of a bf16 copy of it."""
    fp32 = relative(run.calibration_logits(model, tokenizer), ref32)
    cast = copy.deepcopy(model).to(torch.bfloat16)
    bf16 = relative(run.calibration_logits(cast, tokenizer), ref16)
    del cast
    return {"fp32": fp32, "bf16": bf16}


def safety_point(model, tokenizer, cfg) -> dict:
    """Harmful score on the quick evaluation set and, for GuardSpace, the total leakage certificate."""
    from peft_safety.evaluation import harmful_score

    result = harmful_score(
        model,
        tokenizer,
        data.harmful_eval_prompts(cfg["eval_harmful"]),
        max_new_tokens=cfg["max_new_tokens"],
        batch_size=cfg["gen_batch"],
        show_progress=False,
    )
    point = {"harmful": result.score}
    if any(hasattr(module, "lora_guard") for module in model.modules()):
        point["certificate"] = guardspace_report(model).total_leakage
    return point


def trace(method: str, options: dict | None, cfg, mix, checkpoints: list[int], refs, evaluate: bool = False) -> dict:
    """Train ``method`` for ``max(checkpoints)`` steps, measuring the drift (and, with ``evaluate``, the harmful
    score and the certificate) at each checkpoint."""
    base, tok, _ = run.load_start()
    if options is None:
        torch.manual_seed(0)  # as run.train_task: the LoRA init draws from the global generator
        model = get_peft_model(base, run.lora_config(cfg))
    else:
        stats = run.statistics_for(base, tok, cfg["calibration"])
        model = get_peft_model(base, run.guardspace_config(cfg, stats, **options))
    points = {}

    def on_step(step: int) -> None:
        if step in checkpoints:
            points[step] = measure(model, tok, *refs)
            if evaluate:
                points[step].update(safety_point(model, tok, cfg))
            print(f"  {method} step {step}: {points[step]}", flush=True)

    on_step(0)
    settings = {**run.train_settings(cfg), "steps": max(checkpoints)}
    log = sft(model, tok, mix, desc=method, on_step=on_step, **settings)
    return {"options": options, "train": log, "drift": {str(k): v for k, v in sorted(points.items())}}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-5  # exact zeros (the start model itself) are drawn here, hollow
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, precision in zip(axes, ("fp32", "bf16"), strict=True):
        for method, entry in result["methods"].items():
            steps = [int(s) for s in entry["drift"]]
            values = [v[precision] for v in entry["drift"].values()]
            (line,) = ax.plot(steps, [max(v, floor) for v in values], marker="o", label=method)
            zeros = [s for s, v in zip(steps, values, strict=True) if v == 0]
            ax.plot(zeros, [floor] * len(zeros), "o", mfc="white", color=line.get_color())
        ax.set_yscale("log")
        ax.set_xscale("symlog", linthresh=4, linscale=0.5)
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps])
        ax.set_xlabel("training steps (hollow: exactly 0, drawn at 1e-5)")
        ax.set_title(f"{precision}" + (" (trained model cast, vs start model in bf16)" if precision == "bf16" else ""))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("calibration-logit drift (relative)")
    axes[0].legend()
    fig.suptitle(f"SmolLM2-135M testbed: drift on 32 calibration prompts, p = {result['p']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, default=0.2)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[0, 4, 8, 16, 32, 64])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, help="training examples (default: the quick run's)")
    parser.add_argument("--evaluate", action="store_true", help="also harmful score and certificate at checkpoints")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", default=None, help="PNG path")
    parser.add_argument("--plot-only", action="store_true", help="only redraw --plot from the JSON in --out")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.plot)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = dict(run.QUICK)
    if args.n:
        cfg["n"] = args.n
    _, mix, _ = run._mixes(cfg, args.p)
    start, tok, _ = run.load_start()
    ref32 = run.calibration_logits(start, tok)
    ref16 = run.calibration_logits(start.to(torch.bfloat16), tok)
    del start
    result = {
        "command": "python -m benchmarks.testbed.drift " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "peft_safety": peft_safety.__version__},
        "p": args.p,
        "settings": {**run.train_settings(cfg), "steps": max(args.checkpoints), "n": cfg["n"], "r": cfg["r"]},
        "calibration_prompts_measured": run.DRIFT_PROMPTS,
        "methods": {},
    }
    if args.out.is_file():  # add to an earlier run (e.g. one method at a time)
        result["methods"] = json.loads(args.out.read_text())["methods"]
    for method in args.methods:
        t0 = time.perf_counter()
        result["methods"][method] = trace(
            method, METHODS[method], cfg, mix, args.checkpoints, (ref32, ref16), args.evaluate
        )
        result["methods"][method]["seconds"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)
    print(json.dumps({m: e["drift"] for m, e in result["methods"].items()}, indent=1))


if __name__ == "__main__":
    main()
