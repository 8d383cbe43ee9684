"""Registry of A/B-space combination methods (mergekit style): one small class per name, differentiable.

Every method fuses ``k`` task tensors of one LoRA matrix, ``T_i`` (``(r, n)`` for ``lora_A``, ``(m, r)`` for
``lora_B``), with per-adapter weights ``w_i`` (for ``lora_A``: ``sign(w s) sqrt|w s|``, for ``lora_B``:
``sqrt|w s|``, as in ``peft``'s ``add_weighted_adapter``). The discrete choices (top-k by magnitude, sign
election, DARE drops) are constants of the autograd graph; gradients reach the kept entries of every ``T_i``,
hence the mask logits: the mask trains *through* the merge. The arithmetic is ``peft.utils.merge_utils``, so an
all-ones mask reproduces ``add_weighted_adapter`` exactly.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from peft.utils import merge_utils

Side = Literal["A", "B"]
COMBINATIONS: dict[str, type[Combination]] = {}


def register_combination(cls: type[Combination]) -> type[Combination]:
    """Class decorator adding ``cls`` to `COMBINATIONS` under ``cls.name``."""
    COMBINATIONS[cls.name] = cls
    return cls


def get_combination(name: str) -> Combination:
    if name not in COMBINATIONS:
        raise ValueError(f"Unknown combination_type {name!r}; supported: {sorted(COMBINATIONS)}.")
    return COMBINATIONS[name]()


class Combination:
    """Base class. ``needs_density``: the method reads ``density``; ``equal_ranks``: all ``T_i`` share a shape."""

    name: ClassVar[str]
    needs_density: ClassVar[bool] = False
    equal_ranks: ClassVar[bool] = True
    random: ClassVar[bool] = False
    #: entrywise selection before the weighted sum (``"magnitude"`` top-k or ``"random"`` DARE drops), or ``None``
    prune_method: ClassVar[str | None] = None
    #: TIES sign election and disjoint mean after the selection
    elect_sign: ClassVar[bool] = False

    @property
    def selective(self) -> bool:
        """Whether the method picks entries of the task tensors (top-k, DARE drops, sign election)."""
        return self.prune_method is not None or self.elect_sign

    def side_weights(self, weights: list[float], scalings: list[float], side: Side) -> torch.Tensor:
        """``(k,)`` weights applied to the task tensors of ``side`` (``add_weighted_adapter``'s convention)."""
        values = []
        for weight, scaling in zip(weights, scalings, strict=True):
            product = weight * scaling
            sign = 1.0 if product >= 0 or side == "B" else -1.0
            values.append(sign * abs(product) ** 0.5)
        return torch.tensor(values)

    def combine(
        self, tasks: list[torch.Tensor], weights: torch.Tensor, density: float | None, side: Side, majority: str
    ) -> torch.Tensor:
        """Fuse ``tasks`` (``k`` tensors) into one tensor of the fused adapter's shape."""
        raise NotImplementedError

    def combine_seeded(
        self,
        tasks: list[torch.Tensor],
        weights: torch.Tensor,
        density: float | None,
        side: Side,
        majority: str,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """`combine()`, with the random choices (DARE drops) drawn from ``generator`` instead of the global RNG.

        A random method is then computed as ``sum_i c_i * T_i`` from `coefficients()` (the same merge as
        PEFT's, with drops from ``generator``); the global random state is neither read nor changed.
        """
        if not self.random:
            return self.combine(tasks, weights, density, side, majority)
        coefficients = self.coefficients(tasks, weights, density, majority, generator)
        return sum(coefficient * task for coefficient, task in zip(coefficients, tasks, strict=True))

    @torch.no_grad()
    def coefficients(
        self,
        tasks: list[torch.Tensor],
        weights: torch.Tensor,
        density: float | None,
        majority: str,
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        """Entrywise coefficients ``c_i`` (each of the shape of ``T_i``) with ``combine(tasks) = sum_i c_i * T_i``.

        For a selective method the merge is linear in the task tensors once its discrete choices (top-k, DARE drops,
        sign election) are fixed; ``c_i`` holds those choices, the weight and the disjoint-mean divisor, so a merge
        can be formed from per-adapter parts ``c_i * T_i`` (each then projected on its own, see
        `fusion`). Draws the same DARE drops as `combine()` under the same RNG state.
        """
        weights = weights.to(tasks[0])
        keeps = [self._keep(task, density, generator) for task in tasks]
        coefficients = [keep * weight for keep, weight in zip(keeps, weights.tolist(), strict=True)]
        if self.elect_sign:
            signs = merge_utils.calculate_majority_sign_mask(
                torch.stack([task * keep for task, keep in zip(tasks, keeps, strict=True)]), method=majority
            ).to(tasks[0].dtype)
            count = signs.sum(dim=0).clamp(min=1.0)
            coefficients = [coefficient * sign / count for coefficient, sign in zip(coefficients, signs, strict=True)]
        return coefficients

    def _keep(
        self, task: torch.Tensor, density: float | None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Multiplier of the entries of ``task`` kept by ``merge_utils.prune`` (``0``/``1``, or ``0``/``1/density``
        for DARE, drawn from ``generator`` when given)."""
        if self.prune_method is None or density is None or density >= 1:
            return torch.ones_like(task)
        if self.prune_method == "random":
            return torch.bernoulli(torch.full_like(task, density), generator=generator) / density
        keep = torch.zeros_like(task).reshape(-1)
        keep[torch.topk(task.abs().reshape(-1), k=int(density * task.numel()), largest=True)[1]] = 1
        return keep.reshape(task.shape)


@register_combination
class Linear(Combination):
    """Task arithmetic: ``sum_i w_i T_i``."""

    name = "linear"

    def combine(self, tasks, weights, density, side, majority):
        return merge_utils.task_arithmetic(tasks, weights.to(tasks[0]))


@register_combination
class Ties(Combination):
    """TIES: keep the top ``density`` of each ``|T_i|``, elect the sign per entry, average the agreeing entries."""

    name = "ties"
    needs_density = True
    prune_method = "magnitude"
    elect_sign = True

    def combine(self, tasks, weights, density, side, majority):
        return merge_utils.ties(tasks, weights.to(tasks[0]), density, majority)


@register_combination
class DareLinear(Combination):
    """DARE: drop each entry with probability ``1 - density``, rescale by ``1 / density``, then task arithmetic."""

    name = "dare_linear"
    needs_density = True
    random = True
    prune_method = "random"

    def combine(self, tasks, weights, density, side, majority):
        return merge_utils.dare_linear(tasks, weights.to(tasks[0]), density)


@register_combination
class DareTies(Combination):
    """DARE drop then TIES sign election and disjoint mean."""

    name = "dare_ties"
    needs_density = True
    random = True
    prune_method = "random"
    elect_sign = True

    def combine(self, tasks, weights, density, side, majority):
        return merge_utils.dare_ties(tasks, weights.to(tasks[0]), density, majority)


@register_combination
class MagnitudePrune(Combination):
    """Keep the top ``density`` of each ``|T_i|``, then task arithmetic."""

    name = "magnitude_prune"
    needs_density = True
    prune_method = "magnitude"

    def combine(self, tasks, weights, density, side, majority):
        return merge_utils.magnitude_prune(tasks, weights.to(tasks[0]), density)


@register_combination
class Cat(Combination):
    """Concatenation (exact, rank ``sum r_i``): ``A = [w_1 s_1 A_1; ...]`` (``(sum r_i, n)``), ``B = [B_1, ...]``."""

    name = "cat"
    equal_ranks = False

    def side_weights(self, weights, scalings, side):
        if side == "B":
            return torch.ones(len(weights))
        return torch.tensor([w * s for w, s in zip(weights, scalings, strict=True)])

    def combine(self, tasks, weights, density, side, majority):
        scaled = [task * weight for task, weight in zip(tasks, weights.tolist(), strict=True)]
        return torch.cat(scaled, dim=0 if side == "A" else 1)
