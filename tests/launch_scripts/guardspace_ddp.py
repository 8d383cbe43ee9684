"""GuardSpace training under DDP, started by the real ``accelerate launch`` (``tests/test_accelerate_launch.py``).

Run it by hand on a CPU machine (2 processes, gloo, loopback)::

    ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no --main_process_port 29533 \
        tests/launch_scripts/guardspace_ddp.py --out /tmp/guardspace_ddp

``--multi_gpu`` selects accelerate's torchrun launcher (one process per rank, ``MASTER_ADDR`` 127.0.0.1);
``--cpu`` would select the simple launcher, which starts a *single* process unless ``--mpirun_hostfile`` is given.
``ACCELERATE_USE_CPU=true`` then makes ``Accelerator()`` use gloo (MULTI_CPU); without it, on a machine without
GPUs, accelerate reports a single process (``DistributedType.NO``) on every rank and ``prepare`` does not wrap the
model in DDP. This script checks that it really runs as ``WORLD_SIZE`` DDP ranks.

Every rank: tiny Llama + tokenizer as in ``tests/conftest.py``; statistics with ``collect_safety_statistics``
(prompts sharded across ranks, sums all-reduced); ``get_peft_model`` with a ``GuardSpaceConfig``;
``accelerator.prepare(model, AdamW)``; ``STEPS`` steps on its half of the global batch ``BENIGN_TEXTS``. The loss of
a rank is its summed token loss divided by the global token count times the world size (what ``Trainer`` does with
``average_tokens_across_devices``), so DDP's gradient averaging gives exactly the gradient of the global batch's
mean token loss. Each rank writes ``rank<i>.json``; rank 0 saves the statistics and the adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny model and tokenizer

from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, LLAMA_TARGETS, build_tokenizer, encode, layer_outputs, make_llama  # noqa: E402

R, ALPHA, THRESHOLD = 4, 8, 1e-10
STEPS, LR, WEIGHT_DECAY = 3, 1e-3, 0.1
GUARANTEE_BOUND = 1e-5  # max |adapted - base| / max |base| on the calibration prompts, per adapted layer


def guardspace_config(statistics):
    from peft_safety import GuardSpaceConfig

    return GuardSpaceConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=LLAMA_TARGETS,
        safety_statistics=statistics,
        null_space_threshold=THRESHOLD,
    )


def adapted_layers(peft_model) -> list[str]:
    return [name for name, module in peft_model.named_modules() if hasattr(module, "lora_guard")]


def guard_buffers(model) -> list[tuple[str, torch.Tensor]]:
    """Every GuardSpace buffer, one entry per module (a site's shared basis is listed under each module)."""
    return [(n, b) for n, b in model.named_buffers(remove_duplicate=False) if ".lora_guard." in n]


def distinct_bases(model) -> int:
    return len({b.data_ptr() for n, b in guard_buffers(model) if n.endswith(".basis")})


def max_relative_change(trained: dict, base: dict) -> dict[str, float]:
    return {
        name: float((trained[name] - base[name]).abs().max() / base[name].abs().max().clamp_min(1e-30))
        for name in base
    }


def label_count(batch: dict) -> int:
    """Tokens that carry a loss after the causal shift (the ``num_items_in_batch`` of ``Trainer``)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from peft import get_peft_model

    from peft_safety import collect_safety_statistics

    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.distributed_type != DistributedType.MULTI_CPU or world < 2:
        raise SystemExit(f"expected MULTI_CPU with >= 2 processes, got {accelerator.distributed_type} x {world}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    model = make_llama(tokenizer)
    statistics = collect_safety_statistics(
        model, tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, batch_size=2, show_progress=False
    )
    statistics.save(out / "stats.safetensors")  # rank 0 writes

    peft_model = get_peft_model(model, guardspace_config(statistics))
    layers = adapted_layers(peft_model)
    with peft_model.disable_adapter():
        base = layer_outputs(peft_model, tokenizer, HARMFUL_PROMPTS, layers)
    initial = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    buffers_before = {n: b.clone() for n, b in guard_buffers(peft_model)}
    bases_before = distinct_bases(peft_model)

    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY
    )
    ddp, optimizer = accelerator.prepare(peft_model, optimizer)

    # buffers, not parameters: nothing DDP synchronises or the optimizer updates is a projector basis
    buffer_ptrs = {b.data_ptr() for _, b in guard_buffers(ddp)}
    param_ptrs = {p.data_ptr() for p in ddp.parameters()}
    optimized_ptrs = {p.data_ptr() for group in optimizer.param_groups for p in group["params"]}

    with accelerator.split_between_processes(BENIGN_TEXTS) as shard:
        batch = encode(tokenizer, shard)
    global_items = accelerator.reduce(torch.tensor(label_count(batch)), reduction="sum")
    ddp.train()
    losses = []
    for _ in range(STEPS):
        loss = ddp(**batch, num_items_in_batch=global_items).loss * world
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))

    unwrapped = accelerator.unwrap_model(ddp)
    unwrapped.eval()
    trained = layer_outputs(unwrapped, tokenizer, HARMFUL_PROMPTS, layers)
    guarantee = max_relative_change(trained, base)
    trainable = {n: p.detach() for n, p in unwrapped.named_parameters() if p.requires_grad}
    result = dict(
        rank=rank,
        world_size=world,
        distributed_type=str(accelerator.distributed_type),
        wrapped=type(ddp).__name__,
        find_unused_parameters=bool(getattr(ddp, "find_unused_parameters", True)),
        shard=list(shard),
        global_items=int(global_items),
        adapted_layers=len(layers),
        guard_buffers=len(buffers_before),
        guard_parameters=[n for n, _ in ddp.named_parameters() if "lora_guard" in n],
        buffers_shared_with_parameters=len(buffer_ptrs & param_ptrs),
        buffers_in_optimizer=len(buffer_ptrs & optimized_ptrs),
        buffers_unchanged=all(torch.equal(b, buffers_before[n]) for n, b in guard_buffers(unwrapped)),
        distinct_bases=[bases_before, distinct_bases(unwrapped)],  # before / after prepare
        guarantee=guarantee,
        guarantee_max=max(guarantee.values()),
        guarantee_holds=max(guarantee.values()) <= GUARANTEE_BOUND,
        losses=losses,
        adapter_moved=max(float((trainable[n] - initial[n]).abs().max()) for n in trainable),
        checksum=sum(float(p.double().sum()) for p in trainable.values()),
    )
    if accelerator.is_main_process:
        unwrapped.save_pretrained(out / "adapter")
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
