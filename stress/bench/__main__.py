"""``python -m stress.bench``: see :mod:`stress.bench`."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
