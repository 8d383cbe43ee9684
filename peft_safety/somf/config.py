"""``SOMFConfig``: every knob of mask learning and of the deployed mask, in one dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Objective = Literal["dpo", "sft"]
FinalMask = Literal["expected", "budget", "bernoulli", "threshold"]
FINAL_MASKS = ("expected", "budget", "bernoulli", "threshold")
OBJECTIVES = ("dpo", "sft")
# float field -> (lower bound, upper bound (exclusive), lower bound included); every value must also be finite
_FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {
    "beta": (0.0, math.inf, False),
    "rpo_alpha": (0.0, math.inf, True),
    "temperature": (0.0, math.inf, False),
    "init_logit": (-math.inf, math.inf, False),
    "retain_weight": (0.0, math.inf, True),
    "revert_budget": (0.0, 1.0, True),
    "budget_weight": (0.0, math.inf, True),
    "learning_rate": (0.0, math.inf, False),
}


def _is_number(value: Any) -> bool:
    """A real number (``int`` or ``float``, not ``bool``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SOMFConfig:
    """Configuration of SOMF mask learning (Yi et al., 2024) with utility retention and a revert budget.

    One real logit ``l`` per scalar of every ``lora_A``/``lora_B`` task vector ``tau``. During training the mask is a
    binary Concrete sample ``m = sigmoid((l + log u - log(1 - u)) / T)``, ``u ~ U(0, 1)``; the masked task vector
    is ``m * tau`` (divided by ``mean(m)`` per tensor when ``rescale``) and goes through the chosen combination.

    Loss per step (only the logits train): ``L_safety + rpo_alpha * NLL(chosen) + retain_weight * L_retain +
    budget_weight * relu(mean(1 - sigmoid(l)) - revert_budget)``.

    Args:
        objective (`"dpo" | "sft"`, defaults to `"dpo"`): DPO on ``prompt``/``chosen``/``rejected`` pairs against
            the unmasked fused model, or refusal SFT (token NLL) on ``prompt``/``completion`` pairs.
        beta (`float`, defaults to `0.1`): DPO temperature.
        rpo_alpha (`float`, defaults to `0.3`): weight of the negative log-likelihood of the ``chosen`` answers
            added to the DPO loss (TRL's ``rpo_alpha``; ``0``: the paper's plain DPO). Plain DPO can lower the
            likelihood of both answers: on the testbed's two-adapter merge the mask learned to end every answer at
            once (empty answers, over-refusal 0.87); at 0.3 no answer was empty (``docs/somf.md``).
        temperature (`float`, defaults to `0.5`): Concrete temperature ``T``.
        init_logit (`float`, defaults to `3.0`): initial logit (keep probability ``sigmoid(3) = 0.95``): training
            starts at the unmasked merge and only entries the objective pushes down are reverted.
        rescale (`bool`, defaults to `True`): divide each masked tensor by ``mean(m)`` (the paper's choice).
        shared_mask (`bool`, defaults to `True`): one mask shared by all adapters (the paper); ``False`` gives each
            adapter its own logits (needed for ``cat`` with different ranks).
        reference_adapter (`str`, *optional*): name of a "safe" adapter; task vectors are taken relative to it and
            reverted entries fall back to it. ``None``: relative to zero (adapters trained from the aligned base).
        retain_weight (`float`, defaults to `1.0`): weight of the retention term, the KL from the unmasked merge to
            the masked one on the completion tokens of ``retain_data`` (skipped without retain data).
        revert_budget (`float`, defaults to `0.3`): fraction of entries the mask may revert; the expected reverted
            fraction above it is penalised, and the ``"budget"`` final mask reverts exactly this fraction.
        budget_weight (`float`, defaults to `1.0`): weight of the budget hinge.
        final_mask (`"expected" | "budget" | "bernoulli" | "threshold"`, defaults to `"expected"`): the deployed
            mask: ``sigmoid(l)``; a hard mask reverting the ``revert_budget`` lowest logits; a Bernoulli draw with
            ``seed`` (the research code); ``l > 0``. All but ``"bernoulli"`` are deterministic functions of ``l``.
        learning_rate (`float`, defaults to `0.25`): Adam learning rate of the logits. Adam moves a logit by at
            most about this much per step, so ``max_steps * learning_rate`` must exceed ``init_logit`` for any entry
            to be reverted (``5e-2`` for 30 steps reverted nothing on the SmolLM2 testbed).
        max_steps (`int`, defaults to `30`): optimiser steps (the step budget).
        batch_size (`int`, defaults to `4`): safety examples per micro-batch (and retain examples per micro-batch).
        gradient_accumulation_steps (`int`, defaults to `1`): micro-batches per optimiser step.
        max_length (`int`, defaults to `256`): tokens per sequence (prompt truncated from the left).
        eval_batches (`int`, defaults to `2`): micro-batches used to report safety losses before/after.
        seed (`int`, defaults to `0`): seed of data order, Concrete noise, DARE drops and the Bernoulli mask.
        progress_bar (`bool`, defaults to `True`): show a tqdm bar.
    """

    objective: Objective = field(default="dpo", metadata={"help": "Safety objective: 'dpo' or 'sft'."})
    beta: float = field(default=0.1, metadata={"help": "DPO temperature beta."})
    rpo_alpha: float = field(default=0.3, metadata={"help": "Weight of the chosen answers' NLL added to DPO."})
    temperature: float = field(default=0.5, metadata={"help": "Binary Concrete temperature."})
    init_logit: float = field(default=3.0, metadata={"help": "Initial mask logit (+3 = keep with p 0.95)."})
    rescale: bool = field(default=True, metadata={"help": "Divide each masked tensor by the mean of its mask."})
    shared_mask: bool = field(default=True, metadata={"help": "One mask shared by all adapters (else per adapter)."})
    reference_adapter: str | None = field(
        default=None, metadata={"help": "Safe adapter the task vectors are relative to (None: zero)."}
    )
    retain_weight: float = field(default=1.0, metadata={"help": "Weight of the KL retention term on retain_data."})
    revert_budget: float = field(default=0.3, metadata={"help": "Fraction of entries the mask may revert."})
    budget_weight: float = field(default=1.0, metadata={"help": "Weight of the revert-budget hinge penalty."})
    final_mask: FinalMask = field(
        default="expected", metadata={"help": "Deployed mask: expected, budget, bernoulli or threshold."}
    )
    learning_rate: float = field(default=0.25, metadata={"help": "Adam learning rate of the mask logits."})
    max_steps: int = field(default=30, metadata={"help": "Number of optimiser steps."})
    batch_size: int = field(default=4, metadata={"help": "Examples per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    max_length: int = field(default=256, metadata={"help": "Maximum tokens per sequence."})
    eval_batches: int = field(default=2, metadata={"help": "Micro-batches for the before/after safety losses."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, noise, DARE drops, Bernoulli mask."})
    progress_bar: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.final_mask not in FINAL_MASKS:
            raise ValueError(f"final_mask must be one of {FINAL_MASKS}, got {self.final_mask!r}.")
        for name, (low, high, closed_low) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
            if (value < low if closed_low else value <= low) or value >= high:
                bracket = "[" if closed_low else "("
                raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}), got {value!r}.")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length", "eval_batches", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}.")
            if value < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'seed' else 1}, got {value}.")
        for name in ("rescale", "shared_mask", "progress_bar"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if self.reference_adapter is not None and (
            not isinstance(self.reference_adapter, str) or not self.reference_adapter
        ):
            raise ValueError(f"reference_adapter must be an adapter name or None, got {self.reference_adapter!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
