"""The LoRA factors of the adapters to fuse, per adapted layer ("site"), GuardSpace adapters included.

A plain LoRA adapter contributes ``(A, B, s)``: ``A`` ``(r, n)``, ``B`` ``(m, r)``, scaling ``s``; its update is
``s B A``. A GuardSpace adapter contributes its exact vanilla export ``(A', B', s)`` of rank ``2r``
(``A' = [A P; -A0 P]``, ``B' = [B, B0]``) and its projector ``P``: the fusion right-multiplies whatever it forms
from ``A'`` (masked, pruned, rescaled) by ``P`` again, so the fused adapter keeps ``A'``'s null-space guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

if TYPE_CHECKING:
    from ..guardspace.layer import GuardState


@dataclass
class AdapterFactors:
    """Detached fp32 factors of one adapter at one site."""

    lora_A: torch.Tensor  # (r, n)
    lora_B: torch.Tensor  # (m, r)
    scaling: float
    guard: GuardState | None = None  # a GuardSpace adapter's state (its projector ``P``); ``None``: plain LoRA

    @property
    def guarded(self) -> bool:
        return self.guard is not None

    def project(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix @ P`` for a ``(rows, n)`` matrix in ``O(rows n k)`` (``matrix`` itself for plain LoRA);
        differentiable, so mask gradients flow through it."""
        return matrix if self.guard is None else self.guard.project(matrix)


@dataclass
class Site:
    """One adapted layer: its module, its name in the LoRA model, and the factors of each adapter."""

    name: str
    module: LoraLayer
    factors: dict[str, AdapterFactors]


def adapter_factors(layer: LoraLayer, adapter: str) -> AdapterFactors:
    """The (exported, for GuardSpace) factors of ``adapter`` in ``layer``."""
    guard = getattr(layer, "lora_guard", None)
    state = None
    if guard is not None and adapter in guard:
        from ..guardspace.export import lora_factors

        lora_A, lora_B = lora_factors(layer, adapter)
        state = guard[adapter]
    else:
        lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    scaling = float(layer.scaling[adapter])
    return AdapterFactors(lora_A.detach().float(), lora_B.detach().float(), scaling, state)


def find_sites(model: nn.Module, adapters: list[str]) -> tuple[list[Site], dict[str, list[str]]]:
    """Sites holding at least one of ``adapters`` (linear LoRA layers only), and per adapter its site names.

    Args:
        model: the LoRA model's wrapped model (``LoraModel.model``).
        adapters: adapter names (the reference adapter, if any, included).
    """
    sites: list[Site] = []
    per_adapter: dict[str, list[str]] = {adapter: [] for adapter in adapters}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        present = [adapter for adapter in adapters if adapter in module.lora_A]
        if not present:
            continue
        for adapter in present:
            if not isinstance(module.lora_A[adapter], nn.Linear):
                kind = type(module.lora_A[adapter]).__name__
                raise ValueError(f"SOMF fuses linear LoRA layers only; {name} holds a {kind} adapter {adapter!r}.")
            per_adapter[adapter].append(name)
        sites.append(Site(name, module, {adapter: adapter_factors(module, adapter) for adapter in present}))
    return sites, per_adapter
