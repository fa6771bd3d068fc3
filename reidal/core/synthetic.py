"""Moved to :mod:`reidal.simulation.synthetic` (simulation helpers are not production code).

This name stays one release for code written against the old path, then goes; import
``reidal.simulation.synthetic`` instead.
"""

import sys

from reidal.simulation import synthetic as _moved

sys.modules[__name__] = _moved
