"""Per-layer report of a GuardSpace adapter: null-space size, dead layers and the leakage certificate.

The leakage of a layer is the mean squared change of its output on the calibration inputs, relative to the base
layer's own mean squared output on them:

    leakage = tr(dW C dW^T) / tr(W C W^T) = sum_j lambda_j ||dW n_j||^2 / tr(W C W^T),

an identity over the stored leaking eigenpairs ``(lambda_j, n_j)`` of the calibration covariance ``C`` (exact-null
directions contribute nothing), computed in ``O(r n j)`` from the adapter alone: no data, no forward pass. The
same ratio with any other second moment ``C'`` (e.g. statistics collected on held-out harmful prompts) says how
much the protection carries over to inputs that were not in the calibration set; that needs ``C'`` and the base
weight (``O(m n^2)`` per layer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..statistics import SafetyStatistics
from .decomposition import output_energy


@dataclass(frozen=True)
class LayerReport:
    """One adapted layer. ``null_dim`` is ``k``; ``k == 0`` means the adapter cannot learn (dead).

    ``leaking_dims``: kept null directions that calibration inputs touch (0 on an exact null space).
    ``leakage_energy``: ``tr(dW C dW^T)``; ``output_energy``: ``tr(W C W^T)``; ``leakage``: their ratio.
    ``heldout_leakage``: the same ratio on the statistics passed as ``heldout_statistics`` (else ``None``).
    """

    name: str
    in_features: int
    out_features: int
    r: int
    null_dim: int
    leaking_dims: int
    singular_values: tuple[float, ...]
    leakage_energy: float
    output_energy: float
    heldout_leakage: float | None = None

    @property
    def dead(self) -> bool:
        return self.null_dim == 0

    @property
    def leakage(self) -> float:
        """Relative mean squared output change on the calibration inputs (NaN for adapters saved by 0.1)."""
        return self.leakage_energy / self.output_energy if self.output_energy > 0 else math.nan


@dataclass(frozen=True)
class GuardSpaceReport:
    adapter_name: str
    layers: tuple[LayerReport, ...]

    @property
    def dead_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.dead]

    @property
    def total_leakage(self) -> float:
        """``sum tr(dW C dW^T) / sum tr(W C W^T)`` over all layers."""
        energy = sum(layer.output_energy for layer in self.layers)
        return sum(layer.leakage_energy for layer in self.layers) / energy if energy > 0 else math.nan

    @property
    def max_leakage(self) -> float:
        return max(layer.leakage for layer in self.layers)

    @property
    def max_heldout_leakage(self) -> float | None:
        values = [layer.heldout_leakage for layer in self.layers if layer.heldout_leakage is not None]
        return max(values) if values else None

    def certificate(self) -> dict:
        """``{"total": ..., "layers": {name: leakage}}`` as saved with adapters (``None`` where unknown)."""
        layers = {layer.name: _finite(layer.leakage) for layer in self.layers}
        return {"total": _finite(self.total_leakage), "layers": layers}

    def to_dict(self) -> dict:
        return {
            "adapter_name": self.adapter_name,
            "dead_layers": self.dead_layers,
            "total_leakage": _finite(self.total_leakage),
            "max_leakage": _finite(self.max_leakage),
            "max_heldout_leakage": self.max_heldout_leakage,
            "layers": [
                {**asdict(layer), "singular_values": list(layer.singular_values), "leakage": _finite(layer.leakage)}
                for layer in self.layers
            ],
        }

    def __str__(self) -> str:
        width = max((len(layer.name) for layer in self.layers), default=5)
        heldout = self.max_heldout_leakage is not None
        lines = [
            f"GuardSpace adapter '{self.adapter_name}': {len(self.layers)} layers, "
            f"{len(self.dead_layers)} dead (k = 0), calibration leakage {self.total_leakage:.2e} in total, "
            f"{self.max_leakage:.2e} at most",
            f"{'layer':<{width}}  {'in':>6} {'out':>6} {'r':>4} {'k':>6} {'leaking':>7} {'leakage':>9}"
            + (f" {'held-out':>9}" if heldout else "")
            + "  kept singular values (largest..smallest)",
        ]
        for layer in self.layers:
            values = ", ".join(f"{v:.3g}" for v in layer.singular_values)
            extra = f" {layer.heldout_leakage:>9.2e}" if heldout else ""
            lines.append(
                f"{layer.name:<{width}}  {layer.in_features:>6} {layer.out_features:>6} {layer.r:>4} "
                f"{layer.null_dim:>6} {layer.leaking_dims:>7} {layer.leakage:>9.2e}{extra}  [{values}]"
            )
        return "\n".join(lines)


def _finite(value: float) -> float | None:
    """JSON-safe: NaN (no certificate, e.g. an adapter saved before it existed) becomes ``None``."""
    return None if math.isnan(value) else value


@torch.no_grad()
def leakage_energy(layer: nn.Module, adapter_name: str) -> float:
    """``tr(dW C dW^T)`` of ``adapter_name`` in ``layer`` (a GuardSpace layer), from its stored eigenpairs."""
    from .layer import GuardSpaceVariant

    trained_A, frozen_A, lora_B, _ = GuardSpaceVariant.factors(layer, adapter_name)
    state = layer.lora_guard[adapter_name]
    return float(state.leakage(trained_A, frozen_A, lora_B, layer.scaling[adapter_name]))


@torch.no_grad()
def heldout_leakage(layer: nn.Module, adapter_name: str, covariance: torch.Tensor, energy: float) -> float:
    """``tr(dW C' dW^T) / energy`` for a second moment ``C'`` (``(n, n)``) of other inputs of ``layer``.

    Through the rank-``2r`` factors ``dW = s [B, B0] [A_eff P; -A0_eff P]``:
    ``tr(dW C' dW^T) = s^2 tr((B'^T B') (A'' C' A''^T))``, ``O(r n^2 + r^2 m)``. ``energy`` is ``tr(W C' W^T)``.
    """
    from .layer import GuardSpaceVariant

    trained_A, frozen_A, lora_B, frozen_B = GuardSpaceVariant.factors(layer, adapter_name)
    stacked_A = torch.cat([trained_A, -frozen_A]).double()  # (2r, n)
    stacked_B = torch.cat([lora_B, frozen_B], dim=1).double()  # (m, 2r)
    inner = stacked_A @ covariance.to(stacked_A.device, torch.float64) @ stacked_A.T
    moved = layer.scaling[adapter_name] ** 2 * float((stacked_B.T @ stacked_B * inner).sum())
    return moved / energy if energy > 0 else math.nan


def _base_energy(layer: nn.Module, covariance: torch.Tensor) -> float:
    """``tr(W C' W^T)`` of the (unmerged, dequantised) base weight."""
    from .initialization import _float_weight

    weight = _float_weight(layer)
    return float(output_energy(weight, covariance.to(weight.device)))


def _adapted_root(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` or ``LoraModel`` (module names then match the statistics)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    if isinstance(model, PeftModel):
        model = model.base_model
    return model.model if isinstance(model, LoraModel) else model


def is_sharded(model: nn.Module, adapter_name: str) -> bool:
    """Whether ``adapter_name``'s live weights are shards (ZeRO-3 / FSDP): no certificate can be read from them."""
    return any(param.numel() == 0 for key, param in model.named_parameters() if f".{adapter_name}." in key)


def _heldout_energies(statistics: SafetyStatistics | None) -> dict[tuple[str, int], float]:
    """``tr(W C' W^T)`` per (module name, layer object id), cached on the statistics object: the base weight does
    not change while an adapter trains, so a callback pays the ``O(m n^2)`` product once per layer; the object id
    keeps the figures of two models apart when one statistics object serves both."""
    if statistics is None:
        return {}
    if not hasattr(statistics, "_base_energies"):
        statistics._base_energies = {}
    return statistics._base_energies


def guardspace_report(
    model: nn.Module, adapter_name: str = "default", heldout_statistics: SafetyStatistics | None = None
) -> GuardSpaceReport:
    """Report of ``adapter_name`` on a ``PeftModel`` (or its ``LoraModel``, or the adapted model), one row per
    GuardSpace layer.

    Args:
        model: the model holding the GuardSpace adapter.
        adapter_name: which adapter.
        heldout_statistics: optional [`SafetyStatistics`][peft_safety.SafetyStatistics] of the same model on other
            inputs (e.g. held-out harmful prompts, or the aligned model's answers): adds each layer's exact relative
            output change on them, ``tr(dW C' dW^T) / tr(W C' W^T)``.
    """
    rows = []
    energies = _heldout_energies(heldout_statistics)
    for target, module in _adapted_root(model).named_modules():
        if adapter_name not in getattr(module, "lora_guard", ()):
            continue
        state = module.lora_guard[adapter_name]
        heldout = None
        if heldout_statistics is not None:
            if target not in heldout_statistics.site_of:
                raise ValueError(
                    f"The held-out statistics do not cover '{target}'; collect them with the adapter's "
                    "target_modules on the same model."
                )
            if adapter_name in getattr(module, "merged_adapters", ()):
                raise ValueError(
                    f"'{target}' has adapter '{adapter_name}' merged into its weight: unmerge it "
                    "(peft_model.unmerge_adapter()) before reporting the held-out leakage."
                )
            covariance = heldout_statistics.covariance(target)
            key = (target, id(module))
            if key not in energies:
                energies[key] = _base_energy(module, covariance)
            heldout = heldout_leakage(module, adapter_name, covariance, energies[key])
        rows.append(
            LayerReport(
                name=target,
                in_features=module.in_features,
                out_features=module.out_features,
                r=module.r[adapter_name],
                null_dim=state.null_dim,
                leaking_dims=state.leak_values.numel(),
                singular_values=tuple(float(v) for v in state.singular_values),
                leakage_energy=leakage_energy(module, adapter_name),
                output_energy=float(state.output_energy),
                heldout_leakage=heldout,
            )
        )
    if not rows:
        raise ValueError(f"The model holds no GuardSpace adapter named '{adapter_name}'.")
    return GuardSpaceReport(adapter_name, tuple(rows))
