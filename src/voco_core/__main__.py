"""``python -m voco_core`` runs the ``voco`` command line."""

import sys

from voco_core.cli import main

sys.exit(main())
