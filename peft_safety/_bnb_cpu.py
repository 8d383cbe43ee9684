"""bitsandbytes' packed bf16 fast path for 4-bit layers on CPU, and how peft_safety keeps it off.

On CPUs with AVX512-BF16, bitsandbytes (0.49 and later) converts a ``Linear4bit`` weight the first time the layer
runs in eval mode without gradients: the 4-bit codes are re-laid out for a fused kernel, the block scales
(``absmax``) are rounded to bfloat16 (and double quantisation is undone), and from then on every forward, in
training too, computes in bfloat16 whatever ``bnb_4bit_compute_dtype`` says. Three things follow:

* results change by bfloat16 rounding (about 4e-3 relative), so GuardSpace's calibration guarantee, exact to float32
  rounding on the unpacked layer, only holds to bfloat16 rounding;
* ``bitsandbytes.functional.dequantize_4bit`` (what PEFT's merge and GuardSpace's init read) does not understand the
  packed layout and returns a wrong weight;
* ``state_dict`` / ``save_pretrained`` converts the weight back in place, best effort only: double-quantised scales
  are quantised again from their bfloat16 values (the live weight moves by ~0.2 %), and without double quantisation
  the scales stay transposed in bfloat16 (the live weight is wrong as soon as a row has more than one block).

[`disable_bnb_cpu_packing()`][peft_safety.disable_bnb_cpu_packing] turns the conversion off for every 4-bit layer of a
model and undoes it where it already happened. peft_safety calls it when it collects statistics on a model and when it
adds GuardSpace adapters.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a model is handled, not when ``peft_safety`` is (fast CLI start-up)
    from torch import nn

_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_KERNEL_HINT = "Failed to load CPU gemm_4bit_forward"


class _DemoteKernelHint(logging.Filter):
    """Turn bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning into a debug record.

    bitsandbytes logs it when it is imported on an AVX512-BF16 CPU without the optional ``kernels`` package (a
    speed-up downloaded from the Hugging Face Hub for the packed path above). Without a logging set-up Python prints
    it on stderr, where it would be the second line of every ``peft-safety`` error message.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith(_KERNEL_HINT):
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return True


def demote_bnb_cpu_kernel_hint() -> None:
    """Log bitsandbytes' optional-CPU-kernel hint at debug level (once per process; a no-op without bitsandbytes)."""
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    if not any(isinstance(existing, _DemoteKernelHint) for existing in logger.filters):
        logger.addFilter(_DemoteKernelHint())


def _unpack(module: nn.Module) -> None:
    """Put a packed ``Linear4bit`` weight back into bitsandbytes' usual layout (bitsandbytes' own inverse, then the
    scales of a layer without double quantisation, which that inverse leaves transposed in bfloat16)."""
    import bitsandbytes as bnb
    import torch

    weight = module.weight
    weight.data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if not state.nested and state.absmax.dim() == 2:  # (in / blocksize, out) -> the flat (out, in / blocksize) order
        state.absmax = state.absmax.T.reshape(-1).to(torch.float32)
    weight.quant_state = state
    if getattr(module, "quant_state", None) is not None:
        module.quant_state = state


def disable_bnb_cpu_packing(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` on its plain path: dequantise, then compute in
    ``bnb_4bit_compute_dtype``. Returns the number of layers changed (0 without bitsandbytes or on other CPUs).

    Call it right after loading a 4-bit model on CPU if you need float32-exact results, ``save_pretrained`` that
    leaves the model as it was, or merges (plain LoRA included); peft_safety calls it itself in
    [`collect_safety_statistics()`][peft_safety.collect_safety_statistics] and when it adds GuardSpace adapters. A
    layer that already ran in eval mode is converted back, with the loss described in this module's docstring; loading
    the model afresh avoids that. GPU layers are not affected (the conversion is CPU-only); CPU inference loses the
    bfloat16 kernel's speed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    linear4bit = getattr(bnb.nn, "Linear4bit", None)
    if linear4bit is None:
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, linear4bit):
            continue
        packed = getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False)
        if getattr(module, "support_avx512bf16_for_cpu", False) or packed:
            changed += 1
        module.support_avx512bf16_for_cpu = False
        if packed:
            _unpack(module)
    return changed


demote_bnb_cpu_kernel_hint()  # at import: ``peft_safety/__init__`` imports this module before ``peft``
