"""Loss terms of mask learning: DPO, refusal SFT, KL retention, revert-budget hinge (pure tensor functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next label and its validity mask.

    Args:
        logits: ``(batch, length, vocab)``.
        labels: ``(batch, length)``, ``-100`` where no loss.

    Returns:
        ``(logps, valid)``, both ``(batch, length - 1)``.
    """
    # Shift the labels, not the logits (no copy of the (batch, length, vocab) tensor), and let cross_entropy keep
    # the only vocabulary-sized tensor of the graph, as the causal-LM loss of transformers does.
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    valid = targets != -100
    return (-nll.view_as(targets) * valid)[:, :-1], valid[:, :-1]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` sum of the response tokens' log-probabilities, ``log pi(y | x)``."""
    picked, _ = token_logps(logits, labels)
    return picked.sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO: ``-log sigmoid(beta [(pi_c - ref_c) - (pi_r - ref_r)])`` averaged over pairs (inputs ``(batch,)``).

    Returns:
        ``(loss, margins)``; ``margins`` ``(batch,)`` is the bracket above (detached).
    """
    margins = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margins).mean(), margins.detach()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens."""
    picked, valid = token_logps(logits, labels)
    return -picked.sum() / valid.sum().clamp_min(1)


def retention_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p_policy)`` of the next-token distributions, averaged over labelled positions."""
    valid = (labels[:, 1:] != -100).float()
    ref = torch.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    pol = torch.log_softmax(policy_logits[:, :-1].float(), dim=-1)
    kl = (ref.exp() * (ref - pol)).sum(-1)
    return (kl * valid).sum() / valid.sum().clamp_min(1)


def budget_penalty(logits: list[torch.Tensor], budget: float) -> torch.Tensor:
    """``relu(mean(1 - sigmoid(l)) - budget)`` over all entries: the expected reverted fraction above budget."""
    device = logits[0].device  # logits of a ``device_map`` model's sites may sit on several devices
    total = sum(torch.sigmoid(-value).sum().to(device) for value in logits)
    count = sum(value.numel() for value in logits)
    return torch.relu(total / count - budget)
