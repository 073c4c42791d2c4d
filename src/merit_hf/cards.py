"""Moved to `merit_hf.hub.cards`; this alias of it is kept for one release (0.2) and then removed."""

import sys

from .hub import cards as _moved

sys.modules[__name__] = _moved
