"""`python -m merit_hf.hub push ...`: see `merit_hf.hub.push`."""

from .push import cli

cli()
