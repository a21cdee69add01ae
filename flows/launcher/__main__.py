"""`python -m flows.launcher`: the launcher process (flows/launcher/serve.py)."""

import sys

from flows.launcher.serve import serve

sys.exit(serve())
