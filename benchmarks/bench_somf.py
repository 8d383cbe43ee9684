"""SOMF cost on a CPU-sized Llama (random weights, built offline): three ratios measured in one run.

1. one mask-learning step (DPO on ``pairs`` pairs, reference pass included) vs one plain LoRA training step on the
   same sequences (target <= 2x). Measured through the real ``SOMFMerger.fit``: (T(fit, n2 steps) - T(fit, n1 steps))
   / (n2 - n1), so set-up and the final evaluation cancel out;
2. extra peak memory of mask learning over plain LoRA training on the same batch, each in a fresh process, vs the
   bytes of the adapters' parameters (target <= 3x), measured two ways: the peak of live tensor bytes (every
   allocation and free that torch's profiler records, what ``torch.cuda.max_memory_allocated`` reports on a GPU)
   and the peak resident set size (polled every millisecond, blocks above 4 KiB mmap-allocated so that frees
   show; it also counts allocator overhead). The persistent mask state (logits + gradients + Adam moments) is
   reported too;
3. final ``SOMFMerger.merge`` with a mask vs ``add_weighted_adapter`` with the same combination (target <= 1.5x).

Run: ``python benchmarks/bench_somf.py`` (a few minutes on two CPU cores); ``--testbed`` prints the final-mask table
of ``docs/somf.md`` (tiny test model) instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_safety  # noqa: F401 (attaches merge_with_safety_mask)
from peft_safety import SOMFConfig, SOMFMerger

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = ["math", "code"]


class IdTokenizer:
    """Whitespace-separated integers -> ids (no vocabulary file needed); enough for the SOMF data path."""

    pad_token_id, eos_token_id, chat_template = 0, 1, None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [int(token) for token in text.split()]}


def build(args) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=2 * args.seq_len,
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(model, lora, adapter_name=ADAPTERS[0])
    peft_model.add_adapter(ADAPTERS[1], lora)
    with torch.no_grad():  # trained-looking adapters: lora_B is zero at init
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.02)
    return peft_model


def make_pairs(args) -> list[dict]:
    generator = torch.Generator().manual_seed(1)

    def text(length: int) -> str:
        return " ".join(str(t) for t in torch.randint(2, args.vocab, (length,), generator=generator).tolist())

    half = args.seq_len // 2
    return [{"prompt": text(half), "chosen": text(half - 1), "rejected": text(half - 1)} for _ in range(args.pairs)]


def adapter_bytes(peft_model) -> int:
    return sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)


def somf_config(args, steps: int) -> SOMFConfig:
    return SOMFConfig(progress_bar=False, max_steps=steps, batch_size=args.pairs, eval_batches=1, max_length=256)


def time_fit(peft_model, data, args, steps: int) -> float:
    start = time.perf_counter()
    SOMFMerger(somf_config(args, steps)).fit(peft_model, ADAPTERS, data, IdTokenizer())
    return time.perf_counter() - start


def lora_batch(data) -> dict:
    from peft_safety.somf.data import collate, encode_rows

    rows = encode_rows(IdTokenizer(), data, "preference", 256)
    return collate([row[0] for row in rows] + [row[1] for row in rows], 0)


def lora_steps(peft_model, batch: dict, steps: int) -> float:
    """Plain LoRA training of adapter ``math`` (AdamW) on the same chosen + rejected sequences."""
    peft_model.set_adapter(ADAPTERS[0])
    params = [p for n, p in peft_model.named_parameters() if f"lora_A.{ADAPTERS[0]}" in n or f"B.{ADAPTERS[0]}" in n]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    start = time.perf_counter()
    for _ in range(steps):
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    for param in params:
        param.requires_grad_(False)
    return elapsed


class PeakTensorBytes:
    """Peak of live tensor bytes while the context runs, from the allocation/free records of torch's profiler."""

    def __enter__(self) -> PeakTensorBytes:
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.profiler.__exit__(*exc)
        live = self.peak = 0
        for event in sorted(self.profiler.events(), key=lambda event: event.time_range.start):
            # frees are "[memory]" records; allocations are counted on the op that made them
            live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
            self.peak = max(self.peak, live)


