"""``python -m stress.http`` (see :mod:`stress.http`)."""

import sys

from stress.http.cli import main

sys.exit(main())
