"""``python -m reidal ...``: the `reidal` command."""

import sys

from reidal.cli.app import main

sys.exit(main())
