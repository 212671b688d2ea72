"""Runs every benchmark (quick modes with --quick) one after the other; each writes benchmarks/results/."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("helpers.py", os.path.join("methods", "run.py"), "kernels.py", "overhead.py", "learning.py")


def main() -> int:
    extra = sys.argv[1:]
    failed = []
    for script in BENCHMARKS:
        path = os.path.join(HERE, script)
        print(f"\n##### {script} {' '.join(extra)}", flush=True)
        if subprocess.call([sys.executable, path, *extra]) != 0:
            failed.append(script)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
