"""``python -m peft_safety.cli``: the ``peft-safety`` console script."""

import sys

from .parser import main

sys.exit(main())
