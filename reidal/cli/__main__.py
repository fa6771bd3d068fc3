"""``python -m reidal.cli ...``: the `reidal` command (tests and benchmarks start servers so)."""

import sys

from reidal.cli.app import main

sys.exit(main())
