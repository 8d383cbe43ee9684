"""``GuardSpaceConfig``: a ``LoraConfig`` whose adapters start in the safety-irrelevant subspace and only see the
null space of harmful activations."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import LoraConfig

from ..statistics import SafetyStatistics, collect_safety_statistics
from .layer import GUARDSPACE_INIT

RankAllocation = Literal["uniform", "null_dim"]
FactorScale = Literal["auto", "bounded", "paper", "balanced"]
_UNSUPPORTED_LORA_OPTIONS = ("use_dora", "use_qalora", "use_bdlora", "loftq_config", "eva_config", "corda_config")
# options that train parameters outside the null-space projection (whole modules, token embeddings, aLoRA's
# invocation-dependent activation): the guarantee would not cover them
_OUTSIDE_PROJECTION_OPTIONS = ("modules_to_save", "trainable_token_indices", "alora_invocation_tokens")


def _is_number(value: Any) -> bool:
    """A real number (``int`` or ``float``, not ``bool``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class GuardSpaceConfig(LoraConfig):
    """Configuration of a GuardSpace adapter (Zhang et al., 2025), usable with the stock ``peft.get_peft_model``.

    It is a ``LoraConfig`` (``peft_type=LORA``) with ``init_lora_weights="guardspace"``.

    Per target layer ``W`` (``m x n``) and harmful-input covariance ``C``:

    * the adapter starts from the ``r`` smallest components of the SVD of ``W C~`` (``C~`` damped ``C``);
    * it only sees ``P x``, ``P`` the projector on the null space of ``C``;
    * the base weight is untouched: ``y = W x + s (B A_eff - B0 A0_eff) P x``, equal to ``W x`` at initialisation
      and, on the exact null space, on the calibration inputs at every training step, under any optimizer.

    Args:
        safety_statistics (`str | SafetyStatistics`): statistics from
            [`collect_safety_statistics()`][peft_safety.collect_safety_statistics], or the path of a file saved with
            [`SafetyStatistics.save()`][peft_safety.SafetyStatistics.save]. Needed to create an adapter, not to load a
            saved one.
        null_space_threshold (`float | "auto"`, defaults to `"auto"`): which eigen-directions of ``C`` form the
            null space. ``"auto"``: the exact null space (directions no calibration input touches: eigenvalues at
            the rounding floor of the covariance) wherever it has at least ``r`` directions, which happens when the
            calibration set has fewer distinct inputs than the layer has features; elsewhere the paper's
            ``lambda <= 1e-6 lambda_max``. A float: ``lambda <= null_space_threshold * lambda_max`` everywhere.
            Directions above the rounding floor leak: the update can move calibration outputs through them, by
            exactly the amount [`guardspace_report()`][peft_safety.guardspace_report] certifies per layer.
        factor_scale (`"auto" | "bounded" | "paper" | "balanced"`, defaults to `"auto"`): size of the initial
            factors. All give the same product ``B0 A0`` and the same subspaces. ``"paper"``:
            ``A0 = S^{1/2} V^T C~^{-1}``, ``B0 = U S^{1/2}``; ``A0`` is about ``1 / damping`` times larger than
            ``B0`` in the null directions, so each Adam step on ``B`` moves the update that much more than in
            plain LoRA. That gain is what lets the adapter learn through near-null directions, which carry little
            energy for any input. On an *exact* null space of a small calibration set, other inputs carry ordinary
            energy, and the same gain makes the update hundreds of times the base weight's norm under AdamW: it then
            multiplies float rounding, bf16 rounding and every upstream change layer after layer, until the whole
            model's calibration outputs drift as far as plain LoRA's. ``"bounded"`` keeps the paper's stored ``A0``
            (so ``A`` turns as slowly, keeping the update in the row space the decomposition chose) but applies it
            through per-component factors ``g`` that give ``A_eff = g A`` the row norm of PEFT's default
            ``lora_A``: the update grows as plain LoRA's does. ``"auto"``: ``"bounded"`` on exact null spaces, the
            paper's scale on near-null ones (whose leakage the certificate reports). ``"balanced"``: equal norms
            of each row of ``A0`` and column of ``B0`` (learns slowly at LoRA learning rates).
        max_calibration_leakage (`float`, optional): hard bound on each layer's certified leakage
            ``tr(dW C dW^T) / tr(W C W^T)`` (relative mean squared output change on the calibration inputs). When
            set, the part of the update on leaking directions is scaled down in every forward pass (and in merges
            and exports) so that the bound holds at every step, under any optimizer. ``None``: report only.
        compact_bases (`bool`, defaults to `False`): read the leaking directions (eigenvalues above the rounding
            floor, as with the paper's threshold on calibration sets with more tokens than features) from the
            columns of the null-space basis ``N`` instead of storing them again, and store ``N`` (``n k`` floats)
            whenever that is no more than the range basis ``R`` plus the leak vectors (``n (n - k + j)``). The
            default stores the smaller of ``N`` and ``R`` plus a separate copy of the leak vectors:
            ``n (min(k, n - k) + j)`` floats, up to ``n^2`` per site when every kept direction leaks, against at
            most ``n k`` compact. The projector and the certificate are the same up to float32
            rounding; only the storage differs (adapters saved with it need a peft-safety version that has it).
        damping_start (`float`, defaults to `0.01`): first damping factor ``d`` of ``C + d mean(diag C) I``;
            doubled until ``||C~ C~^-1 - I||_F < damping_tolerance``.
        damping_tolerance (`float`, defaults to `0.05`): see ``damping_start``.
        balance_factors (`bool`, deprecated): ``True`` is ``factor_scale="balanced"``.
        rank_allocation (`"uniform" | "null_dim"`, defaults to `"uniform"`): ``"null_dim"`` moves the rank of
            layers without null space (dead adapters, which cannot learn) to layers with one, in proportion to
            their null-space dimension, through ``rank_pattern`` and at the same number of trainable parameters.
            Dead layers keep rank 1.
        null_space_dims (`dict[str, int]`, set at initialisation): null-space dimension per module. Saved with the
            adapter so that loading rebuilds the layers without the statistics and without any SVD.
        near_null_dims (`dict[str, int]`, set at initialisation): number of leaking (non-exact) null directions per
            module, whose eigenpairs are saved for the leakage certificate.
        calibration_leakage (`dict`, set by ``save_pretrained``): the adapter's leakage certificate when it was
            saved, ``{"total": ..., "layers": {module: relative leakage}}`` (see ``guardspace_report``).
        null_space_sites (`dict[str, str]`, set at initialisation): input site of each module (the first module
            reading the same tensor). Loading uses it to give the modules of a site one shared projector basis.

    All other arguments are those of ``peft.LoraConfig``.
    """

    safety_statistics: str | SafetyStatistics | None = field(
        default=None,
        metadata={"help": "Path of a safety statistics file (or a SafetyStatistics object) used to initialise."},
    )
    null_space_threshold: float | str = field(
        default="auto",
        metadata={"help": "'auto' (exact null space where it exists, else 1e-6) or a relative eigenvalue threshold."},
    )
    factor_scale: FactorScale = field(
        default="auto",
        metadata={
            "help": "'auto' (bounded on exact null spaces, paper's elsewhere), 'bounded', 'paper' or 'balanced'."
        },
    )
    max_calibration_leakage: float | None = field(
        default=None,
        metadata={"help": "Bound on each layer's relative output change on calibration inputs (None: report only)."},
    )
    compact_bases: bool = field(
        default=False,
        metadata={"help": "Store the null basis N where directions leak, with the leak vectors as its columns."},
    )
    damping_start: float = field(default=0.01, metadata={"help": "First covariance damping factor."})
    damping_tolerance: float = field(
        default=0.05, metadata={"help": "Damping doubles until ||C~ C~^-1 - I||_F is below this."}
    )
    balance_factors: bool = field(default=False, metadata={"help": "Deprecated: True is factor_scale='balanced'."})
    rank_allocation: RankAllocation = field(
        default="uniform",
        metadata={"help": "'uniform', or 'null_dim' to give dead layers' rank budget to layers with a null space."},
    )
    null_space_dims: dict[str, int] | None = field(
        default=None, metadata={"help": "Null-space dimension per module; recorded at initialisation."}
    )
    near_null_dims: dict[str, int] | None = field(
        default=None, metadata={"help": "Leaking null directions per module; recorded at initialisation."}
    )
    calibration_leakage: dict[str, Any] | None = field(
        default=None, metadata={"help": "Leakage certificate (total and per module); recorded by save_pretrained."}
    )
    null_space_sites: dict[str, str] | None = field(
        default=None, metadata={"help": "Input site of each module; recorded at initialisation."}
    )

    def __post_init__(self) -> None:
        if self.init_lora_weights is True:
            self.init_lora_weights = GUARDSPACE_INIT
        if self.init_lora_weights != GUARDSPACE_INIT:
            raise ValueError(
                "GuardSpaceConfig always initialises with 'guardspace', "
                f"got init_lora_weights={self.init_lora_weights!r}."
            )
        enabled = [name for name in _UNSUPPORTED_LORA_OPTIONS if getattr(self, name, None)]
        if enabled:
            raise ValueError(f"GuardSpaceConfig cannot be combined with {enabled}; use a plain LoraConfig for those.")
        outside = [name for name in _OUTSIDE_PROJECTION_OPTIONS if getattr(self, name, None)]
        if outside:
            raise ValueError(
                f"GuardSpaceConfig cannot be combined with {outside}: they train parameters outside the null-space "
                "projection, which the safety guarantee does not cover. Remove them (add those modules to "
                "`target_modules` instead where they are linear layers), or use a plain LoraConfig."
            )
        self._check_numbers()
        super().__post_init__()
        if self.null_space_threshold != "auto" and not (
            _is_number(self.null_space_threshold) and 0.0 < self.null_space_threshold < 1.0
        ):
            raise ValueError(
                f"`null_space_threshold` must be 'auto' or a number in (0, 1), got {self.null_space_threshold!r}."
            )
        if self.balance_factors:
            warnings.warn(
                "`balance_factors=True` is deprecated; use factor_scale='balanced'.", FutureWarning, stacklevel=3
            )
            self.factor_scale, self.balance_factors = "balanced", False
        if self.factor_scale not in ("auto", "bounded", "paper", "balanced"):
            raise ValueError(
                f"`factor_scale` must be 'auto', 'bounded', 'paper' or 'balanced', got {self.factor_scale!r}."
            )
        if self.factor_scale == "paper" and self.null_space_dims is None:
            warnings.warn(
                "factor_scale='paper' makes each optimizer step move the update up to ~1/damping times more than "
                "plain LoRA's, also on exact null spaces: under AdamW at high learning rates, or in bf16, the whole "
                "model's calibration outputs then drift far beyond float rounding. The default 'auto' keeps the "
                "paper's scale only on near-null spaces, where learning needs it.",
                UserWarning,
                stacklevel=3,
            )
        if self.max_calibration_leakage is not None and not (
            _is_number(self.max_calibration_leakage) and 0.0 <= self.max_calibration_leakage < 1.0
        ):
            raise ValueError(
                f"`max_calibration_leakage` must be None or a number in [0, 1), got {self.max_calibration_leakage!r}."
            )
        if not isinstance(self.compact_bases, bool):
            raise ValueError(f"`compact_bases` must be True or False, got {self.compact_bases!r}.")
        if self.rank_allocation not in ("uniform", "null_dim"):
            raise ValueError(f"`rank_allocation` must be 'uniform' or 'null_dim', got {self.rank_allocation!r}.")
        if isinstance(self.safety_statistics, os.PathLike):
            self.safety_statistics = os.fspath(self.safety_statistics)
        if self.safety_statistics is not None and not isinstance(self.safety_statistics, (str, SafetyStatistics)):
            raise ValueError(
                "`safety_statistics` must be a SafetyStatistics object (collect_safety_statistics(...)) or the path "
                f"of a statistics file, got {type(self.safety_statistics).__name__}."
            )
        from .._peft_compat import register_guardspace_layers

        register_guardspace_layers(self)

    def _check_numbers(self) -> None:
        """Refuse ranks, scalings and damping options that would give a NaN (or silently dead) adapter."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}.")
        if not _is_number(self.lora_alpha) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(
                f"`lora_alpha` must be a finite positive number, got {self.lora_alpha!r}: the adapter's scaling "
                "`lora_alpha / r` divides the initial factors, so 0, a negative value or NaN gives a NaN model. "
                "Use e.g. lora_alpha=2 * r."
            )
        for name in ("damping_start", "damping_tolerance"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a finite positive number, got {value!r}.")

    @classmethod
    def from_prompts(
        cls,
        model: Any,
        tokenizer: Any,
        prompts: Any,
        *,
        statistics_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> GuardSpaceConfig:
        """One-step route: collect statistics on ``prompts`` and return the config.

        ``get_peft_model(model, GuardSpaceConfig.from_prompts(model, tokenizer, prompts, r=8, target_modules=[...]))``
        ``statistics_kwargs`` go to [`collect_safety_statistics()`][peft_safety.collect_safety_statistics]
        (``batch_size``, ``chat_template``, ...).
        """
        statistics = collect_safety_statistics(
            model, tokenizer, prompts, config_kwargs.get("target_modules"), **(statistics_kwargs or {})
        )
        return cls(safety_statistics=statistics, **config_kwargs)

    def load_statistics(self) -> SafetyStatistics | None:
        """The statistics object (loaded from disk if a path was given), or ``None`` when restoring a saved one."""
        if isinstance(self.safety_statistics, str):
            self.safety_statistics = SafetyStatistics.load(self.safety_statistics)
        return self.safety_statistics

    def to_dict(self) -> dict[str, Any]:
        """As ``LoraConfig.to_dict``, without the statistics: a saved adapter never needs them again."""
        statistics, self.safety_statistics = self.safety_statistics, None
        try:
            return super().to_dict()
        finally:
            self.safety_statistics = statistics
