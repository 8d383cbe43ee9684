"""The GuardSpace LoRA layer: a ``peft`` ``lora.Linear`` whose GuardSpace adapters run through a ``LoraVariant``.

Forward of a GuardSpace adapter (offset form, base weight untouched):

    y = W x + s * B (A_eff P) dropout(x) - s * B0 (A0_eff P) dropout(x),    A_eff = g * A (row-wise)

``A``/``B`` train (initialised to ``A0``/``B0``), ``B0`` and ``A0_eff P`` are frozen buffers, ``g`` a fixed
per-component input scale, ``P`` the null-space projector given by a stored basis (never a dense ``n x n`` matrix per
module). ``A_eff P`` is formed once per forward call in ``O(r n k)``, then applied to tokens at the cost of plain
LoRA. The effective update ``dW = s (B A_eff - B0 A0_eff) P`` vanishes on the span of the calibration inputs
whatever values ``A``/``B`` take (exactly on an exact null space; up to the certified leakage otherwise).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from .decomposition import project_rows

GUARDSPACE_INIT = "guardspace"


def _keeping_dtype(fn):
    """``fn`` (a ``Module._apply`` conversion) restricted to moving tensors: a dtype change is dropped."""

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        moved = fn(tensor)
        return moved if moved.dtype == tensor.dtype else tensor.to(moved.device)

    return convert


LEGACY_BUFFERS = ("input_scale", "leak_vectors", "leak_values", "output_energy")  # added after peft-safety 0.1


INFERENCE_ONLY_MESSAGE = (
    "This GuardSpace adapter was loaded for inference only (PeftModel.from_pretrained(..., is_trainable=False), the "
    "default): it holds no null-space basis, so training it, re-projecting it (SOMF, add_weighted_adapter) or saving "
    "it again would lose the projection. Load it with PeftModel.from_pretrained(model, path, is_trainable=True) "
    "for that."
)


def leak_columns(basis: torch.Tensor, leak_dim: int) -> torch.Tensor:
    """The ``(n, leak_dim)`` leaking directions of a compact null basis ``N``: its last columns (eigenvalues
    ascending, exact-null directions first)."""
    return basis[:, basis.shape[1] - leak_dim :]


def _leakage(
    trained_A: torch.Tensor,
    frozen_A: torch.Tensor,
    lora_B: torch.Tensor,
    frozen_B: torch.Tensor,
    vectors: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``s^2 sum_j lambda_j ||(B A_eff P - B0 A0_eff P) n_j||^2`` (``()``) for ``(r, n)`` input sides, ``(m, r)``
    output sides, leaking directions ``vectors`` ``(n, j)`` and eigenvalues ``values`` ``(j,)``."""
    if values.numel() == 0:
        return trained_A.new_zeros(())
    vectors = vectors.float()
    moved = lora_B.float() @ (trained_A @ vectors) - frozen_B.float() @ (frozen_A @ vectors)  # (m, j)
    return scaling**2 * (moved.pow(2).sum(0) * values.float()).sum()


