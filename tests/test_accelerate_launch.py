"""GuardSpace under DDP started by the real ``accelerate launch`` command line: 2 CPU processes, gloo on loopback.

``tests/test_distributed.py`` spawns its workers with ``torch.multiprocessing``; this test runs the launcher users
run, in a subprocess with a time limit, on ``tests/launch_scripts/guardspace_ddp.py`` (see its docstring for the
command and why it is ``--multi_gpu`` plus ``ACCELERATE_USE_CPU=true`` rather than ``--cpu``). Then it repeats the
training in this process on the full global batch and compares the saved adapters.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, LLAMA_TARGETS, build_tokenizer, encode, make_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_safety import SafetyStatistics, collect_safety_statistics

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "launch_scripts" / "guardspace_ddp.py"
sys.path.insert(0, str(SCRIPT.parent))
import guardspace_ddp as launched  # noqa: E402  (the launched script's settings: same config, steps, optimizer)

WORLD = 2
TIMEOUT_S = 240  # a normal run takes ~15 s; generous for a shared CI machine
# variables a surrounding launcher may have set; the launched ranks must get theirs from `accelerate launch` only
INHERITED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_PORT", "ACCELERATE_")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(processes) -> None:
    import psutil

    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _launch(tmp: Path) -> tuple[Path, str]:
    """``accelerate launch`` 2 CPU ranks on the script; return its output folder and the launcher's output."""
    import psutil

    out = tmp / "ddp"
    env = {key: value for key, value in os.environ.items() if not key.startswith(INHERITED)}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",  # loopback only (torchrun's default too; accelerate sets only the port)
        ACCELERATE_USE_CPU="true",  # Accelerator(): MULTI_CPU with gloo
        HF_HOME=str(tmp / "hf_home"),  # no user `accelerate config` default file is read
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(WORLD), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "--log_dir", str(tmp / "logs"),  # torchrun's per-run folder, otherwise left in the system temp dir
        str(SCRIPT), "--out", str(out),
    ]  # fmt: skip
    log = tmp / "launch.log"  # a file, not a pipe: a full pipe would block the launcher
    with log.open("w") as sink:
        launcher = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    descendants: list = []
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while launcher.poll() is None and time.monotonic() < deadline:
            try:  # torchrun starts each rank in its own session: remember them to clean up on a timeout
                descendants = psutil.Process(launcher.pid).children(recursive=True) or descendants
            except psutil.NoSuchProcess:
                break
            time.sleep(0.5)
        if launcher.poll() is None:
            _stop([psutil.Process(launcher.pid), *descendants])
            pytest.fail(f"accelerate launch did not finish within {TIMEOUT_S}s:\n{log.read_text()[-6000:]}")
    finally:
        if launcher.poll() is None:  # interrupted
            _stop([psutil.Process(launcher.pid), *descendants])
    output = log.read_text()
    assert launcher.returncode == 0, output[-6000:]
    assert descendants, "no worker processes seen"
    alive = [process.pid for process in descendants if _alive(process)]
    assert not alive, f"processes left behind by accelerate launch: {alive}"
    return out, output


def _single_process(statistics_path: Path, out: Path):
    """The same init and optimizer steps in one process, on the full global batch (mean token loss)."""
    tokenizer = build_tokenizer()
    model = get_peft_model(make_llama(tokenizer), launched.guardspace_config(str(statistics_path)))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=launched.LR, weight_decay=launched.WEIGHT_DECAY
    )
    batch = encode(tokenizer, BENIGN_TEXTS)
    model.train()
    losses = []
    for _ in range(launched.STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(out)
    return model, losses


@torch.no_grad()
def _delta_weights(model) -> dict[str, torch.Tensor]:
    """Each GuardSpace layer's effective update ``s (B A - B0 A0) P``."""
    return {
        name: module.get_delta_weight("default")
        for name, module in model.named_modules()
        if hasattr(module, "lora_guard")
    }


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_ddp(tmp_path):
    out, output = _launch(tmp_path)
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]

    # really 2 DDP ranks, each with its half of the global batch
    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == WORLD for r in results)
    assert all(
        r["distributed_type"].endswith("MULTI_CPU") and r["wrapped"] == "DistributedDataParallel" for r in results
    )
    assert [text for r in results for text in r["shard"]] == BENIGN_TEXTS
    # projector bases are buffers: not parameters, not synchronised, not optimised, not changed by training
    for r in results:
        assert r["guard_parameters"] == [] and r["guard_buffers"] == 8 * r["adapted_layers"] > 0
        assert r["buffers_shared_with_parameters"] == 0 and r["buffers_in_optimizer"] == 0
        assert r["buffers_unchanged"] and r["find_unused_parameters"] is False
    # the guarantee holds on every rank, for every adapted layer
    print(
        "guarantee per rank (max relative change of an adapted layer's output):", [r["guarantee_max"] for r in results]
    )
    assert all(r["guarantee_holds"] and r["guarantee_max"] <= launched.GUARANTEE_BOUND for r in results)
    assert all(len(r["guarantee"]) == r["adapted_layers"] == 2 * len(LLAMA_TARGETS) for r in results)
    # both ranks hold the same trained adapter
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-9)
    assert "Traceback" not in output

    # statistics: sharded and all-reduced = a single-process collection
    tokenizer = build_tokenizer()
    distributed = SafetyStatistics.load(out / "stats.safetensors")
    single = collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
    )
    assert (distributed.num_tokens, distributed.site_of) == (single.num_tokens, single.site_of)
    for site, total in single.covariance_sums.items():
        assert (distributed.covariance_sums[site] - total).abs().max() <= 1e-6 * total.abs().max(), site

    # the adapter saved by rank 0 = one process training on the full global batch (same statistics file: a null
    # space basis is only defined up to a rotation, and sums that differ in the last bit may pick another one)
    reference_model, losses = _single_process(out / "stats.safetensors", tmp_path / "reference")
    assert results[0]["losses"] == pytest.approx(losses, rel=1e-5)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert saved.keys() == reference.keys() and any(".lora_guard." in key for key in saved)
    difference = {
        key: float((saved[key] - value).abs().max()) if value.numel() else 0.0 for key, value in reference.items()
    }
    trained = max(value for key, value in difference.items() if ".lora_guard." not in key)
    # Adam turns rounding-level gradients into lr-sized steps; in lora_A they lie in directions P projects out,
    # so the effective update s (B A - B0 A0) P agrees much more closely than the raw lora_A
    reloaded = PeftModel.from_pretrained(make_llama(tokenizer), out / "adapter")
    deltas, reference_deltas = _delta_weights(reloaded), _delta_weights(reference_model)
    assert deltas.keys() == reference_deltas.keys() and len(deltas) == 2 * len(LLAMA_TARGETS)
    delta_difference = max(float((deltas[name] - value).abs().max()) for name, value in reference_deltas.items())
    delta_scale = max(float(value.abs().max()) for value in reference_deltas.values())
    print(
        f"adapter, 2-process vs single-process: max |difference| lora_A/lora_B {trained:.2e} (training moved them "
        f"{results[0]['adapter_moved']:.2e}), GuardSpace buffers "
        f"{max(value for key, value in difference.items() if '.lora_guard.' in key):.2e}, effective update "
        f"{delta_difference:.2e} (largest entry {delta_scale:.2e})"
    )
    for key, value in reference.items():
        assert torch.allclose(saved[key], value, rtol=1e-4, atol=1e-5), (key, difference[key])
    assert delta_difference <= 1e-4 * delta_scale
