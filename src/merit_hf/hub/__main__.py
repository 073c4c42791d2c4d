"""`python -m merit_hf.hub push ...`: see `merit_hf.hub.push`."""

import sys

from .push import HubFolderError, main

try:
    main()
except HubFolderError as error:
    sys.exit(f"error: {error}")
