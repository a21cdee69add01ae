"""`python -m flows.cli …`: the same as the `speechpairs` command."""

import sys

from flows.cli import main

sys.exit(main())
