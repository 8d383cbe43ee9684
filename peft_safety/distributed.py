"""Multi-process helpers: checking that every rank holds the same statistics, and reading sharded weights.

``collect_safety_statistics`` shards the prompts across ranks and all-reduces the sums and counts, so every rank
should end with identical statistics; [`verify_statistics_across_ranks()`][peft_safety.verify_statistics_across_ranks]
checks it (one SHA-256 fingerprint per rank, gathered with ``all_gather_object``) before anything is initialised from
them.

[`full_weight()`][peft_safety.distributed.full_weight] reads a base weight that a distributed engine may have sharded:
DeepSpeed ZeRO-3 parameters are gathered with ``peft.utils.integrations.gather_params_ctx`` (a no-op without ZeRO-3)
and FSDP2 / tensor-parallel ``DTensor`` weights with ``full_tensor()`` (a collective: every rank must read the same
layers in the same order, which the GuardSpace init does). A weight that is still partitioned (ZeRO-3 outside the
gather, FSDP1 flat parameters) raises a clear error instead of producing a silently wrong init.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from peft.utils.integrations import dequantize_module_weight, gather_params_ctx
from torch import nn

from .statistics import SafetyStatistics


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def verify_statistics_across_ranks(statistics: SafetyStatistics, group=None) -> str:
    """Raise a ``RuntimeError`` on every rank unless all ranks hold identical statistics; return the fingerprint.

    Without ``torch.distributed`` (or with one process) it only returns the fingerprint.
    """
    fingerprint = statistics.fingerprint()
    if not _distributed():
        return fingerprint
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (fingerprint, statistics.num_tokens, statistics.num_prompts), group=group)
    if any(entry != gathered[0] for entry in gathered):
        differing = [rank for rank, entry in enumerate(gathered) if entry != gathered[0]]
        summary = ", ".join(f"rank {rank}: {fp[:12]} ({n} tokens)" for rank, (fp, n, _) in enumerate(gathered))
        raise RuntimeError(
            f"Safety statistics differ between ranks (ranks {differing} disagree with rank 0): {summary}. "
            "Every rank must use the same statistics, otherwise each initialises a different adapter and the "
            "projector (hence the guarantee) differs per rank. Collect them with collect_safety_statistics() "
            "called on every rank with the same prompts, or load one file saved by rank 0 on every rank."
        )
    return fingerprint


def _is_zero3_partitioned(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_id") and weight.numel() == 0


def _is_dtensor(weight: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(weight, DTensor)


@contextmanager
def full_weight(base_layer: nn.Module) -> Iterator[torch.Tensor]:
    """Yield the complete weight of ``base_layer`` as a plain tensor (dequantised for bitsandbytes layers).

    Gathers DeepSpeed ZeRO-3 partitions for the duration of the ``with`` block and all-gathers ``DTensor`` shards.

    Raises:
        RuntimeError: for a weight that is partitioned and cannot be gathered here (e.g. FSDP1 ``FlatParameter``
            views outside ``summon_full_params``).
    """
    weight = base_layer.weight
    with gather_params_ctx(weight):
        weight = base_layer.weight
        if _is_zero3_partitioned(weight):
            raise RuntimeError(
                f"The weight of {type(base_layer).__name__} is a DeepSpeed ZeRO-3 partition that was not gathered "
                "(deepspeed is not initialised with ZeRO-3 in this process?). Create the GuardSpace adapter before "
                "deepspeed.initialize / accelerator.prepare, or inside the ZeRO-3 context so it can be gathered."
            )
        if _is_dtensor(weight):
            weight = weight.full_tensor()
        elif weight.dim() != 2:
            raise RuntimeError(
                f"The weight of {type(base_layer).__name__} has shape {tuple(weight.shape)}, not a 2-D matrix: it "
                "looks sharded (FSDP1 flat parameter?). Create the GuardSpace adapter before wrapping the model "
                "with FSDP, or use FSDP2 (fully_shard), whose DTensor weights are gathered automatically."
            )
        if not weight.dtype.is_floating_point:
            weight = _dequantized(base_layer)
        yield weight


def _dequantized(base_layer: nn.Module) -> torch.Tensor:
    """PEFT's ``dequantize_module_weight``, leaving ``base_layer.weight`` the same parameter object.

    On CPU it replaces an 8-bit layer's ``Int8Params`` by a copy that lacks ``SCB`` once a forward pass has moved
    ``SCB`` into the layer's ``state``, and the next forward then fails inside bitsandbytes. The data is unchanged,
    so the original parameter is put back.
    """
    parameter = base_layer.weight
    try:
        return dequantize_module_weight(base_layer)
    finally:
        if base_layer.weight is not parameter:
            base_layer.weight = parameter
