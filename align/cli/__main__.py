"""`python -m align.cli`: the same as the `align` command."""

import sys

from align.cli import main

sys.exit(main())
