"""``SafetyMasks``: the learned logits, the deployed (final) masks derived from them, save/load and a summary.

Logits are stored per site and LoRA matrix with the matrix's shape (``(r, n)`` for ``lora_A``, ``(m, r)`` for
``lora_B``) under ``"{site}.lora_A"`` / ``"{site}.lora_B"`` for a mask shared by all adapters, and under
``"{site}.lora_A@{adapter}"`` for per-adapter masks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

from .._files import atomic_save_file

FORMAT_VERSION = "1"


def mask_key(site: str, side: str, adapter: str | None) -> str:
    """Key of the logits of ``lora_{side}`` at ``site`` (``adapter=None``: shared mask)."""
    return f"{site}.lora_{side}" if adapter is None else f"{site}.lora_{side}@{adapter}"


def parse_key(key: str) -> tuple[str, str, str | None]:
    """Inverse of `mask_key()`: ``(site, side, adapter or None)``."""
    name, _, adapter = key.partition("@")
    site, _, matrix = name.rpartition(".")
    return site, matrix[-1], adapter or None


@dataclass
class SafetyMasks:
    """Mask logits of a SOMF fit plus what is needed to reproduce the deployed mask.

    Attributes:
        logits: ``{key: float32 tensor of the LoRA matrix's shape}`` (see `mask_key()`).
        adapters: adapter names the masks were learned for, in order.
        config: the ``SOMFConfig`` as a dict (temperature, rescale, final mask, budget, seed, ...).
        history: losses recorded by the fit (``safety_loss_before``, ``safety_loss_relaxed``,
            ``safety_loss_deployed``, per-step ``loss``).
    """

    logits: dict[str, torch.Tensor]
    adapters: list[str]
    config: dict[str, Any]
    history: dict[str, Any] = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        return bool(self.config.get("shared_mask", True))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(value.shape) for key, value in self.logits.items()}

    # ----------------------------------------------------------------------------------------------- final mask
    def final(self, mode: str | None = None) -> dict[str, torch.Tensor]:
        """The deployed masks ``{key: tensor}`` in ``[0, 1]`` (before the optional ``1/mean`` rescale).

        ``expected``: ``sigmoid(l)``; ``threshold``: ``1[l > 0]``; ``budget``: ``1`` except the
        ``floor(revert_budget * N)`` lowest logits over all ``N`` entries (ties by position), which are ``0``;
        ``bernoulli``: ``m ~ Bernoulli(sigmoid(l))`` drawn with ``seed``.
        """
        mode = mode or self.config.get("final_mask", "expected")
        if mode == "expected":
            return {key: torch.sigmoid(value) for key, value in self.logits.items()}
        if mode == "threshold":
            return {key: (value > 0).float() for key, value in self.logits.items()}
        if mode == "bernoulli":
            # drawn in sorted key order: the same masks whatever the order of ``logits`` (a loaded file's is sorted)
            generator = torch.Generator().manual_seed(int(self.config.get("seed", 0)))
            drawn = {
                key: torch.bernoulli(torch.sigmoid(self.logits[key].float().cpu()), generator=generator)
                for key in sorted(self.logits)
            }
            return {key: drawn[key].to(value.device) for key, value in self.logits.items()}
        if mode == "budget":
            return self._budget_masks(float(self.config.get("revert_budget", 0.0)))
        raise ValueError(f"Unknown final mask mode {mode!r}.")

    def _budget_masks(self, budget: float) -> dict[str, torch.Tensor]:
        keys = sorted(self.logits)  # canonical order: ties resolve the same way after save/load
        flat = torch.cat([self.logits[key].reshape(-1) for key in keys])
        count = int(budget * flat.numel())
        keep = torch.ones_like(flat)
        if count > 0:
            order = torch.sort(flat, stable=True).indices  # deterministic: ties resolved by position
            keep[order[:count]] = 0.0
        masks, offset = {}, 0
        for key in keys:
            value = self.logits[key]
            masks[key] = keep[offset : offset + value.numel()].view_as(value)
            offset += value.numel()
        return {key: masks[key] for key in self.logits}

    # ---------------------------------------------------------------------------------------------- reporting
    def kept_fraction(self, mode: str | None = None) -> dict[str, dict[str, float]]:
        """Mean deployed mask per site (``lora_A`` and ``lora_B`` together) and per adapter."""
        masks = self.final(mode)
        per_site: dict[str, list[float]] = {}
        per_adapter: dict[str, list[float]] = {adapter: [0.0, 0.0] for adapter in self.adapters}
        for key, mask in masks.items():
            site, _, owner = parse_key(key)
            kept = float(mask.sum())
            total = per_site.setdefault(site, [0.0, 0.0])
            total[0] += kept
            total[1] += mask.numel()
            for adapter in self.adapters if owner is None else [owner]:
                per_adapter[adapter][0] += kept
                per_adapter[adapter][1] += mask.numel()
        return {
            "per_layer": {site: kept / count for site, (kept, count) in per_site.items()},
            "per_adapter": {adapter: kept / max(count, 1) for adapter, (kept, count) in per_adapter.items()},
        }

    def summary(self) -> str:
        """Kept fraction per layer and per adapter, and the safety loss before/after, as text."""
        kept = self.kept_fraction()
        lines = [f"SOMF masks for {self.adapters} (final mask: {self.config.get('final_mask')})"]
        for name in ("safety_loss_before", "safety_loss_relaxed", "safety_loss_deployed"):
            if name in self.history:
                lines.append(f"  {name}: {self.history[name]:.4f}")
        lines.append(
            "  kept fraction per adapter: " + ", ".join(f"{a}={v:.4f}" for a, v in kept["per_adapter"].items())
        )
        lines.append("  kept fraction per layer:")
        lines.extend(f"    {site}: {value:.4f}" for site, value in kept["per_layer"].items())
        return "\n".join(lines)

    def __repr__(self) -> str:
        final = self.config.get("final_mask")
        return f"SafetyMasks(adapters={self.adapters}, keys={len(self.logits)}, final_mask={final})"

    # ------------------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file: the logits, and adapters/config/history as JSON metadata."""
        metadata = {
            "format": "pt",
            "peft_safety_somf": FORMAT_VERSION,
            "adapters": json.dumps(self.adapters),
            "config": json.dumps(self.config),
            "history": json.dumps(self.history),
        }
        atomic_save_file({key: value.contiguous() for key, value in self.logits.items()}, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SafetyMasks:
        """Read masks written by [`save()`][peft_safety.SafetyMasks.save].

        Raises ``ValueError`` naming the file for anything else.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SOMF masks file '{path}' does not exist. Save masks with SafetyMasks.save().")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                logits = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as err:  # safetensors raises several error types for foreign or truncated files
            raise ValueError(f"'{path}' is not a safetensors file written by peft_safety ({err}).") from err
        if "peft_safety_somf" not in metadata:
            raise ValueError(f"{path} is not a SOMF masks file (no 'peft_safety_somf' metadata).")
        try:
            masks = cls(
                logits=logits,
                adapters=json.loads(metadata["adapters"]),
                config=json.loads(metadata["config"]),
                history=json.loads(metadata.get("history", "{}")),
            )
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"'{path}' holds a damaged SOMF masks header ({err!r}).") from err
        bad = [key for key, value in logits.items() if not bool(torch.isfinite(value).all())]
        if bad:
            raise ValueError(f"'{path}' holds NaN or Inf mask logits (e.g. {bad[0]}); learn the masks again.")
        return masks

    def check_compatible(self, adapters: list[str], expected_shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise ``ValueError`` unless these masks were learned for ``adapters`` with exactly these logit shapes."""
        if list(adapters) != list(self.adapters):
            raise ValueError(f"These masks were learned for adapters {self.adapters}, not for {list(adapters)}.")
        shapes = self.shapes()
        if shapes.keys() != expected_shapes.keys():
            missing = sorted(expected_shapes.keys() - shapes.keys())[:3]
            extra = sorted(shapes.keys() - expected_shapes.keys())[:3]
            raise ValueError(f"These masks do not match the adapters' layers (missing {missing}, unexpected {extra}).")
        for key, shape in expected_shapes.items():
            if shapes[key] != tuple(shape):
                raise ValueError(f"Mask shape mismatch at {key}: masks have {shapes[key]}, the adapters need {shape}.")
