"""``python -m reidal_wildbook sync ...``: see :mod:`reidal_wildbook.cli`."""

import sys

from reidal_wildbook.cli import main

sys.exit(main())
