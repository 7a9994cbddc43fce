"""``python -m cvops_dagster.cli``: the same entry point as the ``cvops`` command."""

import sys

from cvops_dagster.cli import main

sys.exit(main())
