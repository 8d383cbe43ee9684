"""GuardSpace benchmarks: init time vs PEFT's CorDA, training step vs LoRA, persistent memory vs LoRA.

Run from the repository root::

    python benchmarks/bench_guardspace.py            # full: Llama shape 1024/2816, 4 layers, 128 prompts
    python benchmarks/bench_guardspace.py --quick    # smoke run, < 1 minute

All figures come from one run and are printed as ratios against a peer measured in the same process, so that a
noisy shared machine affects both sides alike. See ``docs/benchmarks.md`` for recorded figures.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import sys
import tempfile
import warnings
from collections import Counter
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (benchmarks/ is not a package)
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402

import peft_safety  # noqa: E402,F401  (registers GuardSpace with PEFT)
from peft_safety import GuardSpaceConfig, collect_safety_statistics  # noqa: E402
from peft_safety.guardspace.layer import GuardSpaceLinear  # noqa: E402

TARGETS = common.LLAMA_TARGETS
INIT_TARGET = 0.5
STEP_TARGET = 1.15


def _log(message: str) -> None:
    """Progress on stderr, so that a long run shows its partial figures."""
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller run (2 layers, 32 prompts, 3 repeats)")
    parser.add_argument("--r", type=int, default=8, help="adapter rank (lora_alpha = 2r)")
    parser.add_argument("--prompts", type=int, default=None, help="number of harmful prompts (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--advbench", default=None, help=f"AdvBench CSV (default ${common.ADVBENCH_ENV} or shared)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 1024)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP size (default 2816)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 16)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 4096)")
    parser.add_argument("--batch", type=int, default=4, help="training batch size")
    parser.add_argument("--seq", type=int, default=128, help="training sequence length")
    parser.add_argument("--stats-batch", type=int, default=8, help="batch size of collect_safety_statistics")
    parser.add_argument("--init-repeats", type=int, default=None, help="interleaved init runs per method (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per method")
    parser.add_argument("--repeats", type=int, default=None, help="timed, interleaved training steps (default 9)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default min(2, available))")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "prompts": 32 if quick else 128,
        "layers": 2 if quick else 4,
        "hidden": 1024,
        "intermediate": 2816,
        "heads": 16,
        "vocab": 4096,
        "init_repeats": 1 if quick else 2,
        "repeats": 3 if quick else 9,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# --------------------------------------------------------------------------------------------------------------
# 1. statistics + init: GuardSpace vs CorDA (kpm)


def guardspace_init(model, tokenizer, prompts, args) -> tuple[dict[str, float], Any]:
    collect_s, stats = common.timed(
        lambda: collect_safety_statistics(
            model, tokenizer, prompts, TARGETS, batch_size=args.stats_batch, max_length=256, show_progress=False
        )
    )
    config = GuardSpaceConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, safety_statistics=stats)
    init_s, peft_model = common.timed(lambda: get_peft_model(model, config))
    return {"collect": collect_s, "init": init_s, "total": collect_s + init_s}, peft_model


def corda_init(model, tokenizer, prompts, args) -> tuple[dict[str, float], Any]:
    config = LoraConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method="kpm"),
    )
    collect = {}

    def run_model() -> None:  # CorDA's hooks take one sequence at a time (they squeeze the batch dimension)
        def forward_all():
            for text in prompts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
                model(input_ids=ids)

        collect["s"], _ = common.timed(forward_all)

    preprocess_s, _ = common.timed(lambda: preprocess_corda(model, config, run_model=run_model))
    init_s, peft_model = common.timed(lambda: get_peft_model(model, config))
    # "collect" = forward passes with hooks; "init" = damping, inverses and SVDs of preprocess + get_peft_model
    return {
        "collect": collect["s"],
        "init": preprocess_s - collect["s"] + init_s,
        "total": preprocess_s + init_s,
    }, peft_model


def warm_up_init(tokenizer, prompts, args) -> None:
    """Run both methods once, untimed, on a tiny model: first calls pay one-off costs (imports, LAPACK set-up)."""
    shape = common.ModelShape(
        hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=4, vocab_size=args.vocab
    )
    for fn in (guardspace_init, corda_init):
        with torch.no_grad():
            fn(common.build_model(shape, args.seed), tokenizer, prompts[:4], args)


def measure_init(base, shape, tokenizer, prompts, args) -> dict[str, Any]:
    warm_up_init(tokenizer, prompts, args)
    runs: dict[str, list[dict[str, float]]] = {"guardspace": [], "corda": []}
    peak: dict[str, list[int]] = {"guardspace": [], "corda": []}
    kept = None
    for repeat in range(args.init_repeats):
        order = ["guardspace", "corda"] if repeat % 2 == 0 else ["corda", "guardspace"]
        for method in order:
            model = common.fresh_copy(base, shape, args.seed)
            gc.collect()
            before = common.rss_bytes()
            tracked = common.reset_peak_rss()
            fn = guardspace_init if method == "guardspace" else corda_init
            with torch.no_grad():
                times, peft_model = fn(model, tokenizer, prompts, args)
            if tracked and before is not None:
                peak[method].append(common.peak_rss_bytes() - before)
            runs[method].append(times)
            _log(f"init {method} (repeat {repeat + 1}): " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
            if method == "guardspace" and kept is None:
                kept = peft_model  # reused for the training and memory measurements
            del model, peft_model
            gc.collect()

    def summary(method: str) -> dict[str, float]:
        return {key: common.median([run[key] for run in runs[method]]) for key in ("collect", "init", "total")}

    ratios = [g["total"] / c["total"] for g, c in zip(runs["guardspace"], runs["corda"], strict=True)]
    return {
        "guardspace": summary("guardspace"),
        "corda": summary("corda"),
        "ratio": common.median([g["total"] for g in runs["guardspace"]])
        / common.median([c["total"] for c in runs["corda"]]),
        "paired_ratios": ratios,
        "peak_rss": {key: max(values) if values else None for key, values in peak.items()},
        "guardspace_model": kept,
    }


# --------------------------------------------------------------------------------------------------------------
# 2. training step: GuardSpace vs plain LoRA


def make_step(peft_model, batch: torch.Tensor):
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    peft_model.train()

    def step() -> float:
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def measure_step(guard_model, lora_model, args, vocab: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(4, vocab, (args.batch, args.seq), generator=generator)
    steps = {"guardspace": make_step(guard_model, batch), "lora": make_step(lora_model, batch)}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {"guardspace": [], "lora": []}
    for repeat in range(args.repeats):
        order = ["guardspace", "lora"] if repeat % 2 == 0 else ["lora", "guardspace"]
        for name in order:
            seconds, _ = common.timed(steps[name])
            times[name].append(seconds)
            _log(f"step {name} (repeat {repeat + 1}): {1e3 * seconds:.1f} ms")
    guard, lora = common.median(times["guardspace"]), common.median(times["lora"])
    paired = [g / b for g, b in zip(times["guardspace"], times["lora"], strict=True)]
    return {"guardspace": guard, "lora": lora, "ratio": guard / lora, "paired_ratio": common.median(paired)}


# --------------------------------------------------------------------------------------------------------------
# 3. persistent memory of the adapters


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def adapter_memory(peft_model) -> dict[str, Any]:
    """Bytes of the tensors an adapter adds (params + buffers under ``lora_*``), shared storage counted once."""
    params = [p for name, p in peft_model.named_parameters() if ".lora_" in name]
    buffers = [b for name, b in peft_model.named_buffers(remove_duplicate=False) if ".lora_" in name]
    buffer_shapes: Counter = Counter()
    seen = set()
    square = []
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, GuardSpaceLinear):
            continue
        for state in module.lora_guard.values():
            for buffer_name, buffer in state.named_buffers():
                key = (buffer.untyped_storage().data_ptr(), tuple(buffer.shape))
                if key not in seen:
                    seen.add(key)
                    buffer_shapes[(buffer_name, tuple(buffer.shape))] += 1
                if buffer.dim() == 2 and buffer.shape[0] == buffer.shape[1] == module.in_features:
                    square.append(f"{module_name}.{buffer_name}")
    return {
        "param_bytes": _unique_bytes(params),
        "buffer_bytes": _unique_bytes(buffers),
        "buffer_bytes_unshared": sum(b.numel() * b.element_size() for b in buffers),
        "total": _unique_bytes(params) + _unique_bytes(buffers),
        "largest_buffers": sorted(buffer_shapes.items(), key=lambda item: -_numel(item[0][1]))[:6],
        "square_buffers": square,
    }


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out


def reloaded_memory(guard_model, base, shape, args) -> dict[str, Any]:
    """Adapter bytes after ``save_pretrained`` + ``PeftModel.from_pretrained`` on a fresh base, and file size."""
    with tempfile.TemporaryDirectory() as folder:
        guard_model.save_pretrained(folder)
        size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
        loaded = PeftModel.from_pretrained(common.fresh_copy(base, shape, args.seed), folder)
        memory = adapter_memory(loaded)
    memory["file_bytes"] = size
    return memory


def null_dims(guard_model) -> dict[str, list[int]]:
    dims: dict[str, list[int]] = {}
    for name, module in guard_model.named_modules():
        if isinstance(module, GuardSpaceLinear):
            for state in module.lora_guard.values():
                dims.setdefault(name.rsplit(".", 1)[-1], []).append(state.null_dim)
    return dims


# --------------------------------------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    argv = args.argv or []
    shape = common.ModelShape(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        vocab_size=args.vocab,
        max_positions=max(512, args.seq),
    )
    prompts, source = common.load_harmful_prompts(args.prompts, args.advbench)
    tokenizer = common.build_tokenizer(prompts, args.vocab)
    num_tokens = sum(len(tokenizer(text)["input_ids"]) for text in prompts)
    base = common.build_model(shape, args.seed)

    init = measure_init(base, shape, tokenizer, prompts, args)
    guard_model = init.pop("guardspace_model")
    lora_model = get_peft_model(
        common.fresh_copy(base, shape, args.seed),
        LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, lora_dropout=0.0),
    )
    guard_memory = adapter_memory(guard_model)
    lora_memory = adapter_memory(lora_model)
    reloaded = reloaded_memory(guard_model, base, shape, args)
    dims = null_dims(guard_model)
    step = measure_step(guard_model, lora_model, args, shape.vocab_size)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": common.machine_description(),
        "command": " ".join(["python benchmarks/bench_guardspace.py", *(sys.argv[1:] if args.argv is None else argv)]),
        "settings": {
            "shape": shape,
            "r": args.r,
            "prompts": len(prompts),
            "prompt_tokens": num_tokens,
            "prompt_source": source,
            "batch": args.batch,
            "seq": args.seq,
            "init_repeats": args.init_repeats,
            "repeats": args.repeats,
        },
        "init": init,
        "step": step,
        "memory": {"guardspace": guard_memory, "lora": lora_memory, "reloaded": reloaded},
        "null_dims": dims,
    }


def _verdict(ratio: float, target: float) -> str:
    return "yes" if ratio <= target else "**no**"


def format_report(results: dict[str, Any]) -> str:
    settings, init, step, memory = results["settings"], results["init"], results["step"], results["memory"]
    shape = settings["shape"]
    gs, cd = init["guardspace"], init["corda"]
    gm, lm, rm = memory["guardspace"], memory["lora"], memory["reloaded"]
    mib = common.human_bytes
    peak = init["peak_rss"]
    lines = [
        f"GuardSpace benchmark, {results['date']}",
        f"machine: {results['machine']}",
        f"command: {results['command']}",
        f"model: Llama hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, {shape.num_layers} layers, "
        f"{shape.num_heads} heads, vocab {shape.vocab_size}, random weights, fp32; targets {','.join(TARGETS)}; "
        f"r {settings['r']}, alpha {2 * settings['r']}",
        f"prompts: {settings['prompts']} ({settings['prompt_tokens']} tokens incl. BOS) from "
        f"{settings['prompt_source']}; training batch {settings['batch']} x {settings['seq']} tokens",
        "",
        "| measure | GuardSpace | reference | ratio | target | met |",
        "|---|---|---|---|---|---|",
        f"| statistics + init (s), vs CorDA kpm | {gs['total']:.2f} | {cd['total']:.2f} | {init['ratio']:.3f} | "
        f"<= {INIT_TARGET} | {_verdict(init['ratio'], INIT_TARGET)} |",
        f"| - collection forward passes (s) | {gs['collect']:.2f} | {cd['collect']:.2f} | "
        f"{gs['collect'] / cd['collect']:.3f} | | |",
        f"| - decompositions + injection (s) | {gs['init']:.2f} | {cd['init']:.2f} | "
        f"{gs['init'] / cd['init']:.3f} | | |",
        f"| training step fwd+bwd+AdamW (ms), vs LoRA | {1e3 * step['guardspace']:.1f} | {1e3 * step['lora']:.1f} | "
        f"{step['ratio']:.3f} | <= {STEP_TARGET} | {_verdict(step['ratio'], STEP_TARGET)} |",
        f"| adapter params + buffers, vs LoRA | {mib(gm['total'])} | {mib(lm['total'])} | "
        f"{gm['total'] / lm['total']:.2f} | report | |",
        f"| - params (trainable A, B) | {mib(gm['param_bytes'])} | {mib(lm['param_bytes'])} | | | |",
        f"| - buffers (basis, A0 P, B0, S) | {mib(gm['buffer_bytes'])} | {mib(lm['buffer_bytes'])} | | | |",
        f"| - buffers after save + reload | {mib(rm['buffer_bytes'])} | | | | |",
        f"| - adapter folder on disk | {mib(rm['file_bytes'])} | | | | |",
    ]
    if peak["guardspace"] is not None and peak["corda"] is not None:
        lines.append(
            f"| peak RSS growth during statistics + init, vs CorDA | {mib(peak['guardspace'])} | "
            f"{mib(peak['corda'])} | "
            f"{peak['guardspace'] / max(peak['corda'], 1):.2f} | report | |"
        )
    lines += [
        "",
        f"init paired ratios: {', '.join(f'{r:.3f}' for r in init['paired_ratios'])}; "
        f"step: ratio of medians {step['ratio']:.3f}, median of paired ratios {step['paired_ratio']:.3f} "
        f"({settings['repeats']} interleaved steps each)",
        "",
        "Largest GuardSpace buffers (distinct tensors; the basis is shared by the modules of one input site):",
        "",
        "| buffer | shape | count | bytes each |",
        "|---|---|---|---|",
    ]
    for (name, shape_), count in gm["largest_buffers"]:
        lines.append(f"| {name} | {' x '.join(map(str, shape_))} | {count} | {mib(4 * _numel(shape_))} |")
    lines += [
        "",
        f"n x n buffers (in_features squared) in any module: {len(gm['square_buffers']) or 'none'}",
        "null-space dimension k per module type (layer 0..L-1): "
        + "; ".join(f"{name} {dims}" for name, dims in results["null_dims"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.argv = argv
    threads, logger = torch.get_num_threads(), logging.getLogger("peft_safety")
    level = logger.level
    torch.set_num_threads(args.threads or min(2, threads))
    logger.setLevel(logging.ERROR)  # the per-layer report and the dead-layer warning are not what is measured
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            results = run_benchmark(args)
    finally:  # main() also runs in-process from the test suite: leave the process as it was
        torch.set_num_threads(threads)
        logger.setLevel(level)
    print(format_report(results))
    return results


if __name__ == "__main__":
    main()
