"""``GuardSpaceConfig``: a ``LoraConfig`` whose adapters start in the safety-irrelevant subspace and only see the
null space of harmful activations."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import LoraConfig

from ..statistics import SafetyStatistics, collect_safety_statistics
from .layer import GUARDSPACE_INIT

RankAllocation = Literal["uniform", "null_dim"]
_UNSUPPORTED_LORA_OPTIONS = ("use_dora", "use_qalora", "use_bdlora", "loftq_config", "eva_config", "corda_config")


@dataclass
class GuardSpaceConfig(LoraConfig):
    """Configuration of a GuardSpace adapter (Zhang et al., 2025), usable with the stock ``peft.get_peft_model``.

    It is a ``LoraConfig`` (``peft_type=LORA``) with ``init_lora_weights="guardspace"``. Per target layer
    ``W`` (``m x n``) and harmful-input covariance ``C``:

    * the adapter starts from the ``r`` smallest components of the SVD of ``W C~`` (``C~`` damped ``C``);
    * it only sees ``P x``, ``P`` the projector on the eigen-directions of ``C`` with
      ``lambda <= null_space_threshold * lambda_max``;
    * the base weight is untouched: ``y = W x + s (B A - B0 A0) P x``, equal to ``W x`` at initialisation and on
      the calibration inputs at every training step.

    Args:
        safety_statistics (`str | SafetyStatistics`): statistics from
            :func:`~peft_safety.collect_safety_statistics`, or the path of a file saved with
            :meth:`SafetyStatistics.save`. Needed to create an adapter, not to load a saved one.
        null_space_threshold (`float`, defaults to `1e-6`): relative eigenvalue threshold of the null space
            (the paper's value). Larger values free more directions for the task and protect less.
        damping_start (`float`, defaults to `0.01`): first damping factor ``d`` of ``C + d mean(diag C) I``;
            doubled until ``||C~ C~^-1 - I||_F < damping_tolerance``.
        damping_tolerance (`float`, defaults to `0.05`): see ``damping_start``.
        balance_factors (`bool`, defaults to `False`): rescale each initial component so that the row of ``A0``
            and the column of ``B0`` have equal norms (same product ``B0 A0``, same subspaces). The paper's factors
            (``A0 = S^{1/2} V^T C~^{-1}``) make ``A0`` about ``1 / d`` times larger than ``B0`` where ``C`` is
            rank-deficient, which speeds learning in the null directions (Adam moves ``B`` by about the learning
            rate) and also amplifies input noise there. Balanced factors keep the calibration outputs at the
            base's own bf16 noise under bf16 autocast, but learn far more slowly at a LoRA learning rate (see
            ``docs/guardspace.md`` for the measurements on both the test model and the SmolLM2 testbed).
        rank_allocation (`"uniform" | "null_dim"`, defaults to `"uniform"`): ``"null_dim"`` moves the rank of
            layers without null space (dead adapters, which cannot learn) to layers with one, in proportion to
            their null-space dimension, through ``rank_pattern`` and at the same number of trainable parameters.
            Dead layers keep rank 1.
        null_space_dims (`dict[str, int]`, set at initialisation): null-space dimension per module. Saved with the
            adapter so that loading rebuilds the layers without the statistics and without any SVD.
        null_space_sites (`dict[str, str]`, set at initialisation): input site of each module (the first module
            reading the same tensor). Loading uses it to give the modules of a site one shared projector basis.

    All other arguments are those of ``peft.LoraConfig``.
    """

    safety_statistics: str | SafetyStatistics | None = field(
        default=None,
        metadata={"help": "Path of a safety statistics file (or a SafetyStatistics object) used to initialise."},
    )
    null_space_threshold: float = field(
        default=1e-6, metadata={"help": "Relative eigenvalue threshold defining the harmful-input null space."}
    )
    damping_start: float = field(default=0.01, metadata={"help": "First covariance damping factor."})
    damping_tolerance: float = field(
        default=0.05, metadata={"help": "Damping doubles until ||C~ C~^-1 - I||_F is below this."}
    )
    balance_factors: bool = field(
        default=False, metadata={"help": "Give each initial component equal norms in A0 and B0 (same product)."}
    )
    rank_allocation: RankAllocation = field(
        default="uniform",
        metadata={"help": "'uniform', or 'null_dim' to give dead layers' rank budget to layers with a null space."},
    )
    null_space_dims: dict[str, int] | None = field(
        default=None, metadata={"help": "Null-space dimension per module; recorded at initialisation."}
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
        super().__post_init__()
        if not 0.0 < self.null_space_threshold < 1.0:
            raise ValueError(f"`null_space_threshold` must be in (0, 1), got {self.null_space_threshold}.")
        if self.rank_allocation not in ("uniform", "null_dim"):
            raise ValueError(f"`rank_allocation` must be 'uniform' or 'null_dim', got {self.rank_allocation!r}.")
        if isinstance(self.safety_statistics, os.PathLike):
            self.safety_statistics = os.fspath(self.safety_statistics)
        from .._peft_compat import register_guardspace_layers

        register_guardspace_layers(self)

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
        ``statistics_kwargs`` go to :func:`~peft_safety.collect_safety_statistics` (``batch_size``,
        ``chat_template``, ...).
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
