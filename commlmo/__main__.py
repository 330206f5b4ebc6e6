"""``python -m commlmo`` is the ``commlmo`` command."""

import sys

from .cli import main

sys.exit(main())
