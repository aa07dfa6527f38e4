"""python -m longtune.bench NAME [--quick]: the same as `longtune bench`."""

import sys

from .runner import main

sys.exit(main())
