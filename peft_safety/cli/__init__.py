"""``peft-safety``: command-line access to statistics, SOMF merging, export, evaluation and reports.

Subcommands: ``stats``, ``merge``, ``export``, ``eval``, ``report``, ``safe-lora`` (``peft-safety <command>
--help``). Models and adapters are local folders (``save_pretrained`` output); nothing is downloaded. User mistakes
print one line on stderr and exit with code 2; set ``PEFT_SAFETY_DEBUG=1`` to see the full traceback instead.

The package: ``errors`` (usage errors), ``inputs`` (input files), ``models`` (model and adapter loading),
``commands`` (one function per subcommand), ``parser`` (arguments and ``main``). Importing it imports no torch,
transformers or peft, so ``--help`` answers at once.
"""

from __future__ import annotations

from .errors import EXIT_USAGE, UsageError
from .inputs import PROMPT_COLUMNS, load_prompts, read_rows
from .models import load_model
from .parser import build_parser, main

__all__ = [
    "EXIT_USAGE",
    "PROMPT_COLUMNS",
    "UsageError",
    "build_parser",
    "load_model",
    "load_prompts",
    "main",
    "read_rows",
]
