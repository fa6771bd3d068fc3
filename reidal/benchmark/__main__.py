"""``python -m reidal.benchmark ...`` = ``reidal bench ...``."""

import sys

from reidal.benchmark.runner import main

sys.exit(main())
