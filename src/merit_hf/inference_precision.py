"""Moved to `merit_hf.models.merit.inference_precision`; this alias of it is kept for one release (0.2) and then removed."""

import sys

from .models.merit import inference_precision as _moved

sys.modules[__name__] = _moved
