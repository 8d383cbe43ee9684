"""GuardSpace vs plain LoRA at Llama-2-7B layer shapes on one GPU: init time, 20 training steps, peak memory.

The model is a ``LlamaForCausalLM`` built from a config with random bf16 weights and the layer shapes of
Llama-2-7B (hidden 4096, MLP 11008, 32 heads, vocab 32000) but only ``--layers`` blocks (default 2), so that it
fits any GPU and runs in minutes; nothing is downloaded. Calibration: ``--prompts`` random token sequences of
``--prompt-tokens`` tokens. Both methods target all seven linear layers (r 8, alpha 16) and train ``--steps`` AdamW
steps under bf16 autocast on a random ``--batch`` x ``--seq`` batch. Peak memory is
``torch.cuda.max_memory_allocated`` during each phase (reset before it), on top of the base model's bytes.

    python benchmarks/bench_gpu_7b.py --device cuda                      # the GPU lane (benchmarks/gpu.sh)
    python benchmarks/bench_gpu_7b.py --device cpu --hidden 64 --intermediate 172 --heads 4 --vocab 256 \\
        --prompts 4 --steps 2 --batch 2 --seq 16                         # a tiny dry run of the script
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_safety import GuardSpaceConfig, collect_safety_statistics, guardspace_report

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the lane) or cpu (a dry run at tiny shapes)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="GQA: fewer key/value heads (default: --heads)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return args


class _TokenIds:
    """The part of a tokenizer that ``collect_safety_statistics`` uses (``chat_template=False``): the prompt named
    ``"i"`` is row ``i`` of ``prompts`` (``(count, tokens)`` random ids)."""

    chat_template = None

    def __init__(self, prompts: torch.Tensor) -> None:
        self.prompts = prompts

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self.prompts[int(text)].tolist()}


def build_model(args: argparse.Namespace, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads, max_position_embeddings=max(args.seq, args.prompt_tokens),
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device, action: Callable[[], Any]) -> tuple[Any, float, int]:
    """``(result, seconds, peak bytes above the bytes allocated before)`` of ``action`` (peak: CUDA only, else 0)."""
    _sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = action()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
    return result, seconds, peak


def train(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> list[float]:
    """``args.steps`` AdamW steps under bf16 autocast on one random batch; the losses."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=generator).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    losses = []
    for _ in range(args.steps):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(1, args.vocab, (args.prompts, args.prompt_tokens), generator=generator)
    results: dict[str, dict[str, float]] = {}
    for method in ("lora", "guardspace"):
        model = build_model(args, device)
        base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if method == "lora":
            config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS)
            statistics_s = 0.0
        else:
            tokenizer = _TokenIds(prompts)
            texts = [str(i) for i in range(args.prompts)]
            statistics, statistics_s, _ = _peak(
                device,
                lambda m=model, t=tokenizer, x=texts: collect_safety_statistics(
                    m, t, x, TARGETS, batch_size=8, chat_template=False, show_progress=False
                ),
            )
            config = GuardSpaceConfig(
                r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, safety_statistics=statistics
            )
        peft_model, init_s, init_peak = _peak(device, lambda m=model, c=config: get_peft_model(m, c))
        adapter_bytes = sum(
            t.numel() * t.element_size()
            for name, t in [*peft_model.named_parameters(), *peft_model.named_buffers()]
            if ".lora_" in name
        )
        losses, train_s, train_peak = _peak(device, lambda p=peft_model: train(p, args, device))
        row = dict(
            base_gib=base_bytes / 2**30, statistics_s=statistics_s, init_s=init_s, init_peak_gib=init_peak / 2**30,
            adapter_gib=adapter_bytes / 2**30, train_s=train_s, train_peak_gib=train_peak / 2**30,
            first_loss=losses[0], last_loss=losses[-1],
        )  # fmt: skip
        if method == "guardspace":
            report = guardspace_report(peft_model)
            row.update(dead_layers=len(report.dead_layers), leakage=report.total_leakage)
        results[method] = row
        del peft_model, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def format_results(args: argparse.Namespace, results: dict[str, dict[str, float]]) -> str:
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    lines = [
        f"{device}, torch {torch.__version__}; Llama shapes hidden {args.hidden}, MLP {args.intermediate}, "
        f"{args.heads} heads ({args.kv_heads or args.heads} kv), vocab {args.vocab}, {args.layers} layers, bf16; "
        f"r {args.r}; {args.prompts} calibration prompts x {args.prompt_tokens} tokens; {args.steps} steps of "
        f"{args.batch} x {args.seq}",
        "",
        "| measure | plain LoRA | GuardSpace |",
        "|---|---|---|",
    ]
    rows = [
        ("base weights (GiB)", "base_gib", "{:.2f}"),
        ("statistics (s)", "statistics_s", "{:.1f}"),
        ("init (s)", "init_s", "{:.1f}"),
        ("peak extra memory during init (GiB)", "init_peak_gib", "{:.2f}"),
        ("adapter params + buffers (GiB)", "adapter_gib", "{:.3f}"),
        (f"{args.steps} training steps (s)", "train_s", "{:.1f}"),
        ("peak memory above the model during training (GiB)", "train_peak_gib", "{:.2f}"),
        ("loss first -> last", None, None),
    ]
    lora, guard = results["lora"], results["guardspace"]
    for label, key, form in rows:
        if key is None:
            lines.append(
                f"| {label} | {lora['first_loss']:.3f} -> {lora['last_loss']:.3f} | "
                f"{guard['first_loss']:.3f} -> {guard['last_loss']:.3f} |"
            )
        else:
            lines.append(f"| {label} | {form.format(lora[key])} | {form.format(guard[key])} |")
    lines.append(f"\nGuardSpace: {guard['dead_layers']} dead layers, calibration leakage {guard['leakage']:.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    results = run(args)
    print(format_results(args, results))
    return results


if __name__ == "__main__":
    main()
