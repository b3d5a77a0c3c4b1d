"""``python -m moe_atlas`` = the ``moe-atlas`` command."""

import sys

from .cli import main

sys.exit(main())
