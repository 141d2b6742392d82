"""``python -m visionlin.train ...``: the same as ``visionlin train ...``."""

import sys

from .trainer import main

sys.exit(main())
