"""The relaxed (binary Concrete) mask applied to a tensor, as one autograd function that stores no mask.

For logits ``l`` and logistic noise ``g = log u - log(1 - u)``, ``u ~ U(0, 1)`` drawn from ``seed``:

    m = sigmoid((l + g) / T),   mu = mean(m),   y = v * m / mu   (``y = v * m`` without rescale),

with ``v`` the tensor being masked (an adapter's task tensor or a cached combination of them, same shape as
``l``). Autograd through these steps would keep ``m``, ``m / mu`` and ``g`` per LoRA matrix, about as much memory
as the adapters themselves. `ConcreteMasked` keeps only references to ``l`` and ``v`` (both alive anyway)
and the integer ``seed``; the backward pass draws the same noise again and applies

    dL/dm = G * v / mu - sum(G * v * m) / (mu^2 N)    (G = dL/dy; the second term only with rescale),
    dL/dl = dL/dm * m (1 - m) / T.
"""

from __future__ import annotations

import torch

MEAN_FLOOR = 1e-6


def logistic_noise(like: torch.Tensor, seed: int) -> torch.Tensor:
    """``logit(u) = log u - log(1 - u)``, ``u ~ U(0, 1)`` from a generator seeded with ``seed`` (shape, device and
    dtype of ``like``), in one buffer."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return u.logit_(eps=1e-6)


def concrete_sample(logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """Binary Concrete sample ``sigmoid((l + g) / T)`` in ``[0, 1]`` (same shape as ``logits``), no graph kept."""
    with torch.no_grad():
        return logistic_noise(logits, seed).add_(logits).div_(temperature).sigmoid_()


class ConcreteMasked(torch.autograd.Function):
    """``v * m / mean(m)`` (or ``v * m``) for a Concrete sample ``m`` of ``logits``; see the module docstring."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, values: torch.Tensor, seed: int, temperature: float, rescale: bool):
        mask = concrete_sample(logits, temperature, seed)
        scale = mask.div_(mask.mean().clamp_min(MEAN_FLOOR)) if rescale else mask
        ctx.save_for_backward(logits, values)
        ctx.seed, ctx.temperature, ctx.rescale = seed, temperature, rescale
        return values * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, values = ctx.saved_tensors
        mask = concrete_sample(logits, ctx.temperature, ctx.seed)
        mean = mask.mean()
        grad_mask = grad * values  # dL/d(scale), turned in place into dL/dm and then dL/dl
        if ctx.rescale:
            floor = mean < MEAN_FLOOR
            mean = mean.clamp_min(MEAN_FLOOR)
            through_mean = torch.dot(grad_mask.flatten(), mask.flatten()) / (mean * mean * mask.numel())
            grad_mask.div_(mean)
            if not floor:
                grad_mask.sub_(through_mean)
        grad_logits = grad_mask.mul_(mask).mul_(1 - mask).div_(ctx.temperature)
        grad_values = None
        if ctx.needs_input_grad[1]:
            grad_values = grad * (mask / mean if ctx.rescale else mask)
        return grad_logits, grad_values, None, None, None


def concrete_masked(
    values: torch.Tensor, logits: torch.Tensor, seed: int, temperature: float, rescale: bool
) -> torch.Tensor:
    """``values`` masked by a Concrete sample of ``logits`` (rescaled by ``1 / mean`` when ``rescale``)."""
    return ConcreteMasked.apply(logits, values, seed, temperature, rescale)