def _bounded(
    trained_A: torch.Tensor,
    frozen_A: torch.Tensor,
    lora_B: torch.Tensor,
    frozen_B: torch.Tensor,
    vectors: torch.Tensor,
    values: torch.Tensor,
    output_energy: torch.Tensor,
    bound: float | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(r, n)`` input sides with their leaking component scaled down so that the leakage is at most
    ``bound * output_energy`` (unchanged when ``bound`` is ``None`` or nothing leaks)."""
    if bound is None or values.numel() == 0:
        return trained_A, frozen_A
    with torch.no_grad():
        leakage = _leakage(trained_A, frozen_A, lora_B, frozen_B, vectors, values, scaling)
        allowed = bound * output_energy.float()
        shrink = 1.0 - (allowed / leakage.clamp_min(torch.finfo(leakage.dtype).tiny)).sqrt().clamp(max=1.0)
    vectors = vectors.float()
    trained_A = trained_A - shrink * (trained_A @ vectors) @ vectors.T
    frozen_A = frozen_A - shrink * (frozen_A @ vectors) @ vectors.T
    return trained_A, frozen_A


class GuardState(nn.Module):
    """Frozen per-adapter GuardSpace tensors of one layer (buffers: saved with the adapter, never trained).

    Buffers:
        basis: ``(n, min(k, n - k))`` orthonormal basis; null basis ``N`` if ``k <= n - k`` else range basis ``R``.
            With ``compact`` (``GuardSpaceConfig(compact_bases=True)``), ``N`` (``(n, k)``) whenever
            ``k - j <= n - k``: the leak vectors are then its last ``j`` columns and are not stored again.
        input_scale: ``(r,)`` per-component factor ``g`` of the input side: the adapter uses ``A_eff = g * A``
            (row ``i`` of ``A`` times ``g_i``). It decouples how fast ``A`` turns (set by the size of the stored
            ``A``) from how fast the update grows (set by the size of ``A_eff``); ones for the paper's factors.
        frozen_A: ``(r, n)`` = ``A0_eff P``.
        frozen_B: ``(m, r)`` = ``B0``.
        singular_values: ``(r,)`` the preconditioned singular values the adapter was initialised from.
        leak_vectors: ``(n, j)`` kept null directions with a nonzero eigenvalue (see ``ProjectorBasis``); not when
            they are columns of a compact basis.
        leak_values: ``(j,)`` their eigenvalues ``lambda_j`` of the calibration covariance ``C``.
        output_energy: ``()`` ``tr(W C W^T)``, the mean squared output of the base layer on calibration inputs.

    ``leakage_bound`` (from the config's ``max_calibration_leakage``, not saved here): bound on
    ``leakage / output_energy``, or ``None``.

    ``inference_only`` (an adapter loaded with ``is_trainable=False``): no ``basis`` and no ``leak_vectors`` are
    allocated. While the checkpoint loads, the trained input side ``A_eff P`` (after any leakage bound) is computed
    once from the checkpoint's tensors into ``folded_A`` (``(r, n)``), and the certificate into ``folded_leakage``
    (``()``); both are rebuilt at each load, never saved. The forward pass, merges, exports and the report then give
    what the trainable adapter gives, without the ``n x min(k, n - k)`` and ``n x j`` bases; training, re-projecting
    or saving it raises.

    Every buffer is read through ``.float()``: they are float32 (see `_apply()`), but FSDP's mixed precision casts
    buffers by assigning ``.data``, which no module hook sees.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        null_dim: int,
        leak_dim: int = 0,
        device=None,
        inference_only: bool = False,
        scaling: float = 1.0,
        compact: bool = False,
    ) -> None:
        super().__init__()
        self.null_dim = null_dim
        self.compact = compact
        stored = null_dim - leak_dim if compact else null_dim  # the rule of null_space_basis
        self.kind = "null" if stored <= in_features - null_dim else "range"
        self.leakage_bound: float | None = None
        self.inference_only = inference_only
        self.scaling = scaling  # the layer's LoRA scaling, needed to fold an inference-only adapter at load time
        width = null_dim if self.kind == "null" else in_features - null_dim
        # NaN until filled by the initialiser or a checkpoint: a forward with unfilled buffers fails loudly.
        nan = dict(dtype=torch.float32, device=device)
        if inference_only:  # no projector basis: the trained input side is folded at load time (see class docstring)
            self.register_buffer("folded_A", torch.full((r, in_features), float("nan"), **nan), persistent=False)
            self.register_buffer("folded_leakage", torch.tensor(float("nan"), **nan), persistent=False)
        else:
            self.register_buffer("basis", torch.full((in_features, width), float("nan"), **nan))
        self.register_buffer("input_scale", torch.ones(r, **nan))  # adapters saved before it existed: ones
        self.register_buffer("frozen_A", torch.full((r, in_features), float("nan"), **nan))
        self.register_buffer("frozen_B", torch.full((out_features, r), float("nan"), **nan))
        self.register_buffer("singular_values", torch.full((r,), float("nan"), **nan))
        if not (inference_only or self.leak_in_basis):
            self.register_buffer("leak_vectors", torch.full((in_features, leak_dim), float("nan"), **nan))
        self.register_buffer("leak_values", torch.full((leak_dim,), float("nan"), **nan))
        self.register_buffer("output_energy", torch.tensor(float("nan"), **nan))

    @property
    def leak_in_basis(self) -> bool:
        """Whether the leak vectors are the last columns of the (compact, null) basis rather than a buffer."""
        return self.compact and self.kind == "null"

    def leak_directions(self) -> torch.Tensor:
        """``(n, j)`` the leaking null directions: ``leak_vectors``, or the last ``j`` columns of a compact basis."""
        if self.leak_in_basis:
            return leak_columns(self.basis, self.leak_values.numel())
        return self.leak_vectors

    def project(self, lora_A: torch.Tensor) -> torch.Tensor:
        """``lora_A @ P`` (``(r, n)``)."""
        if self.inference_only:
            raise RuntimeError(INFERENCE_ONLY_MESSAGE)
        return project_rows(lora_A, self.basis.float(), self.kind)

    def effective_A(self, lora_A: torch.Tensor) -> torch.Tensor:
        """``g * (A P)`` in float32 (``(r, n)``), the input side the adapter applies."""
        return self.project(lora_A.float()) * self.input_scale.float().unsqueeze(1)

    def leakage(
        self, trained_A: torch.Tensor, frozen_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """``sum_j lambda_j ||dW n_j||^2`` for ``dW = s (B A_eff - B0 A0_eff) P``, in ``O(r n j + m r j)``.

        The expected squared change of this layer's output on the calibration inputs (exact-null directions
        contribute nothing). ``trained_A``, ``frozen_A``: the ``(r, n)`` input sides ``A_eff P`` and ``A0_eff P``.
        An inference-only state returns the figure computed when it was loaded.
        """
        if self.inference_only:
            return self.folded_leakage.float()
        return _leakage(trained_A, frozen_A, lora_B, self.frozen_B, self.leak_directions(), self.leak_values, scaling)

    def input_factors(
        self, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 ``(r, n)`` input sides ``(A_eff P, A0_eff P)`` of the trained and frozen terms.

        With ``leakage_bound`` set, the near-null component of the update is scaled down by
        ``c = min(1, sqrt(leakage_bound * output_energy / leakage))`` (computed without gradient, like a clip), so
        that the certified leakage of the update actually applied never exceeds the bound. No branch on tensor
        values: no device-to-host synchronisation per forward. An inference-only state returns the factors folded
        at load time, and raises if ``lora_A`` or ``lora_B`` is being trained.
        """
        if self.inference_only:
            if torch.is_grad_enabled() and (lora_A.requires_grad or lora_B.requires_grad):
                raise RuntimeError(INFERENCE_ONLY_MESSAGE)
            return self.folded_A.float(), self.frozen_A.float()
        trained_A, frozen_A = self.effective_A(lora_A), self.frozen_A.float()
        return _bounded(
            trained_A, frozen_A, lora_B, self.frozen_B, self.leak_directions(), self.leak_values, self.output_energy,
            self.leakage_bound, scaling,
        )  # fmt: skip

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        """Adapters saved by peft-safety 0.1 have no ``input_scale`` (ones: their factors were applied as they are)
        and no certificate buffers: load them with one clear warning instead of PEFT's missing-key list."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)
        registered = [name for name in LEGACY_BUFFERS if name in self._buffers]
        legacy = [prefix + name for name in registered if prefix + name not in state_dict]
        if legacy and prefix + "frozen_A" in state_dict:
            for key in legacy:
                if key in missing_keys:
                    missing_keys.remove(key)
            warnings.warn(
                "This GuardSpace adapter was saved by peft-safety 0.1: it loads and computes as before, but it holds "
                "no leakage certificate (guardspace_report shows NaN) and max_calibration_leakage cannot be enforced. "
                "Re-create the adapter from its statistics to get both.",
                UserWarning,
                stacklevel=2,
            )

    @torch.no_grad()
    def fold(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fill ``folded_A`` and ``folded_leakage`` of an inference-only state from checkpoint tensors; return the
        frozen input side to load as ``frozen_A`` (``(r, n)``, scaled down with the trained one under a bound).

        ``tensors``: ``lora_A`` (``(r, n)``), ``lora_B`` (``(m, r)``), ``basis``, ``frozen_A``, ``frozen_B``, and,
        unless saved by peft-safety 0.1, ``input_scale``, ``leak_vectors``, ``leak_values``, ``output_energy``: the
        same float32 operations as a trainable adapter's forward pass, done once.
        """
        device = self.folded_A.device
        # fresh (aligned) copies: CPU GEMM kernels may round differently on the file's unaligned memory-mapped tensors
        get = {name: value.to(device, copy=True) for name, value in tensors.items()}.get
        input_scale = get("input_scale", torch.ones(self.folded_A.shape[0], device=device))
        trained_A = project_rows(get("lora_A").float(), get("basis").float(), self.kind)
        trained_A = trained_A * input_scale.float().unsqueeze(1)
        frozen_A, lora_B, frozen_B = get("frozen_A").float(), get("lora_B").float(), get("frozen_B")
        values = get("leak_values")
        if values is None:  # saved by peft-safety 0.1: no certificate
            self.folded_A.copy_(trained_A)
            self.folded_leakage.fill_(float("nan"))
            return frozen_A
        vectors = leak_columns(get("basis"), values.numel()) if self.leak_in_basis else get("leak_vectors")
        trained_A, frozen_A = _bounded(
            trained_A, frozen_A, lora_B, frozen_B, vectors, values, get("output_energy"), self.leakage_bound,
            self.scaling,
        )  # fmt: skip
        self.folded_A.copy_(trained_A)
        self.folded_leakage.copy_(_leakage(trained_A, frozen_A, lora_B, frozen_B, vectors, values, self.scaling))
        return frozen_A

    def _apply(self, fn, recurse: bool = True):
        """Move the buffers with the model but keep them float32: ``model.to(torch.bfloat16)`` would otherwise round
        the basis, and a rounded ``P`` is no longer a projector (the update would leak onto calibration inputs)."""
        return super()._apply(_keeping_dtype(fn), recurse)

    def extra_repr(self) -> str:
        return f"null_dim={self.null_dim}, stored={self.kind}, leaking={self.leak_values.numel()}"


class DtypeKeepingLinear(nn.Linear):
    """``lora_A`` / ``lora_B`` of a GuardSpace adapter: they move with the model but keep their dtype on casts.

    ``model.to(torch.bfloat16)`` would round ``A`` and ``B`` but not the float32 frozen offset ``B0 (A0_eff P)``:
    the two terms no longer cancel, and with the paper's unbalanced factors (``A`` large, ``B`` small) the rounding
    of each factor reaches the calibration outputs (about 1 % of the logits of SmolLM2-135M before any training).
    The adapter branch runs in float32 anyway; these are rank-``r`` matrices.
    """

    def _apply(self, fn, recurse: bool = True):
        return super()._apply(_keeping_dtype(fn), recurse)


class GuardSpaceVariant(lora_layer.LoraVariant):
    """``LoraVariant`` hooks for GuardSpace adapters on `GuardSpaceLinear`."""

    @staticmethod
    def init(module: GuardSpaceLinear, adapter_name: str, **kwargs: Any) -> None:
        from .initialization import initialize_layer  # local import: initialisation needs the config module

        initialize_layer(module, adapter_name, kwargs["config"], kwargs["target_name"])

    @staticmethod
    def delta_weight(module: GuardSpaceLinear, adapter_name: str) -> torch.Tensor:
        """``s (B A_eff P - B0 A0_eff P)`` in the base weight's layout (transposed for ``fan_in_fan_out``)."""
        trained_A, frozen_A, lora_B, frozen_B = GuardSpaceVariant.factors(module, adapter_name)
        delta = lora_B @ trained_A - frozen_B @ frozen_A
        return transpose(delta * module.scaling[adapter_name], module.fan_in_fan_out)

    @staticmethod
    def factors(
        module: GuardSpaceLinear, adapter_name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 ``(A_eff P, A0_eff P, B, B0)``: the update is ``s (B A_eff P - B0 A0_eff P)``."""
        state = module.lora_guard[adapter_name]
        lora_B = module.lora_B[adapter_name].weight.float()
        trained_A, frozen_A = state.input_factors(
            module.lora_A[adapter_name].weight, lora_B, module.scaling[adapter_name]
        )
        return trained_A, frozen_A, lora_B, state.frozen_B.float()

    @staticmethod
    def merge_safe(module: GuardSpaceLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = GuardSpaceVariant.delta_weight(module, active_adapter)
        return (orig_weight.float() + delta).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: GuardSpaceLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        delta = GuardSpaceVariant.delta_weight(module, active_adapter)
        orig_weight.data = (orig_weight.data.float() + delta).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: GuardSpaceLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = GuardSpaceVariant.delta_weight(module, active_adapter)
        return (orig_weight.data.float() - delta).to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: GuardSpaceLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        state = module.lora_guard[active_adapter]
        lora_A = module.lora_A[active_adapter].weight
        lora_B = module.lora_B[active_adapter].weight
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        # The adapter branch runs in float32 outside autocast, exactly as frozen_A = A0_eff P was computed at init:
        # the two terms then cancel exactly at init whatever the dtypes, and A_eff P is never rounded to bf16. A
        # rounded A_eff P is no longer zero on the calibration inputs: its rounding error (~4e-3 relative in bf16)
        # would reach the output. Only the (rank-r) adapter matmuls pay the float32 price; the base layer keeps its
        # dtype. The offset sees the same dropped-out input as the trained term (as plain LoRA's delta does): the
        # layer is W x + dW dropout(x) with dW = s (B A_eff - B0 A0_eff) P, equal to the base at init in training too.
        with torch.autocast(device_type=x.device.type, enabled=False):
            projected_A, frozen_A = state.input_factors(lora_A, lora_B, scaling)
            dropped = dropout(x).float()
            trained = F.linear(F.linear(dropped, projected_A), lora_B.float())
            offset = F.linear(F.linear(dropped, frozen_A), state.frozen_B.float())
        return result + ((trained - offset) * scaling).to(result.dtype)


class GuardSpaceLayerMixin:
    """What a PEFT LoRA layer class needs to also hold GuardSpace adapters (``init_lora_weights="guardspace"``).

    Mixed in before a ``peft`` LoRA layer class; plain LoRA adapters on the same layer stay PEFT's.
    """

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs: Any) -> None:
        if "lora_guard" not in self._modules:  # first adapter: nn.Module.__init__ has run by now
            self.lora_guard = nn.ModuleDict()
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        if config.init_lora_weights == GUARDSPACE_INIT:
            for factors in (self.lora_A, self.lora_B):
                if type(factors[adapter_name]) is nn.Linear:
                    factors[adapter_name].__class__ = DtypeKeepingLinear

    def resolve_lora_variant(self, *, config, **kwargs: Any):
        if config.init_lora_weights == GUARDSPACE_INIT:
            return GuardSpaceVariant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        if init_lora_weights == GUARDSPACE_INIT:
            return  # GuardSpaceVariant.init sets A and B
        super().reset_lora_parameters(adapter_name, init_lora_weights)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if adapter in self.lora_guard:
            delta = GuardSpaceVariant.delta_weight(self, adapter)
            return delta.to(self.lora_B[adapter].weight.dtype)
        return super().get_delta_weight(adapter)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        """Fold inference-only GuardSpace adapters (see `GuardState`) from this layer's part of the checkpoint.

        PEFT hands over the checkpoint's ``basis`` and ``leak_vectors`` under ``<layer>.lora_guard.<name>`` without
        the adapter name (the model has no such buffers); they are read here, where the adapter's ``lora_A`` and
        ``lora_B`` are visible too, and dropped. The children (``lora_A``, ``lora_guard``, ...) load after this.
        """
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)
        states = self._modules.get("lora_guard") or {}
        loading = [
            name
            for name, state in states.items()
            if state.inference_only and f"{prefix}lora_A.{name}.weight" in state_dict
        ]
        if not loading:
            return
        if len(loading) > 1:
            errors.append(f"{prefix}: cannot tell which of {loading} the checkpoint's GuardSpace basis belongs to.")
            return
        name = loading[0]
        own = f"{prefix}lora_guard.{name}."
        tensors = {key.removeprefix(own): value for key, value in state_dict.items() if key.startswith(own)}
        tensors["lora_A"] = state_dict[f"{prefix}lora_A.{name}.weight"]
        tensors["lora_B"] = state_dict[f"{prefix}lora_B.{name}.weight"]
        for buffer in ("basis", "leak_vectors"):
            for key in (f"{prefix}lora_guard.{buffer}", own + buffer):
                if key in state_dict:
                    tensors[buffer] = state_dict.pop(key)
        if "basis" not in tensors or "frozen_A" not in tensors:
            errors.append(
                f"{prefix}: the checkpoint holds no GuardSpace basis for the inference-only adapter '{name}'."
            )
            return
        state_dict[own + "frozen_A"] = states[name].fold(tensors)  # the children load from this dict

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.lora_guard:
            del self.lora_guard[adapter_name]

    def __repr__(self) -> str:
        return "guardspace." + super().__repr__()


class GuardSpaceLinear(GuardSpaceLayerMixin, lora_layer.Linear):
    """``lora.Linear`` (``nn.Linear`` and GPT-2 ``Conv1D`` bases) that can also hold GuardSpace adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        _set_fan_in_fan_out(base_layer, config, kwargs)
        super().__init__(base_layer, adapter_name, config=config, **kwargs)


def _set_fan_in_fan_out(base_layer: nn.Module, config, kwargs: dict[str, Any]) -> None:
    """Set ``config.fan_in_fan_out`` for this layer as PEFT's ``dispatch_default`` does, with PEFT's warnings.

    ``lora.Linear`` reads the flag from the config it is built with, and one config builds every layer: a GPT-2
    ``Conv1D`` sets it ``True``, so the next ``nn.Linear`` (e.g. an untied ``lm_head``) must set it back to ``False``,
    or it would read its ``(out, in)`` weight transposed (init from ``W^T``, merge adding ``dW^T``).
    """
    base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
    if isinstance(base, Conv1D) or kwargs.get("is_target_conv_1d_layer"):
        kwargs["is_target_conv_1d_layer"] = True
        if not config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
                stacklevel=4,
            )
            config.fan_in_fan_out = True
    elif isinstance(base, nn.Linear) and config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
            "Setting fan_in_fan_out to False.",
            stacklevel=4,
        )
        config.fan_in_fan_out = False
