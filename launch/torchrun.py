"""The torchrun entry point: `torchrun --nproc-per-node N -m longtune.launch.torchrun CFG [key=value ...]`.

Every process runs `longtune train CFG ...` as one rank of the group torchrun set up (`longtune resume RUN ...`
when the first argument is `resume`). With `--max-restarts`, a restarted group continues from the newest
complete checkpoint by itself. `longtune train CFG --nproc N` starts this through torch.distributed.run.
"""

import signal
import sys

from longtune.launch.cli import main  # first: it takes the folder torchrun started us in off sys.path
from longtune.launch.distributed import die_with_parent

if __name__ == "__main__":
    die_with_parent()  # a rank does not outlive its launcher
    argv = sys.argv[1:]
    debug = ["--debug"] if "--debug" in argv[:1] else []
    argv = argv[len(debug):]
    code = main([*debug, *(argv if argv[:1] in (["train"], ["resume"]) else ["train", *argv])])
    # The launcher stops the other ranks with SIGTERM once one fails; arriving while this one exits (Python has
    # put the default action back by then), it would turn the exit code the launcher reports into "killed".
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)
