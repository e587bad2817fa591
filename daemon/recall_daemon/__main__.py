"""`python -m recall_daemon ...` runs the daemon's command line (as `recall-daemon`)."""

import sys

from .cli import main

sys.exit(main())
