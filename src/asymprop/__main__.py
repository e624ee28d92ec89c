"""``python -m asymprop``: the same as the ``asymprop`` command."""

import sys

from .harness.cli import main

sys.exit(main())
