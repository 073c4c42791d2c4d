"""Moved to `merit_hf.hub.cards`; this alias of it is kept for one release (0.2) and then removed."""

import sys

from .hub import cards as _moved

if __name__ == "__main__":  # `python -m merit_hf.cards`: the command line of `python -m merit_hf.hub.cards`
    _moved.cli()
else:
    sys.modules[__name__] = _moved
