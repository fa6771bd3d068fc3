"""Moved to :mod:`reidal.simulation.loop` (simulation helpers are not production code).

This name stays one release for code written against the old path, then goes; import
``reidal.simulation.loop`` instead.
"""

import sys

from reidal.simulation import loop as _moved

sys.modules[__name__] = _moved
