"""Real ``torch.distributed`` runs: 2 CPU processes, gloo on loopback, spawned with ``torch.multiprocessing``.

One spawn does all the multi-process work (process start-up dominates the cost): sharded statistics, the
cross-rank check, a DTensor weight read, GuardSpace training through ``Accelerator.prepare`` (DDP) and under FSDP2
``fully_shard``. Each rank writes its findings to a JSON file and the test compares them with a single-process run
of the same steps.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import (
    BENIGN_TEXTS,
    HARMFUL_PROMPTS,
    build_tokenizer,
    encode,
    exit_worker,
    layer_outputs,
    logits_of,
    make_llama,
)
from peft import get_peft_model
from safetensors.torch import load_file

from peft_safety import GuardSpaceConfig, SafetyStatistics, collect_safety_statistics
from peft_safety.distributed import full_weight, verify_statistics_across_ranks

WORLD = 2
TIMEOUT_S = 300  # generous: the machine running CI may be shared; a normal run takes ~45 s
TARGETS = ["q_proj", "v_proj", "down_proj"]
PROBED = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
SHARDS = [BENIGN_TEXTS[:2], BENIGN_TEXTS[2:]]  # each rank's training batch
STEPS, LR = 3, 1e-3
UNEVEN_PROMPTS = HARMFUL_PROMPTS[:5]  # 3 prompts on rank 0, 2 on rank 1


def _config(statistics) -> GuardSpaceConfig:
    return GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, safety_statistics=statistics, null_space_threshold=1e-10
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _worker(rank: int, port: int, out_dir: str) -> None:
    # the variables torchrun / accelerate launch set; Accelerator() then reuses this process group (MULTI_CPU)
    env = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=WORLD, LOCAL_WORLD_SIZE=WORLD, MASTER_PORT=port)
    os.environ.update(MASTER_ADDR="127.0.0.1", **{key: str(value) for key, value in env.items()})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        result = _rank_work(rank, Path(out_dir))
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.barrier()
        dist.destroy_process_group()
    exit_worker()


def _rank_work(rank: int, out: Path) -> dict:
    import peft_safety  # noqa: F401  (registration, as a user script would)

    tokenizer = build_tokenizer()
    model = make_llama(tokenizer)
    statistics = collect_safety_statistics(
        model, tokenizer, HARMFUL_PROMPTS, TARGETS, batch_size=2, show_progress=False
    )
    statistics.save(out / "stats.safetensors")  # rank 0 writes
    statistics.save(out / f"written_by_rank{rank}.safetensors")  # only rank 0's call writes
    fingerprint = verify_statistics_across_ranks(statistics)

    tampered = SafetyStatistics(
        {site: s + rank * 1e-3 for site, s in statistics.covariance_sums.items()},
        statistics.site_of,
        statistics.num_tokens,
        statistics.num_prompts,
        statistics.metadata,
    )
    try:
        verify_statistics_across_ranks(tampered)
        mismatch = None
    except RuntimeError as err:
        mismatch = str(err)

    # FSDP2 / tensor-parallel style DTensor weight: full_weight all-gathers it
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    layer = torch.nn.Linear(8, 6, bias=False)
    reference_weight = layer.weight.detach().clone()
    torch.distributed.broadcast(reference_weight, 0)
    layer.weight = torch.nn.Parameter(distribute_tensor(reference_weight, mesh, [Shard(0)]))
    local_rows = layer.weight.to_local().shape[0]
    with full_weight(layer) as gathered:
        dtensor_ok = gathered.shape == (6, 8) and torch.equal(gathered, reference_weight) and local_rows == 3

    # GuardSpace training under DDP
    peft_model = get_peft_model(model, _config(statistics))
    guard_params = [name for name, _ in peft_model.named_parameters() if "lora_guard" in name]
    guard_buffers = [name for name, _ in peft_model.named_buffers() if "lora_guard" in name]
    with peft_model.disable_adapter():
        base = layer_outputs(peft_model, tokenizer, HARMFUL_PROMPTS, PROBED)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # what a script run by `accelerate launch` does
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
    ddp, optimizer = accelerator.prepare(peft_model, optimizer)  # DDP, find_unused_parameters=False
    wrapped = type(ddp).__name__
    batch = encode(tokenizer, SHARDS[rank])
    ddp.train()
    for _ in range(STEPS):
        accelerator.backward(ddp(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    trained = layer_outputs(peft_model, tokenizer, HARMFUL_PROMPTS, PROBED)
    guarantee = max(_max_rel(trained[name], base[name]) for name in PROBED)
    if rank == 0:
        peft_model.save_pretrained(out / "adapter")
    fsdp_guarantee = _fsdp2_run(rank, tokenizer, statistics)
    uneven_fingerprint, uneven_tokens = _fsdp2_uneven_statistics(tokenizer)
    somf_checksum, somf_moved = _somf_run(tokenizer)
    checksum = sum(float(p.detach().double().sum()) for p in peft_model.parameters() if p.requires_grad)
    dist.barrier()
    return dict(
        fingerprint=fingerprint,
        mismatch=mismatch,
        dtensor_ok=bool(dtensor_ok),
        guard_params=guard_params,
        guard_buffers=len(guard_buffers),
        guarantee=guarantee,
        checksum=checksum,
        wrapped=wrapped,
        fsdp_guarantee=fsdp_guarantee,
        uneven_fingerprint=uneven_fingerprint,
        uneven_tokens=uneven_tokens,
        somf_checksum=somf_checksum,
        somf_moved=somf_moved,
        distributed_type=str(accelerator.distributed_type),
    )


def _fsdp2_run(rank: int, tokenizer, statistics) -> float:
    """FSDP2: create the adapter on the full model, then ``fully_shard``; train; calibration logits unchanged."""
    from torch.distributed.fsdp import fully_shard

    model = make_llama(tokenizer)
    base = logits_of(model, tokenizer, HARMFUL_PROMPTS)
    peft_model = get_peft_model(model, _config(statistics))
    for block in peft_model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(peft_model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
    batch = encode(tokenizer, SHARDS[rank])
    peft_model.train()
    for _ in range(2):
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    moved = logits_of(peft_model, tokenizer, BENIGN_TEXTS)  # collective forward, like the next one
    trained = logits_of(peft_model, tokenizer, HARMFUL_PROMPTS)
    assert moved.isfinite().all()
    return _max_rel(trained, base)


def _fsdp2_uneven_statistics(tokenizer) -> tuple[str, int]:
    """Statistics on an FSDP2-sharded model (every forward all-gathers weights, a collective) with prompts that do
    not split evenly: rank 0 gets 3 prompts, rank 1 gets 2, one per batch. Every rank must run 3 forwards."""
    from torch.distributed.fsdp import fully_shard

    model = make_llama(tokenizer)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    statistics = collect_safety_statistics(
        model, tokenizer, UNEVEN_PROMPTS, TARGETS, batch_size=1, show_progress=False
    )
    return statistics.fingerprint(), statistics.num_tokens


def _somf_run(tokenizer) -> tuple[float, float]:
    """SOMF mask learning with each rank on its own batches: averaged logit gradients keep the ranks identical."""
    from somf_testbed import TASK_ROWS, TRAIN_HARMFUL, make_adapters, pairs

    from peft_safety import SOMFConfig, SOMFMerger

    peft_model = make_adapters(tokenizer)
    config = SOMFConfig(max_steps=3, batch_size=2, eval_batches=1, progress_bar=False)
    masks = SOMFMerger(config).fit(peft_model, ["poisoned", "task"], pairs(TRAIN_HARMFUL), tokenizer, TASK_ROWS)
    logits = list(masks.logits.values())
    moved = max(float((value - config.init_logit).abs().max()) for value in logits)
    return sum(float(value.double().sum()) for value in logits), moved


def _spawn(out_dir: Path) -> list[dict]:
    context = mp.start_processes(
        _worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S}s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def _single_process_reference(statistics_path: Path, out_dir: Path):
    """The same init and the same optimizer steps in one process (DDP averages the two shards' gradients)."""
    tokenizer = build_tokenizer()
    model = get_peft_model(make_llama(tokenizer), _config(str(statistics_path)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
    batches = [encode(tokenizer, shard) for shard in SHARDS]
    model.train()
    for _ in range(STEPS):
        (sum(model(**batch).loss for batch in batches) / WORLD).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(out_dir)


def test_two_process_statistics_and_ddp_training(tmp_path):
    results = _spawn(tmp_path)
    tokenizer = build_tokenizer()

    # statistics: identical on both ranks, equal to a single-process run, written by rank 0 only
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
    assert (tmp_path / "written_by_rank0.safetensors").exists()
    assert not (tmp_path / "written_by_rank1.safetensors").exists()
    distributed = SafetyStatistics.load(tmp_path / "stats.safetensors")
    assert distributed.fingerprint() == results[0]["fingerprint"]
    single = collect_safety_statistics(make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, TARGETS, show_progress=False)
    assert (distributed.num_tokens, distributed.num_prompts) == (single.num_tokens, single.num_prompts)
    assert distributed.site_of == single.site_of
    for site, total in single.covariance_sums.items():
        assert _max_rel(distributed.covariance_sums[site], total) <= 1e-6, site

    # a mismatch between ranks is detected on every rank, with a clear message
    for result in results:
        assert result["mismatch"] and "differ between ranks" in result["mismatch"] and "[1]" in result["mismatch"]

    assert all(result["dtensor_ok"] for result in results)

    # DDP: projector bases are buffers, the guarantee holds on every rank, ranks agree, adapter = single process
    assert all(
        r["wrapped"] == "DistributedDataParallel" and r["distributed_type"].endswith("MULTI_CPU") for r in results
    )
    assert all(result["guard_params"] == [] and result["guard_buffers"] > 0 for result in results)
    print("guarantee per rank (max relative change):", [result["guarantee"] for result in results])
    print("FSDP2 guarantee per rank (calibration logits):", [result["fsdp_guarantee"] for result in results])
    assert all(result["fsdp_guarantee"] < 1e-4 for result in results)
    # uneven shards under FSDP2: no hang (the ranks pad to the same forward count), same statistics as 1 process
    uneven = collect_safety_statistics(
        make_llama(tokenizer), tokenizer, UNEVEN_PROMPTS, TARGETS, batch_size=1, show_progress=False
    )
    assert results[0]["uneven_fingerprint"] == results[1]["uneven_fingerprint"]
    assert all(result["uneven_tokens"] == uneven.num_tokens for result in results)
    assert all(result["guarantee"] < 1e-4 for result in results), [r["guarantee"] for r in results]
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-9)
    # SOMF under data parallelism: the masks trained, and stayed identical on both ranks
    assert all(result["somf_moved"] > 1e-3 for result in results)
    assert results[0]["somf_checksum"] == pytest.approx(results[1]["somf_checksum"], rel=1e-12)
    # statistics from 2 processes, used by 1 process (another world size): load and initialise
    _single_process_reference(tmp_path / "stats.safetensors", tmp_path / "reference")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert saved.keys() == reference.keys() and any("lora_guard" in key for key in saved)
    for key, value in reference.items():
        assert torch.allclose(saved[key], value, rtol=1e-4, atol=1e-5), key


def test_full_weight_rejects_unexpanded_partitions():
    layer = torch.nn.Linear(4, 3)
    with full_weight(layer) as weight:
        assert weight is layer.weight
    zero3 = torch.nn.Linear(4, 3)
    partition = torch.nn.Parameter(torch.empty(0))
    partition.ds_id = 7  # what DeepSpeed ZeRO-3 leaves on a module outside GatheredParameters
    zero3.weight = partition
    with pytest.raises(RuntimeError, match="ZeRO-3 partition"), full_weight(zero3):
        pass
    flat = torch.nn.Linear(4, 3)
    flat.weight = torch.nn.Parameter(torch.zeros(12))  # an FSDP1-style flattened view
    with pytest.raises(RuntimeError, match="looks sharded"), full_weight(flat):
        pass


def test_verify_statistics_single_process_returns_fingerprint():
    tokenizer = build_tokenizer()
    statistics = collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, ["q_proj"], show_progress=False
    )
    assert verify_statistics_across_ranks(statistics) == statistics.fingerprint()
