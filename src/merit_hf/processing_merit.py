"""Moved to `merit_hf.models.merit.processing_merit`; this alias of it is kept for one release (0.2) and then removed."""

import sys

from .models.merit import processing_merit as _moved

sys.modules[__name__] = _moved
