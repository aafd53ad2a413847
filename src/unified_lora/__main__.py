"""`python -m unified_lora ...` runs the `unified-lora` command (`unified_lora.cli.main`); it said "No module named
unified_lora.__main__"."""

import sys

from .cli import main

sys.exit(main())
