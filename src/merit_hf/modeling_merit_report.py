"""Moved to `merit_hf.models.merit.modeling_merit_report`; this alias of it is kept for one release (0.2) and then removed."""

import sys

from .models.merit import modeling_merit_report as _moved

sys.modules[__name__] = _moved
