"""Worker: run a command under strace, tracing openat into one file per MPI rank. Args: OUT_DIR CMD...

mpirun starts this once per rank; it execs strace, which follows every thread and child of the command, so the
trace holds every file the rank opens, also the ones it closes again (an fd snapshot would miss those).
"""

import os
import sys

out, cmd = sys.argv[1], sys.argv[2:]
rank = os.environ.get("OMPI_COMM_WORLD_RANK", "0")
os.execvp("strace", ["strace", "-f", "-qq", "-e", "trace=openat", "-o", f"{out}/rank{rank}.trace", *cmd])
