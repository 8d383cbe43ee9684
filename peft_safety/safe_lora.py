"""Safe LoRA (Hsu et al., NeurIPS 2024): project a trained LoRA adapter's update onto the alignment direction.

For every LoRA layer ``i`` (base weight ``m x n``, adapter ``dW_i = s B_i A_i`` with ``B_i`` ``m x r`` and ``A_i``
``r x n``) the *alignment matrix* is the difference between the aligned and the unaligned (base, pre-alignment)
weights of that layer, and its *projector* is the paper's

    V_i = W_aligned_i - W_unaligned_i                    (m x n)
    C_i = V_i V_i^T / ||V_i||_F                          (m x m)

(the paper's definition: ``C_i`` is symmetric positive semi-definite with the column space of ``V_i`` as range,
but it is not an orthogonal projector, ``C_i^2 != C_i``; only directions are compared below, so its scale does
not matter for the decision). A layer whose update points away from the alignment subspace,

    sim_i = <C_i dW_i, dW_i>_F / (||C_i dW_i||_F ||dW_i||_F)   in [0, 1],

below ``threshold`` (or among the ``budget`` lowest similarities) is replaced by ``C_i dW_i = s (C_i B_i) A_i``:
only ``lora_B`` changes, to ``C_i B_i``, so the result is a plain rank-``r`` LoRA adapter.

Everything is computed from the factors, never from a dense ``dW`` or ``C``: with ``K = V^T B`` (``n x r``),
``G_A = A A^T``, ``<C dW, dW> = s^2 tr(K^T K G_A) / ||V||``, ``||C dW||^2 = s^2 tr((VK)^T (VK) G_A) / ||V||^2``,
``||dW||^2 = s^2 tr(B^T B G_A)`` and ``C B = V K / ||V||``: two ``O(m n r)`` products and ``r x r`` matrices per
layer. Layers are streamed one at a time over ``named_modules``: at most one layer's aligned and unaligned weights
and its ``V`` (dequantised for bitsandbytes, gathered for ZeRO-3 / DTensor weights through
[`peft_safety.distributed.full_weight()`][peft_safety.distributed.full_weight]) exist at once.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._targets import LINEAR_TYPES, weight_shape
from .distributed import _distributed, _is_dtensor, full_weight

DEFAULT_THRESHOLD = 0.5
"""Similarity below which a layer is projected when neither ``threshold`` nor ``budget`` is given."""

__all__ = ["DEFAULT_THRESHOLD", "SafeLoRALayer", "SafeLoRAReport", "apply_safe_lora"]


@dataclass(frozen=True)
class SafeLoRALayer:
    """One LoRA layer of the adapter.

    ``similarity``: ``cos(C dW, dW)`` in ``[0, 1]`` (``nan`` for a skipped layer). ``alignment_norm``: ``||V||_F``.
    ``skipped``: why the layer was left out (``V = 0``, or a zero update), else ``None``.
    """

    name: str
    out_features: int
    in_features: int
    r: int
    similarity: float
    projected: bool
    alignment_norm: float
    skipped: str | None = None


@dataclass(frozen=True)
class SafeLoRAReport:
    """What [`apply_safe_lora()`][peft_safety.apply_safe_lora] did: one
    [`SafeLoRALayer`][peft_safety.safe_lora.SafeLoRALayer] per LoRA layer, in ``named_modules`` order.

    ``threshold`` is the similarity threshold used (``None`` when ``budget`` chose the layers); ``budget`` the
    number of layers asked for (``None`` with a threshold).
    """

    adapter_name: str
    output_adapter: str
    threshold: float | None
    budget: int | None
    layers: tuple[SafeLoRALayer, ...]

    @property
    def projected_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.projected]

    @property
    def skipped_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.skipped is not None]

    @property
    def num_projected(self) -> int:
        return len(self.projected_layers)

    @property
    def mean_similarity(self) -> float:
        """Mean similarity over the layers that were not skipped (``nan`` if all were)."""
        values = [layer.similarity for layer in self.layers if layer.skipped is None]
        return sum(values) / len(values) if values else math.nan

    def to_dict(self) -> dict:
        """Plain JSON-ready data; the ``nan`` similarities of skipped layers become ``None``."""

        def number(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {
            "adapter_name": self.adapter_name,
            "output_adapter": self.output_adapter,
            "threshold": self.threshold,
            "budget": self.budget,
            "num_layers": len(self.layers),
            "num_projected": self.num_projected,
            "num_skipped": len(self.skipped_layers),
            "mean_similarity": number(self.mean_similarity),
            "layers": [{**asdict(layer), "similarity": number(layer.similarity)} for layer in self.layers],
        }

    def __str__(self) -> str:
        rule = f"budget {self.budget} layers" if self.budget is not None else f"threshold {self.threshold:g}"
        width = max((len(layer.name) for layer in self.layers), default=5)
        lines = [
            f"Safe LoRA on adapter '{self.adapter_name}' -> '{self.output_adapter}' ({rule}): "
            f"{self.num_projected} of {len(self.layers)} layers projected, {len(self.skipped_layers)} skipped, "
            f"mean similarity {self.mean_similarity:.4f}",
            f"{'layer':<{width}}  {'out':>6} {'in':>6} {'r':>4} {'similarity':>10} {'||V||':>9}  projected",
        ]
        for layer in self.layers:
            status = "yes" if layer.projected else ("skipped: " + layer.skipped if layer.skipped else "no")
            lines.append(
                f"{layer.name:<{width}}  {layer.out_features:>6} {layer.in_features:>6} {layer.r:>4} "
                f"{layer.similarity:>10.4f} {layer.alignment_norm:>9.3e}  {status}"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- checks


def _check_rule(threshold: float | None, budget: int | float | None) -> float | None:
    """The threshold to use (``None`` when ``budget`` decides); ``ValueError`` for values out of range."""
    if threshold is not None and budget is not None:
        raise ValueError(
            "Give either `threshold` (project every layer whose similarity is below it) or `budget` (project the "
            "`budget` layers of lowest similarity), not both."
        )
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"`budget` must be a number of layers (int) or a fraction of them (float): {budget!r}")
        if isinstance(budget, float) and not 0.0 <= budget <= 1.0:
            raise ValueError(f"`budget` as a fraction of the layers must be in [0, 1], got {budget}")
        if isinstance(budget, int) and budget < 0:
            raise ValueError(f"`budget` must be a non-negative number of layers, got {budget}")
        return None
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"`threshold` must be a similarity in [0, 1] (0 projects no layer, 1 every layer), got {threshold!r}"
        )
    return float(threshold)


def _resolve_budget(budget: int | float, num_layers: int) -> int:
    if isinstance(budget, float):
        return min(num_layers, math.floor(budget * num_layers + 0.5))
    if budget > num_layers:
        raise ValueError(
            f"`budget={budget}` is more than the adapter's {num_layers} LoRA layers: give at most {num_layers}, "
            "or a fraction of the layers as a float, e.g. budget=0.25."
        )
    return budget


def _check_adapter(peft_model: nn.Module, adapter_name: str, output_adapter: str) -> LoraConfig:
    from .guardspace import GuardSpaceConfig

    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict):
        raise ValueError(f"`peft_model` must be a PeftModel holding a LoRA adapter, got {type(peft_model).__name__}.")
    if adapter_name not in configs:
        raise ValueError(f"The model holds no adapter named '{adapter_name}'; its adapters are {sorted(configs)}.")
    config = configs[adapter_name]
    if isinstance(config, GuardSpaceConfig):
        raise ValueError(
            f"'{adapter_name}' is a GuardSpace adapter, whose update is not B A. Write it as a plain LoRA adapter "
            "with peft_safety.export_to_lora(peft_model, path), load that folder with PeftModel.from_pretrained and "
            "apply Safe LoRA to it."
        )
    if not isinstance(config, LoraConfig):
        raise ValueError(f"'{adapter_name}' is a {type(config).__name__} adapter; Safe LoRA applies to LoRA adapters.")
    if config.use_dora:
        raise ValueError(
            f"'{adapter_name}' is a DoRA adapter: its magnitude vector rescales B A per output, so projecting "
            "lora_B does not project the update. Safe LoRA supports plain LoRA adapters only."
        )
    if getattr(config, "lora_bias", False):
        raise ValueError(f"'{adapter_name}' has lora_bias=True; Safe LoRA supports LoRA adapters without bias.")
    if "." in output_adapter or not output_adapter:
        raise ValueError(
            f"`output_adapter={output_adapter!r}` cannot name a PEFT adapter: adapter names become module names, "
            "which must be non-empty and contain no '.'. Pick another name, e.g. 'safe_lora'."
        )
    if output_adapter != adapter_name and output_adapter in configs:
        raise ValueError(
            f"`output_adapter='{output_adapter}'` already exists in the model: pick a new name, or delete it first "
            "with peft_model.delete_adapter."
        )
    return config


def _lora_layers(peft_model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """``(name in the base model, LoRA layer)`` for every layer holding ``adapter_name``, in module order."""
    layers = []
    for name, module in peft_model.named_modules():
        if adapter_name in getattr(module, "lora_embedding_A", ()):
            raise ValueError(
                f"Layer '{name}' holds an embedding LoRA; Safe LoRA projects linear layers only. Train the adapter "
                "without embedding layers in target_modules."
            )
        if not isinstance(module, BaseTunerLayer) or adapter_name not in getattr(module, "lora_A", ()):
            continue
        target = name.removeprefix("base_model.model.")
        if not isinstance(module.get_base_layer(), LINEAR_TYPES) and not hasattr(module, "in_features"):
            raise ValueError(f"Layer '{target}' is not a linear layer; Safe LoRA projects linear layers only.")
        if not isinstance(module.lora_A[adapter_name], nn.Linear):
            raise ValueError(
                f"Layer '{target}' holds a {type(module.lora_A[adapter_name]).__name__} LoRA (convolution?); Safe "
                "LoRA projects linear layers only."
            )
        if adapter_name in getattr(module, "merged_adapters", ()):
            raise ValueError(
                f"Adapter '{adapter_name}' is merged into layer '{target}': the base weight then holds the update. "
                "Call peft_model.unmerge_adapter() first."
            )
        if _is_dtensor(module.lora_A[adapter_name].weight) or _is_dtensor(module.lora_B[adapter_name].weight):
            raise ValueError(
                f"The adapter weights of layer '{target}' are sharded (DTensor): apply Safe LoRA before wrapping the "
                "model with FSDP / tensor parallelism, or to the saved adapter loaded without it."
            )
        layers.append((target, module))
    if not layers:
        raise ValueError(f"Adapter '{adapter_name}' has no LoRA layer in the model.")
    return layers


def _reference_layers(model: nn.Module, role: str, layers: list[tuple[str, nn.Module]]) -> dict[str, nn.Module]:
    """The linear layer of ``model`` matching every LoRA layer by name and shape."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    modules = dict(model.named_modules())
    found = {}
    for target, lora_layer in layers:
        module = modules.get(target)
        if module is None:
            raise ValueError(
                f"The {role} model has no layer '{target}' (an adapter layer): pass the {role} model of the same "
                f"architecture as the adapter's base (got {type(model).__name__})."
            )
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        if not isinstance(module, LINEAR_TYPES) and not hasattr(module, "in_features"):
            raise ValueError(f"Layer '{target}' of the {role} model is a {type(module).__name__}, not a linear layer.")
        if weight_shape(module) != weight_shape(lora_layer):
            raise ValueError(
                f"Layer '{target}' has shape (out, in) {weight_shape(module)} in the {role} model but "
                f"{weight_shape(lora_layer)} in the adapter's base model: the models must share one architecture."
            )
        found[target] = module
    return found


