"""GuardSpace under DeepSpeed ZeRO-3 on 2 CPU processes (a manual check: DeepSpeed is no dependency and not in CI).

Run by hand (DeepSpeed's CPU accelerator with gloo, torchrun on loopback; ~20 s, plus a one-off JIT build of
DeepSpeed's ``shm_comm`` op with ninja and g++ on the first run)::

    pip install --no-build-isolation deepspeed   # 0.19.8 tested (an sdist; adds only its own small dependencies)
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 \
        --master_addr 127.0.0.1 --master_port 29534 tests/launch_scripts/guardspace_zero3.py --out /tmp/gs_zero3

With a live ``HfDeepSpeedConfig`` (ZeRO-3), ``from_pretrained`` creates the base model in ``deepspeed.zero.Init``:
every weight is partitioned (``numel() == 0`` on each rank) when ``get_peft_model`` runs, and the GuardSpace init
reads each one through ``peft_safety.distributed.full_weight`` (PEFT's ``gather_params_ctx``, i.e. DeepSpeed's
``GatheredParameters``). Each rank writes ``rank<i>.json``: ``init_max_difference`` (the init against one on the
unpartitioned model, from the same statistics), ``init_guarantee`` / ``guarantee`` (max relative change of an adapted
layer's output on the calibration prompts through the ZeRO-3 engine, before / after ``STEPS`` steps on a different
batch per rank), whether adapters / GuardSpace buffers are partitioned, and the shapes of a ``lora_A``/``lora_B``
pair saved by ``save_pretrained`` outside / inside ``GatheredParameters`` (outside: empty tensors). ``stage`` and
``error`` say how far it got if something failed.

Measured (DeepSpeed 0.19.8, torch 2.13.0+cpu): init identical to the unpartitioned one (difference 0.0), guarantee
0.0 at init and 4.3e-7 after training on both ranks, lora_A/lora_B partitioned by ZeRO-3, buffers not, and
``save_pretrained`` outside ``GatheredParameters`` writes 0-element lora_A/lora_B.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny model and tokenizer

from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, LLAMA_TARGETS, build_tokenizer, encode, layer_outputs, make_llama  # noqa: E402
from guardspace_ddp import GUARANTEE_BOUND, LR, STEPS, WEIGHT_DECAY, adapted_layers, guardspace_config  # noqa: E402

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition even tiny weights
    "zero_allow_untested_optimizer": True,
    "wall_clock_breakdown": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import deepspeed
    import torch.distributed as dist
    from peft import get_peft_model
    from transformers.integrations import HfDeepSpeedConfig

    from peft_safety import collect_safety_statistics

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = dict(rank=rank, world_size=dist.get_world_size(), stage="start")
    try:
        hf_ds_config = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841  (keeps transformers' / PEFT's ZeRO-3 switch on)
        tokenizer = build_tokenizer()
        statistics = collect_safety_statistics(
            make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, batch_size=2, show_progress=False
        )
        reference = get_peft_model(make_llama(tokenizer), guardspace_config(statistics))  # unpartitioned init
        reference_init = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
        layers = adapted_layers(reference)
        reference.eval()
        with reference.disable_adapter():
            base = layer_outputs(reference, tokenizer, HARMFUL_PROMPTS, layers)

        checkpoint = args.out / "base_model"
        if rank == 0:
            make_llama(tokenizer).save_pretrained(checkpoint)
        dist.barrier()
        # with a live HfDeepSpeedConfig (ZeRO-3), from_pretrained creates the model in deepspeed.zero.Init and loads
        # each rank's partitions
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            plain = make_llama(tokenizer).state_dict()
            result["base_weight_difference"] = max(
                float((p.detach() - plain[n]).abs().max()) for n, p in model.named_parameters()
            )
        weight = model.model.layers[0].self_attn.q_proj.weight
        result.update(partitioned=hasattr(weight, "ds_id") and weight.numel() == 0, stage="zero.Init")

        peft_model = get_peft_model(model, guardspace_config(statistics))
        result["stage"] = "get_peft_model"
        init = {n: p.detach() for n, p in peft_model.named_parameters() if p.requires_grad}
        result["init_max_difference"] = max(float((init[n] - v).abs().max()) for n, v in reference_init.items())

        optimizer = torch.optim.AdamW(
            [p for p in peft_model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY
        )
        engine, optimizer, _, _ = deepspeed.initialize(model=peft_model, optimizer=optimizer, config=DS_CONFIG)
        result["stage"] = "deepspeed.initialize"
        engine.eval()
        result["init_guarantee"] = _guarantee(engine, tokenizer, base, layers)
        result["stage"] = "forward"
        batch = encode(tokenizer, BENIGN_TEXTS[2 * rank : 2 * rank + 2])
        engine.train()
        for _ in range(STEPS):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        result["stage"] = "trained"
        engine.eval()
        result["guarantee"] = _guarantee(engine, tokenizer, base, layers)
        result["guarantee_holds"] = result["guarantee"] <= GUARANTEE_BOUND
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        result["adapter_partitioned"] = all(hasattr(p, "ds_id") and p.numel() == 0 for p in trainable)
        guard = [b for n, b in engine.module.named_buffers() if ".lora_guard." in n]
        result["buffers_partitioned"] = any(hasattr(b, "ds_id") or b.numel() == 0 for b in guard)
        result["saved_outside_gather"] = _save_shapes(engine.module, args.out / "adapter_partitioned", rank)
        with deepspeed.zero.GatheredParameters(trainable):  # PEFT's save_pretrained does not gather by itself
            trained = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
            result["saved_inside_gather"] = _save_shapes(engine.module, args.out / "adapter", rank)
        result["adapter_moved"] = max(
            float((trained[n.removeprefix("module.")] - v).abs().max()) for n, v in reference_init.items()
        )
        result["checksum"] = sum(float(v.double().sum()) for v in trained.values())
        result["stage"] = "done"
    except Exception as err:  # report how far it got
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()[-3000:]
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def _save_shapes(model, path: Path, rank: int) -> list | None:
    """Rank 0 saves the adapter; the shapes of one saved lora_A / lora_B pair."""
    if rank == 0:
        from safetensors.torch import load_file

        model.save_pretrained(path)
        saved = load_file(path / "adapter_model.safetensors")
        return [list(v.shape) for k, v in saved.items() if "layers.0.self_attn.q_proj.lora_" in k]
    return None


def _guarantee(engine, tokenizer, base: dict, layers: list[str]) -> float:
    """Max relative change of an adapted layer's output on the calibration prompts (ZeRO-3 gathers in forward)."""
    outputs = layer_outputs(engine, tokenizer, HARMFUL_PROMPTS, layers)
    return max(float((outputs[n] - base[n]).abs().max() / base[n].abs().max()) for n in layers)


if __name__ == "__main__":
    main()
