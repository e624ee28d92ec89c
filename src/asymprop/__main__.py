"""``python -m asymprop``: the same as the ``asymprop`` command."""

import sys

from .cli import main

sys.exit(main())