# ----------------------------------------------------------------------------------------------- maths


def _read_weight(module: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear / ``Conv1D`` / bitsandbytes layer as a ``dtype`` copy on ``device``."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    parameter = base.weight
    try:
        with full_weight(base) as weight:
            weight = weight.detach().to(device=device, dtype=dtype, copy=True)
    finally:
        if base.weight is not parameter:  # dequantising an 8-bit weight on CPU may replace the Parameter object
            base.weight = parameter
    return weight.T if isinstance(base, Conv1D) else weight


def _trace_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``tr(L R)`` for symmetric ``r x r`` matrices."""
    return (left * right).sum()


def projected_factor(
    alignment: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> tuple[torch.Tensor | None, float, float]:
    """``(C B, similarity, ||V||_F)`` for ``V = alignment`` (``m x n``), ``A`` (``r x n``), ``B`` (``m x r``).

    ``C = V V^T / ||V||_F`` and ``similarity = cos(C B A, B A)`` (the scaling ``s`` cancels), from the factors:
    ``K = V^T B``, ``G_A = A A^T``, ``<C BA, BA> = tr(K^T K G_A) / ||V||``, ``||C BA||^2 = tr((VK)^T VK G_A) /
    ||V||^2``, ``||BA||^2 = tr(B^T B G_A)``, ``C B = V K / ||V||``. ``O(m n r)``.

    Returns ``(None, nan, 0.0)`` for ``V = 0`` and ``(C B, nan, ||V||)`` for a zero update ``B A = 0``.
    """
    norm = torch.linalg.matrix_norm(alignment)
    if norm == 0:
        return None, math.nan, 0.0
    k = alignment.T @ lora_B  # (n, r)
    vk = alignment @ k  # (m, r)
    gram_A = lora_A @ lora_A.T  # (r, r)
    update_sq = _trace_product(lora_B.T @ lora_B, gram_A)
    projected_B = vk / norm
    if update_sq <= 0:
        return projected_B, math.nan, float(norm)
    inner = _trace_product(k.T @ k, gram_A) / norm
    projected_sq = _trace_product(vk.T @ vk, gram_A) / norm**2
    if projected_sq <= 0:
        return projected_B, 0.0, float(norm)
    similarity = float((inner / torch.sqrt(projected_sq * update_sq)).clamp(0.0, 1.0))
    return projected_B, similarity, float(norm)


def _agree_across_ranks(projected: list[str]) -> None:
    """Under ``torch.distributed``, raise on every rank unless all ranks chose the same layers."""
    if not _distributed():
        return
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, projected)
    if any(entry != gathered[0] for entry in gathered):
        raise RuntimeError(
            "Safe LoRA chose different layers on different ranks: every rank must pass the same adapter and the "
            "same aligned and unaligned weights (load them identically on every rank)."
        )


# ----------------------------------------------------------------------------------------------- entry point


@torch.no_grad()
def apply_safe_lora(
    peft_model: PeftModel,
    unaligned_model: nn.Module,
    aligned_model: nn.Module | None = None,
    adapter_name: str = "default",
    *,
    threshold: float | None = None,
    budget: int | float | None = None,
    output_adapter: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> SafeLoRAReport:
    """Project the LoRA layers of ``adapter_name`` whose update leaves the alignment subspace (Safe LoRA).

    Per LoRA layer (base weight ``m x n``, update ``dW = s B A``): ``V = W_aligned - W_unaligned``,
    ``C = V V^T / ||V||_F`` (the paper's projector; not idempotent, see `peft_safety.safe_lora`) and
    ``sim = <C dW, dW>_F / (||C dW||_F ||dW||_F)`` in ``[0, 1]``. A selected layer gets ``lora_B <- C B``
    (``m x r``): the adapter stays a plain rank-``r`` LoRA adapter, ``lora_A`` and the scaling are unchanged.
    Cost ``O(m n r)`` per layer; the layers are streamed, so only one layer's ``V`` exists at a time. All checks
    run, and every similarity is computed, before the adapter is changed.

    Layers whose aligned and unaligned weights are identical (``V = 0``, no alignment direction) are skipped
    (not projected) with one warning listing them; layers with a zero update are skipped too (projecting would
    change nothing). Under ``torch.distributed`` every rank computes the same result (sharded DTensor / ZeRO-3
    weights are gathered, a collective); the chosen layers are compared across ranks.

    Args:
        peft_model: a ``PeftModel`` holding the trained LoRA adapter ``adapter_name`` (not merged).
        unaligned_model: the model before safety alignment (e.g. the base of a chat model), same architecture.
        aligned_model: the aligned model. ``None`` (the usual case, and the cheapest in memory) reads the base
            weights of ``peft_model`` itself, which must then be the aligned model the adapter was trained on.
        adapter_name: the LoRA adapter to project.
        threshold: project every layer whose similarity is below it; in ``[0, 1]``, 0 projects nothing and 1
            every layer. Default ``DEFAULT_THRESHOLD`` (0.5) when ``budget`` is not given. Choose it on a
            held-out split (see the Safe LoRA guide).
        budget: instead of a threshold, project the ``budget`` layers of lowest similarity: an ``int`` number of
            layers (at most the adapter's) or a ``float`` fraction of them in ``[0, 1]`` (rounded to nearest).
        output_adapter: ``None`` (or ``adapter_name``) changes the adapter in place; a new name first copies the
            adapter under that name (``peft_model.add_adapter``) and projects the copy, leaving the original and
            the active adapter unchanged (``peft_model.set_adapter(output_adapter)`` to use it).
        dtype: floating type of the computation (float32 or float64); the new ``lora_B`` is stored in the
            adapter's own dtype.

    Returns:
        A [`SafeLoRAReport`][peft_safety.SafeLoRAReport]: per layer the similarity, whether it was projected or
        skipped, ``||V||_F``.

    Raises:
        ValueError: before anything changes, for an unknown, GuardSpace, DoRA or merged adapter, a threshold or
            budget out of range, a reference model missing a layer or with another shape, or non-finite weights.
    """
    resolved_threshold = _check_rule(threshold, budget)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}")
    output_adapter = adapter_name if output_adapter is None else output_adapter
    _check_adapter(peft_model, adapter_name, output_adapter)
    layers = _lora_layers(peft_model, adapter_name)
    num_budget = None if budget is None else _resolve_budget(budget, len(layers))
    unaligned = _reference_layers(unaligned_model, "unaligned", layers)
    aligned = (
        {target: module for target, module in layers}
        if aligned_model is None
        else _reference_layers(aligned_model, "aligned", layers)
    )

    rows: list[dict] = []
    new_factors: dict[str, torch.Tensor] = {}
    for target, module in layers:
        lora_A = module.lora_A[adapter_name].weight
        lora_B = module.lora_B[adapter_name].weight
        device = lora_B.device
        factor_A, factor_B = lora_A.detach().to(dtype), lora_B.detach().to(dtype)
        if not (torch.isfinite(factor_A).all() and torch.isfinite(factor_B).all()):
            raise ValueError(f"Adapter '{adapter_name}' has NaN or inf weights in layer '{target}'.")
        alignment = _read_weight(aligned[target], dtype, device)
        if not torch.isfinite(alignment).all():
            raise ValueError(f"The aligned model has NaN or inf weights in layer '{target}'.")
        unaligned_weight = _read_weight(unaligned[target], dtype, device)
        if not torch.isfinite(unaligned_weight).all():
            raise ValueError(f"The unaligned model has NaN or inf weights in layer '{target}'.")
        alignment -= unaligned_weight  # V, in place: one layer's V at a time
        del unaligned_weight
        projected_B, similarity, norm = projected_factor(alignment, factor_A, factor_B)
        del alignment
        skipped = None
        if projected_B is None:
            skipped = "V = 0"
        elif math.isnan(similarity):
            skipped = "zero update"
        else:
            new_factors[target] = projected_B.to(lora_B.dtype)
        out_features, in_features = weight_shape(module)
        rows.append(
            dict(
                name=target,
                out_features=out_features,
                in_features=in_features,
                r=lora_A.shape[0],
                similarity=similarity,
                alignment_norm=norm,
                skipped=skipped,
            )
        )

    identical = [row["name"] for row in rows if row["skipped"] == "V = 0"]
    if identical:
        warnings.warn(
            f"Safe LoRA: the aligned and unaligned weights are identical in {len(identical)} of {len(rows)} layers "
            f"(V = 0, no alignment direction), left unprojected: {identical[:5]}{' ...' if len(identical) > 5 else ''}"
            ". Check that the unaligned model is really the pre-alignment model.",
            stacklevel=2,
        )
    candidates = [row for row in rows if row["skipped"] is None]
    if num_budget is not None:
        order = sorted(range(len(candidates)), key=lambda i: (candidates[i]["similarity"], i))
        chosen = {candidates[i]["name"] for i in order[:num_budget]}
    else:
        chosen = {
            row["name"] for row in candidates if resolved_threshold >= 1.0 or row["similarity"] < resolved_threshold
        }
    _agree_across_ranks(sorted(chosen))

    if output_adapter != adapter_name:
        config = copy.deepcopy(peft_model.peft_config[adapter_name])
        active = peft_model.active_adapter
        peft_model.add_adapter(output_adapter, config)
        if peft_model.active_adapter != active:
            peft_model.set_adapter(active)
        for _, module in layers:
            module.lora_A[output_adapter].weight.copy_(module.lora_A[adapter_name].weight)
            module.lora_B[output_adapter].weight.copy_(module.lora_B[adapter_name].weight)
    for target, module in layers:
        if target in chosen:
            module.lora_B[output_adapter].weight.copy_(new_factors[target])

    report_layers = tuple(SafeLoRALayer(projected=row["name"] in chosen, **row) for row in rows)
    return SafeLoRAReport(adapter_name, output_adapter, resolved_threshold, num_budget, report_layers)
