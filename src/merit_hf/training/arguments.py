"""Moved to `merit_hf.utils.arguments`; this alias of it is kept for one release (0.2) and then removed."""

import sys

from ..utils import arguments as _moved

sys.modules[__name__] = _moved
