"""``python -m qmpjobd``: the same as the ``qmpjobd`` console script."""

import sys

from qmpjobd.cli import main

sys.exit(main())
