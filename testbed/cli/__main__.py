"""``python -m testbed.cli``: the ``netswap`` command."""

import sys

from testbed.cli import main

sys.exit(main())
