"""Entry point of a tensor-parallel worker rank:
`python -m engine.parallel.tp_worker INIT RANK SIZE DEVICE`."""

import os
import sys

from engine.parallel.tensor_parallel import main

if __name__ == "__main__":
    main()
    # Done and disconnected: skip the interpreter's teardown of torch, a third of a second the
    # engine closing this process would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
