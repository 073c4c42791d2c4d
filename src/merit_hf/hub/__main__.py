"""`python -m merit_hf.hub push ...`: see `merit_hf.hub.push`."""

import sys

from .push import HubFolderError, HubPushError, main

try:
    main()
except (HubFolderError, HubPushError) as error:
    sys.exit(f"error: {error}")
