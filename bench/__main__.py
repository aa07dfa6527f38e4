"""python -m longtune.bench NAME [--quick]: the same as `longtune bench`, which it runs in this process's place
(the command is launch/cli.py's: it imports bench, and bench imports nothing of launch)."""

import os
import sys

os.execv(sys.executable, [sys.executable, "-m", "longtune.launch.cli", "bench", *sys.argv[1:]])
