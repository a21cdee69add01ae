"""A stand-in command for launcher tests (flows/launcher/ runs it instead of `speechpairs`): it shows
what the runner inherited (argv, cwd, environment, terminal) and how it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CLIENT = ("import sys\nfrom flows.launcher import delegate\nrc = delegate(sys.argv[1:])\n"
          "print('FALLBACK' if rc is None else f'DELEGATED {rc}', flush=True)\nsys.exit(0 if rc is None else rc)\n")


def main(argv: list[str]) -> int:
    what = argv[1]
    if what == "echo":
        print(f"ARGV {argv}")
        print(f"CWD {os.getcwd()}")
        print(f"VAR {os.environ.get('SP_TEST_VAR')}")
        print("ERR line", file=sys.stderr)
        return int(argv[2])
    if what == "sleep":  # until a signal: SIGINT → "interrupted" and 130, SIGTERM → a marker file
        marker = Path(argv[2])

        def on_term(_signum: int, _frame: object) -> None:
            Path(f"{marker}.tmp").write_text("term")
            os.replace(f"{marker}.tmp", marker)  # whole or absent: the test polls for it
            os._exit(143)

        signal.signal(signal.SIGTERM, on_term)
        Path(f"{marker}.pid").write_text(str(os.getpid()))
        print("SLEEPING", flush=True)
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            return 130
        return 0
    if what == "nested":  # a command started by a runner asks the launcher again: it must be declined
        inner = subprocess.run([sys.executable, "-c", CLIENT, "run", "echo", "0"], capture_output=True, text=True,
                               timeout=60, check=False)
        print(f"INNER {inner.stdout.strip()}")
        return 0
    return 2
