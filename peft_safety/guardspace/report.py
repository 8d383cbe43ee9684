"""Per-layer report of a GuardSpace adapter: null-space size, kept singular values, dead layers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerReport:
    """One adapted layer. ``null_dim`` is ``k``; ``k == 0`` means the adapter cannot learn (dead)."""

    name: str
    in_features: int
    out_features: int
    r: int
    null_dim: int
    singular_values: tuple[float, ...]

    @property
    def dead(self) -> bool:
        return self.null_dim == 0


@dataclass(frozen=True)
class GuardSpaceReport:
    adapter_name: str
    layers: tuple[LayerReport, ...]

    @property
    def dead_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.dead]

    def to_dict(self) -> dict:
        return {
            "adapter_name": self.adapter_name,
            "dead_layers": self.dead_layers,
            "layers": [{**layer.__dict__, "singular_values": list(layer.singular_values)} for layer in self.layers],
        }

    def __str__(self) -> str:
        width = max((len(layer.name) for layer in self.layers), default=5)
        lines = [
            f"GuardSpace adapter '{self.adapter_name}': {len(self.layers)} layers, "
            f"{len(self.dead_layers)} dead (k = 0)",
            f"{'layer':<{width}}  {'in':>6} {'out':>6} {'r':>4} {'k':>6}  kept singular values (largest..smallest)",
        ]
        for layer in self.layers:
            values = ", ".join(f"{v:.3g}" for v in layer.singular_values)
            lines.append(
                f"{layer.name:<{width}}  {layer.in_features:>6} {layer.out_features:>6} {layer.r:>4} "
                f"{layer.null_dim:>6}  [{values}]"
            )
        return "\n".join(lines)


def guardspace_report(model: nn.Module, adapter_name: str = "default") -> GuardSpaceReport:
    """Report of ``adapter_name`` on a ``PeftModel`` (or its tuner / base model), one row per GuardSpace layer."""
    rows = []
    for name, module in model.named_modules():
        if adapter_name in getattr(module, "lora_guard", ()):
            state = module.lora_guard[adapter_name]
            rows.append(
                LayerReport(
                    name=name.removeprefix("base_model.model."),
                    in_features=module.in_features,
                    out_features=module.out_features,
                    r=module.r[adapter_name],
                    null_dim=state.null_dim,
                    singular_values=tuple(float(v) for v in state.singular_values),
                )
            )
    if not rows:
        raise ValueError(f"The model holds no GuardSpace adapter named '{adapter_name}'.")
    return GuardSpaceReport(adapter_name, tuple(rows))
