"""GuardSpace adapters on bitsandbytes 4-bit and 8-bit base layers (QLoRA).

PEFT's ``lora.bnb.Linear4bit`` / ``Linear8bitLt`` pick their ``LoraVariant`` from a hard-coded chain (DoRA, aLoRA,
Arrow) and never see ``init_lora_weights="guardspace"``. The two classes here resolve `GuardSpaceVariant`
explicitly and otherwise stay PEFT's layers:

* forward: PEFT's bnb forward calls ``GuardSpaceVariant.forward``, the very function ``GuardSpaceLinear`` uses
  (offset form ``y = W_q x + s (B A P - B0 A0 P) x``, the quantised ``W_q`` untouched: nothing is re-quantised
  while training, so the calibration guarantee holds exactly on the quantised model);
* merge / unmerge: PEFT's bnb merge dequantises ``W_q``, calls the variant (``W_q + dW`` with the exact
  GuardSpace ``dW = s (B A - B0 A0) P``) and re-quantises. Merging into a quantised weight adds one quantisation
  error, as with plain QLoRA merges.

The init reads the dequantised weight (``peft.utils.integrations.dequantize_module_weight``).
Only bitsandbytes is supported among quantisation backends: see `check_quantization()`.
"""

from __future__ import annotations

from typing import Any

from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from torch import nn

from .layer import GuardSpaceLayerMixin

SUPPORTED_QUANTIZATION = "bitsandbytes 4-bit (nf4/fp4, double quantisation on or off) and 8-bit (LLM.int8())"
_BNB_METHODS = {"bitsandbytes", "bitsandbytes_4bit", "bitsandbytes_8bit"}
# class names of quantised linear layers of other backends (GPTQ/AutoRound, AWQ, HQQ, EETQ, AQLM, Quanto, FP8...)
_FOREIGN_QUANT_LAYERS = {
    "QuantLinear": "GPTQ",
    "WQLinear": "AWQ",
    "WQLinear_GEMM": "AWQ",
    "WQLinear_GEMV": "AWQ",
    "HQQLinear": "HQQ",
    "HQQLinearLoRA": "HQQ",
    "EetqLinear": "EETQ",
    "QuantizedLinear": "AQLM",
    "QLinear": "Quanto",
    "FP8Linear": "FP8",
}


def _quant_method(model: nn.Module) -> str | None:
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method)).lower() if method is not None else None


def check_quantization(model: nn.Module) -> None:
    """Raise a ``ValueError`` naming what is supported when ``model`` is quantised with a backend other than
    bitsandbytes. Reads the model only (call it before any change to the model).
    """
    method = _quant_method(model)
    found = None if method is None or method in _BNB_METHODS else (method, "quantization_config")
    if found is None:
        for name, module in model.named_modules():
            backend = _FOREIGN_QUANT_LAYERS.get(type(module).__name__)
            if backend is None and hasattr(module, "W_q"):
                backend = "HQQ"
            weight = getattr(module, "weight", None)
            if backend is None and type(weight).__module__.startswith("torchao"):
                backend = "torchao"
            if backend is not None:
                found = (backend, f"layer '{name}' ({type(module).__name__})")
                break
    if found is not None:
        raise ValueError(
            f"GuardSpace does not support {found[0]}-quantised models (found via {found[1]}). Supported: "
            f"full-precision (fp32/bf16/fp16) bases and {SUPPORTED_QUANTIZATION}, e.g. "
            "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'). The model was not modified."
        )


class _GuardSpaceBnbMixin(GuardSpaceLayerMixin):
    """PEFT's bnb LoRA layers call ``update_layer`` without ``target_name``, which the GuardSpace init needs."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, target_name: str = "", **kwargs: Any):
        self.__dict__["_guardspace_target_name"] = target_name
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs: Any) -> None:
        if not kwargs.get("target_name"):
            kwargs["target_name"] = self.__dict__.get("_guardspace_target_name", "")
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)


BNB_LAYERS: dict[type[nn.Module], type[nn.Module]] = {}
"""bitsandbytes layer class -> GuardSpace layer class (empty without bitsandbytes)."""

if is_bnb_4bit_available():
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as lora_bnb

    class GuardSpaceLinear4bit(_GuardSpaceBnbMixin, lora_bnb.Linear4bit):
        """PEFT's 4-bit LoRA layer (nf4 / fp4, with or without double quantisation) holding GuardSpace adapters."""

    BNB_LAYERS[bnb.nn.Linear4bit] = GuardSpaceLinear4bit

if is_bnb_available():
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as lora_bnb

    class GuardSpaceLinear8bitLt(_GuardSpaceBnbMixin, lora_bnb.Linear8bitLt):
        """PEFT's LLM.int8() LoRA layer holding GuardSpace adapters."""

    BNB_LAYERS[bnb.nn.Linear8bitLt] = GuardSpaceLinear8bitLt
