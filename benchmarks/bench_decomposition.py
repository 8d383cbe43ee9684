"""Time and peak memory of the GuardSpace init decomposition for one large synthetic layer (CPU or GPU).

Per layer shape ``(m, n)`` (out x in) it times the three steps of the init, on a random weight and the covariance
of ``tokens`` random activations (rank-deficient when ``tokens < n``, as with real calibration sets):

* ``eigh``: one full eigen-decomposition of ``C`` (``covariance_spectrum``) and the null-space basis taken from it
  (``null_space_basis``);
* ``damp``: ``C~ = C + d mean(diag C) I``, inverted through that spectrum (doubling rule,
  ``damp_covariance_spectral``);
* ``svd``: the product ``W C~`` and its ``r`` smallest singular triplets (``smallest_component_init``, partial
  method).

``damp`` and ``eigh`` are per input site (shared by q/k/v or gate/up), ``svd`` per module. Each shape runs in its
own subprocess so that the peak resident memory (``ru_maxrss``, CPU) or ``max_memory_allocated`` (CUDA) is its own.

    python benchmarks/bench_decomposition.py                      # n = 4096 and n = 11008 (Llama-2-7B shapes)
    python benchmarks/bench_decomposition.py --shapes 4096x4096 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

DEFAULT_SHAPES = ["4096x4096", "4096x11008"]  # q_proj (n = 4096) and down_proj (n = 11008) of Llama-2-7B


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(m: int, n: int, tokens: int, r: int, device: str) -> dict:
    from peft_safety.guardspace.decomposition import (
        covariance_spectrum,
        damp_covariance_spectral,
        null_space_basis,
        smallest_component_init,
    )

    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(m, n, generator=generator) / n**0.5).to(device)
    activations = torch.randn(tokens, n, generator=generator, dtype=torch.float64).to(device)
    covariance = activations.T @ activations / tokens
    del activations
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _rss_mib()
    timings = {}
    _sync(device)
    start = time.perf_counter()
    spectrum = covariance_spectrum(covariance)
    basis = null_space_basis(None, spectrum=spectrum)
    _sync(device)
    timings["eigh_s"] = time.perf_counter() - start
    start = time.perf_counter()
    damped = damp_covariance_spectral(covariance, spectrum)
    _sync(device)
    timings["damp_s"] = time.perf_counter() - start
    start = time.perf_counter()
    smallest_component_init(weight, damped.damped, damped.solve_rows, r, 2.0)
    _sync(device)
    timings["svd_s"] = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mib()
    )  # CPU: whole-process peak RSS
    return dict(
        shape=f"{m}x{n}",
        tokens=tokens,
        r=r,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        threads=torch.get_num_threads(),
        damping=damped.damping,
        null_dim=basis.null_dim,
        total_s=sum(timings.values()),
        **timings,
        peak_mib=peak,
        rss_before_mib=rss_before,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="layer shapes as OUTxIN")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens behind the covariance")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        m, n = (int(v) for v in args.shapes[0].split("x"))
        print(json.dumps(run_one(m, n, args.tokens, args.r, args.device)))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, device {args.device}")
    print(f"{'shape':>11} {'damp s':>8} {'svd s':>8} {'eigh s':>8} {'total s':>8} {'peak MiB':>9} {'null k':>7}")
    for shape in args.shapes:
        command = [sys.executable, __file__, "--one", "--shapes", shape, "--tokens", str(args.tokens)]
        command += ["--r", str(args.r), "--device", args.device]
        row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(
            f"{row['shape']:>11} {row['damp_s']:8.2f} {row['svd_s']:8.2f} {row['eigh_s']:8.2f} "
            f"{row['total_s']:8.2f} {row['peak_mib']:9.0f} {row['null_dim']:7d}"
        )


if __name__ == "__main__":
    main()
