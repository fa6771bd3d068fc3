"""Moved to :mod:`reidal.simulation.oracle` (simulation helpers are not production code).

This name stays one release for code written against the old path, then goes; import
``reidal.simulation.oracle`` instead.
"""

import sys

from reidal.simulation import oracle as _moved

sys.modules[__name__] = _moved
