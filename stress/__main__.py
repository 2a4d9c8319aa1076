"""``python -m stress``: see :mod:`stress.cli`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # The running cell was killed and the database dropped on the way out.
        print("stress: interrupted", file=sys.stderr)
        sys.exit(130)
