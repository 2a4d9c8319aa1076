"""``python -m stress``: see :mod:`stress.cli`. Run it from the repository checkout."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
