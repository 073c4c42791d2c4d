"""Moved to `merit_hf.models.wfdb_io`; this alias of it is kept for one release (0.2) and then removed."""

import sys

from ..models import wfdb_io as _moved

sys.modules[__name__] = _moved
