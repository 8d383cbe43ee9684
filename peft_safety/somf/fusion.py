"""Masked fusion of LoRA factors, and forward hooks that run the model with the fused adapter.

For adapter ``i`` at one site, with scaling ``s_i``, weight ``w_i`` and an optional reference (safe) adapter with
factors ``A_ref``, ``B_ref`` and scaling ``s_ref``, the task vectors are
``tau_i^A = A_i - sqrt(s_ref / s_i) A_ref`` (``(r, n)``) and likewise for ``B`` (``(m, r)``); the fused factors of
scaling 1 are

    A = sqrt(s_ref) A_ref + Merge_A({tau~_i^A}),   B = sqrt(s_ref) B_ref + Merge_B({tau~_i^B}),
    tau~_i = (m_i * tau_i) / mean(m_i)   (the division only with ``rescale``),

where ``Merge`` weighs ``lora_A`` by ``sign(w_i s_i) sqrt|w_i s_i|`` and ``lora_B`` by ``sqrt|w_i s_i|``. Without a
reference this is exactly ``add_weighted_adapter`` applied to masked adapters; with ``m = 1`` it is the unmasked
merge. A reverted entry (``m = 0``) falls back to the reference (or to zero, i.e. the aligned base).

GuardSpace adapters (and a GuardSpace reference) enter with their exported factors ``A' = [A P; -A0 P]``, whose
rows lie in the null space of the adapter's calibration activations. Masking, rescaling, pruning or DARE drops
entry by entry take rows out of it, so on the ``lora_A`` side every part of the merge that comes from a GuardSpace
adapter's ``A'`` is right-multiplied by that adapter's projector ``P`` again (``O(r n k)``, via the stored basis),
in the relaxed training forward and in the deployed merge alike:

    linear / cat:   tau~_i^A = (m * A'_i) P_i / mean(m)  (minus ``sqrt(s_ref / s_i) (m * A_ref) P_ref`` with a
                    reference; ``P = I`` for plain LoRA), then ``Merge_A`` as above;
    ties, dare_*, magnitude_prune:   Merge_A = sum_i (c_i * tau~_i^A) P_i, ``c_i`` the method's entrywise choices
                    (`Combination.coefficients()`).

Every fused term ``B_j (A'_i P_i)`` then vanishes on adapter ``i``'s calibration span, whatever the mask. A merge
of plain LoRA adapters only takes none of these steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .combinations import Combination
from .masks import mask_key
from .relaxed import concrete_masked
from .sites import AdapterFactors, Site

MODES = ("relaxed", "unmasked", "deployed")


class MaskedFusion:
    """Computes fused factors per site from the adapters' factors and masks; hooks them into the model.

    Args:
        sites: from `find_sites()`.
        adapters: the ``k`` adapters to fuse (not the reference).
        weights: ``k`` combination weights.
        combination: a registered `Combination`.
        density: density of ties/dare/magnitude_prune.
        majority_sign_method: ``"total"`` or ``"frequency"``.
        reference: name of the safe adapter, or ``None``.
        shared: one mask for all adapters.
        temperature, rescale: Concrete temperature and ``1/mean(m)`` rescale.
        seed: seed of the DARE drops of the deployed merge.

    ``noise_seed`` seeds the Concrete noise and the DARE drops of the next forward pass (the merger sets it per
    micro-batch); each logit tensor draws its noise from ``(noise_seed, its index)``, so the backward pass can
    draw it again instead of storing the mask (see `peft_safety.somf.relaxed`).
    """

    def __init__(
        self,
        sites: list[Site],
        adapters: list[str],
        weights: list[float],
        combination: Combination,
        density: float | None,
        majority_sign_method: str,
        reference: str | None,
        shared: bool,
        temperature: float,
        rescale: bool,
        seed: int = 0,
    ) -> None:
        self.sites, self.adapters, self.weights = sites, adapters, weights
        self.combination, self.density, self.majority = combination, density, majority_sign_method
        self.reference, self.shared = reference, shared
        self.temperature, self.rescale, self.seed = temperature, rescale, seed
        self.mode = "unmasked"
        self.logits: dict[str, torch.Tensor] = {}
        self.deployed: dict[str, torch.Tensor] = {}
        self.noise_seed = seed
        self._key_index: dict[str, int] = {}
        self._linear_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

    # --------------------------------------------------------------------------------------------------- masks
    def logit_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the logits this fusion needs (see `mask_key()`)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for site in self.sites:
            for side in ("A", "B"):
                owners = [None] if self.shared else self.adapters
                for owner in owners:
                    factors = site.factors[self.adapters[0] if owner is None else owner]
                    shapes[mask_key(site.name, side, owner)] = tuple(getattr(factors, f"lora_{side}").shape)
        return shapes

    def logit_devices(self) -> dict[str, torch.device]:
        """Device of each logit tensor: that of the LoRA factors it masks (sites may sit on different devices)."""
        devices: dict[str, torch.device] = {}
        for site in self.sites:
            device = next(iter(site.factors.values())).lora_A.device
            for side in ("A", "B"):
                for owner in [None] if self.shared else self.adapters:
                    devices[mask_key(site.name, side, owner)] = device
        return devices

    def init_logits(self, value: float) -> dict[str, nn.Parameter]:
        """Fresh trainable logits, all equal to ``value``, each on the device of the factors it masks."""
        shapes, devices = self.logit_shapes(), self.logit_devices()
        self.logits = {
            key: nn.Parameter(torch.full(shape, float(value), device=devices[key])) for key, shape in shapes.items()
        }
        self._key_index = {key: index for index, key in enumerate(shapes)}
        return self.logits

    def set_deployed(self, masks: dict[str, torch.Tensor]) -> None:
        """Use ``masks`` (``{key: tensor}``, e.g. [`SafetyMasks.final()`][peft_safety.SafetyMasks.final], on any
        device) as the deployed masks, each moved to the device of the factors it masks."""
        devices = self.logit_devices()
        self.deployed = {key: mask.to(devices.get(key, mask.device)) for key, mask in masks.items()}

    def _apply_mask(self, values: torch.Tensor, key: str, mode: str, noise_seed: int) -> torch.Tensor:
        """``values`` under ``mode``: unchanged, times the deployed mask, or times a relaxed sample (each divided by
        the mask's mean with ``rescale``)."""
        if mode == "unmasked":
            return values
        if mode == "deployed":
            mask = self.deployed[key]
            return values * (mask / mask.mean().clamp_min(1e-6) if self.rescale else mask)
        seed = (noise_seed * 1_000_003 + self._key_index[key]) % 2**63
        return concrete_masked(values, self.logits[key], seed, self.temperature, self.rescale)

    # -------------------------------------------------------------------------------------------------- fusion
    def fused_factors(
        self, site: Site, site_index: int, mode: str | None = None, noise_seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the fused adapter at ``site`` (scaling 1) under ``mode`` and ``noise_seed`` (default: the
        fusion's current ones)."""
        mode = self.mode if mode is None else mode
        noise_seed = self.noise_seed if noise_seed is None else noise_seed
        scalings = [site.factors[adapter].scaling for adapter in self.adapters]
        ref = site.factors.get(self.reference) if self.reference else None
        fused = []
        for side_index, side in enumerate(("A", "B")):
            if side == "A" and any(factors.guarded for factors in site.factors.values()):
                fused.append(self._fused_guarded_A(site, site_index, ref, mode, noise_seed))
                continue
            if self.combination.name == "linear" and (self.shared or mode == "unmasked"):
                fused.append(self._fused_linear(site, side, ref, mode, noise_seed))
                continue
            tasks = [
                self._apply_mask(
                    self._task_vector(site, adapter, side, ref),
                    mask_key(site.name, side, None if self.shared else adapter),
                    mode,
                    noise_seed,
                )
                for adapter in self.adapters
            ]
            weights = self.combination.side_weights(self.weights, scalings, side)
            merged = self._combine(tasks, weights, site_index, side_index, noise_seed, side)
            if ref is not None:
                merged = merged + ref.scaling**0.5 * getattr(ref, f"lora_{side}")
            fused.append(merged)
        return fused[0], fused[1]

    def _fused_guarded_A(self, site: Site, site_index: int, ref, mode: str, noise_seed: int) -> torch.Tensor:
        """Fused ``lora_A`` (scaling 1; ``(r, n)``, ``(sum r_i, n)`` for cat) at a site holding a GuardSpace adapter
        (or reference): each adapter's masked ``A'`` (and masked reference part) right-multiplied by its own
        projector, after the masking and, for selective methods, after the method's entry choices."""
        scalings = [site.factors[adapter].scaling for adapter in self.adapters]
        weights = self.combination.side_weights(self.weights, scalings, "A")
        parts: list[list[tuple[torch.Tensor, float, AdapterFactors]]] = []  # per adapter: (masked, coefficient, owner)
        for adapter in self.adapters:
            factors = site.factors[adapter]
            key = mask_key(site.name, "A", None if self.shared else adapter)
            terms = [(self._apply_mask(factors.lora_A, key, mode, noise_seed), 1.0, factors)]
            if ref is not None:  # the same key and seed draw the same mask sample for the reference part
                masked_ref = self._apply_mask(ref.lora_A, key, mode, noise_seed)
                terms.append((masked_ref, -((ref.scaling / factors.scaling) ** 0.5), ref))
            parts.append(terms)
        if not self.combination.selective:  # linear in each task tensor: project the masked parts, then combine
            tasks = [sum(scale * owner.project(masked) for masked, scale, owner in terms) for terms in parts]
            merged = self._combine(tasks, weights, site_index, 0, noise_seed, "A")
        else:  # pick entries on the masked tasks, then project each adapter's picked part
            with torch.no_grad():
                tasks = [sum(scale * masked for masked, scale, _ in terms) for terms in parts]
            generator = _generator(tasks[0].device, noise_seed * 100_003 + 2 * site_index)
            coefficients = self.combination.coefficients(tasks, weights, self.density, self.majority, generator)
            merged = sum(
                scale * owner.project(coefficient * masked)
                for terms, coefficient in zip(parts, coefficients, strict=True)
                for masked, scale, owner in terms
            )
        if ref is not None:
            merged = merged + ref.scaling**0.5 * ref.lora_A
        return merged

    def _combine(
        self, tasks: list[torch.Tensor], weights: torch.Tensor, site_index: int, side_index: int, noise_seed: int, side
    ) -> torch.Tensor:
        """``combination.combine`` with the DARE drops drawn from a local generator seeded with ``(noise_seed, site,
        side)``: the global CPU and CUDA random states are left untouched."""
        if not self.combination.random:
            return self.combination.combine(tasks, weights, self.density, side, self.majority)
        generator = _generator(tasks[0].device, noise_seed * 100_003 + 2 * site_index + side_index)
        return self.combination.combine_seeded(tasks, weights, self.density, side, self.majority, generator)

    @staticmethod
    def _task_vector(site: Site, adapter: str, side: str, ref) -> torch.Tensor:
        """``tau_i = F_i - sqrt(s_ref / s_i) F_ref`` for ``F = lora_{side}`` (``F_i`` itself without a reference)."""
        factors = site.factors[adapter]
        task = getattr(factors, f"lora_{side}")
        if ref is None:
            return task
        return task - (ref.scaling / factors.scaling) ** 0.5 * getattr(ref, f"lora_{side}")

    def _fused_linear(self, site: Site, side: str, ref, mode: str, noise_seed: int) -> torch.Tensor:
        """Linear merge with one shared mask: ``C + (m / mean(m)) * sum_i w_i tau_i``, the weighted sum (and the
        reference part ``C``) computed once and cached: a relaxed mask then adds nothing to the autograd graph but
        the fused factor itself (memory)."""
        key = (site.name, side)
        if key not in self._linear_cache:
            with torch.no_grad():
                tasks = [self._task_vector(site, adapter, side, ref) for adapter in self.adapters]
                scalings = [site.factors[adapter].scaling for adapter in self.adapters]
                weights = self.combination.side_weights(self.weights, scalings, side)
                combined = self.combination.combine(tasks, weights, None, side, self.majority)
                offset = None if ref is None else ref.scaling**0.5 * getattr(ref, f"lora_{side}")
            self._linear_cache[key] = (combined, offset)
        combined, offset = self._linear_cache[key]
        combined = self._apply_mask(combined, mask_key(site.name, side, None), mode, noise_seed)
        return combined if offset is None else combined + offset

    # --------------------------------------------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def hooked(self, lora_model: nn.Module) -> Iterator[None]:
        """Run ``lora_model`` as ``base + fused adapter``: its own adapters disabled, one hook per site."""
        handles = []
        for index, site in enumerate(self.sites):
            handles.append(site.module.register_forward_hook(self._hook(site, index)))
        lora_model.disable_adapter_layers()
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            lora_model.enable_adapter_layers()

    def _hook(self, site: Site, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if self.mode == "relaxed" and torch.is_grad_enabled():
                # Recompute the fused factors in the backward pass instead of keeping them (and the merge's
                # intermediates) in the graph: mask learning then stores little more than plain LoRA training.
                delta = checkpoint(self._delta, x, site, index, self.mode, self.noise_seed, use_reentrant=False)
            else:
                delta = self._delta(x, site, index, self.mode, self.noise_seed)
            return output + delta.to(device=output.device, dtype=output.dtype)

        return hook

    def _delta(self, x: torch.Tensor, site: Site, index: int, mode: str, noise_seed: int) -> torch.Tensor:
        """``x A^T B^T`` for the fused ``(A, B)`` at ``site``; ``x`` is ``(..., n)``, the result ``(..., m)``."""
        lora_A, lora_B = self.fused_factors(site, index, mode, noise_seed)
        return F.linear(F.linear(x.to(device=lora_A.device, dtype=lora_A.dtype), lora_A), lora_B)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed`` (reduced to the generator's seed range)."""
    return torch.Generator(device=device).manual_seed(seed % 2**63)