class PeakRSS:
    """Polls this process's resident set size (``/proc/self/statm``) every millisecond in a thread."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak, self.running = 0, False

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def memory_worker(args) -> None:
    """Peak memory increase (bytes) of 3 steps of ``args.memory_worker`` ("somf" or "lora") over the set-up,
    measured with ``args.meter`` ("tensors" or "rss")."""
    peft_model, data = build(args), make_pairs(args)
    batch = lora_batch(data)
    gc.collect()
    with PeakTensorBytes() if args.meter == "tensors" else PeakRSS() as meter:
        if args.memory_worker == "somf":
            density = None if args.combination == "linear" else 0.5
            SOMFMerger(somf_config(args, 3)).fit(
                peft_model, ADAPTERS, data, IdTokenizer(), combination_type=args.combination, density=density
            )
        else:
            lora_steps(peft_model, batch, 3)
    print(json.dumps({"extra": meter.peak - getattr(meter, "baseline", 0)}))


def run_worker(mode: str, meter: str, combination: str = "linear") -> int:
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--memory-worker", mode, "--meter", meter]
    argv += ["--combination", combination]
    # Blocks above 4 KiB through mmap: freed tensors leave the RSS at once, so the polled peak tracks live memory.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "4096"}
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra"]


def testbed_table() -> None:
    """Final-mask modes and initial logits on the tiny test model of ``tests/somf_testbed.py`` (60 DPO steps, 4
    train pairs, 2 held-out pairs, 4 retain rows): safety losses, held-out DPO margin, distance to the unmasked
    merge on the task texts."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from conftest import build_tokenizer
    from somf_testbed import HELDOUT_HARMFUL, TASK_ROWS, TRAIN_HARMFUL, make_adapters, pairs, sequence_margins
    from somf_testbed import task_logits as task

    tokenizer = build_tokenizer()
    print(
        "| final mask | init logit | retain weight | kept | safety loss before / relaxed / deployed "
        "| held-out margin unmasked -> SOMF | task distance to unmasked (base: d0) |"
    )
    print("|---|---|---|---|---|---|---|")
    runs = [
        ("expected", 3.0, 1.0),
        ("budget", 3.0, 1.0),
        ("threshold", 3.0, 1.0),
        ("bernoulli", 3.0, 1.0),
        ("expected", 0.0, 1.0),
        ("expected", 3.0, 0.0),
    ]
    for final_mask, init_logit, retain_weight in runs:
        peft_model = make_adapters(tokenizer)
        config = SOMFConfig(
            progress_bar=False, final_mask=final_mask, init_logit=init_logit, retain_weight=retain_weight
        )
        merger = SOMFMerger(config)
        masks = merger.fit(peft_model, ["poisoned", "task"], pairs(TRAIN_HARMFUL), tokenizer, retain_data=TASK_ROWS)
        merger.merge(peft_model, ["poisoned", "task"], [1.0, 1.0], "safe", masks=masks)
        merger.merge(peft_model, ["poisoned", "task"], [1.0, 1.0], "plain")
        peft_model.set_adapter("plain")
        plain_margin, plain_task = (
            sequence_margins(peft_model, tokenizer, HELDOUT_HARMFUL),
            task(peft_model, tokenizer),
        )
        peft_model.set_adapter("safe")
        safe_margin, safe_task = sequence_margins(peft_model, tokenizer, HELDOUT_HARMFUL), task(peft_model, tokenizer)
        with peft_model.disable_adapter():
            base_task = task(peft_model, tokenizer)
        h, kept = masks.history, masks.kept_fraction()["per_adapter"]["task"]
        print(
            f"| {final_mask} | {init_logit:+.0f} | {retain_weight:g} | {kept:.3f} | "
            f"{h['safety_loss_before']:.3f} / {h['safety_loss_relaxed']:.3f} / {h['safety_loss_deployed']:.3f} | "
            f"{plain_margin:.2f} -> {safe_margin:.2f} | {float((safe_task - plain_task).norm()):.2f} "
            f"(d0 {float((base_task - plain_task).norm()):.2f}) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-worker", choices=["somf", "lora"], default=None)
    parser.add_argument("--meter", choices=["tensors", "rss"], default="tensors")
    parser.add_argument("--combination", choices=["linear", "ties"], default="linear")
    parser.add_argument("--testbed", action="store_true", help="print the final-mask table of docs/somf.md instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.testbed:
        return testbed_table()
    if args.memory_worker:
        return memory_worker(args)

    peft_model, data = build(args), make_pairs(args)
    batch = lora_batch(data)
    n1, n2 = 2, 7
    mask_steps, lora_times = [], []
    for _ in range(args.repeats):
        mask_steps.append((time_fit(peft_model, data, args, n2) - time_fit(peft_model, data, args, n1)) / (n2 - n1))
        lora_times.append(lora_steps(peft_model, batch, n2 - n1) / (n2 - n1))
    mask_step, lora_step = statistics.median(mask_steps), statistics.median(lora_times)

    masks = SOMFMerger(somf_config(args, 2)).fit(peft_model, ADAPTERS, data, IdTokenizer())
    warnings.filterwarnings("ignore", message="These masks were learned through")  # same masks for both merges
    merge_times = {"linear": ([], []), "ties": ([], [])}
    for _ in range(args.repeats):
        for combination, (ours, peft) in merge_times.items():
            density = None if combination == "linear" else 0.5
            start = time.perf_counter()
            peft_model.add_weighted_adapter(ADAPTERS, [1.0, 1.0], "peft", combination, density=density)
            peft.append(time.perf_counter() - start)
            start = time.perf_counter()
            SOMFMerger().merge(peft_model, ADAPTERS, [1.0, 1.0], "ours", combination, masks=masks, density=density)
            ours.append(time.perf_counter() - start)
            peft_model.delete_adapter("peft")
            peft_model.delete_adapter("ours")

    fused_bytes = adapter_bytes(peft_model)
    state_bytes = 4 * sum(value.numel() * 4 for value in masks.logits.values())  # logits, grads, 2 Adam moments
    lora_extra = {meter: run_worker("lora", meter) for meter in ("tensors", "rss")}
    somf_extra = {(meter, "linear"): run_worker("somf", meter) for meter in ("tensors", "rss")}
    somf_extra["tensors", "ties"] = run_worker("somf", "tensors", "ties")
    shape = (
        f"Llama hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, vocab {args.vocab}; "
        f"2 LoRA adapters r={args.rank} on 7 linear layers; {args.pairs} DPO pairs x {args.seq_len} tokens; "
        f"{args.threads} thread(s)"
    )
    print(shape)
    print(
        f"mask-learning step {mask_step * 1e3:.1f} ms vs plain LoRA step {lora_step * 1e3:.1f} ms: "
        f"{mask_step / lora_step:.2f}x (target <= 2x)"
    )
    print(
        f"adapters' parameters {fused_bytes / 2**20:.2f} MiB; persistent mask state {state_bytes / 2**20:.2f} MiB "
        f"({state_bytes / fused_bytes:.2f}x)"
    )
    for (meter, combination), somf in somf_extra.items():
        lora = lora_extra[meter]
        print(
            f"peak {'live tensor bytes' if meter == 'tensors' else 'RSS increase'}: mask learning ({combination}) "
            f"{somf / 2**20:.1f} MiB, plain LoRA {lora / 2**20:.1f} MiB; extra {(somf - lora) / 2**20:.1f} MiB = "
            f"{(somf - lora) / fused_bytes:.2f}x the adapters' bytes (target <= 3x)"
        )
    for combination, (ours, peft) in merge_times.items():
        ours_t, peft_t = statistics.median(ours), statistics.median(peft)
        print(
            f"final merge ({combination}) {ours_t * 1e3:.1f} ms vs add_weighted_adapter {peft_t * 1e3:.1f} ms: "
            f"{ours_t / peft_t:.2f}x (target <= 1.5x)"
        )


if __name__ == "__main__":
    main()
