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
    """Class decorator adding ``cls`` to :data:`COMBINATIONS` under ``cls.name``."""
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

    def combine(self, tasks, weights, density, side, majority):
        return merge_utils.ties(tasks, weights.to(tasks[0]), density, majority)


@register_combination
class DareLinear(Combination):
    """DARE: drop each entry with probability ``1 - density``, rescale by ``1 / density``, then task arithmetic."""

    name = "dare_linear"
    needs_density = True
    random = True

    def combine(self, tasks, weights, density, side, majority):
        return merge_utils.dare_linear(tasks, weights.to(tasks[0]), density)


@register_combination
class DareTies(Combination):
    """DARE drop then TIES sign election and disjoint mean."""

    name = "dare_ties"
    needs_density = True
    random = True

    def combine(self, tasks, weights, density, side, majority):
        return merge_utils.dare_ties(tasks, weights.to(tasks[0]), density, majority)


@register_combination
class MagnitudePrune(Combination):
    """Keep the top ``density`` of each ``|T_i|``, then task arithmetic."""

    name = "magnitude_prune"
    needs_density = True

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
