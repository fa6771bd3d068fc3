"""Moved to :mod:`reidal.simulation.reference` (simulation helpers are not production code).

This name stays one release for code written against the old path, then goes; import
``reidal.simulation.reference`` instead.
"""

import sys

from reidal.simulation import reference as _moved

sys.modules[__name__] = _moved
