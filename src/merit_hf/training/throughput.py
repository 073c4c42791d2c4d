"""Moved to `merit_hf.utils.throughput`; this alias of it is kept for one release (0.2) and then removed."""

import sys

from ..utils import throughput as _moved

sys.modules[__name__] = _moved
