"""``python -m moderator``: the same command line as ``moderator``."""

import sys

from moderator.cli import main

sys.exit(main())
