"""Entry point of an engine core process: `python -m engine.core ADDRESS INDEX`."""

import os
import sys

from engine.core.engine_core import main

if __name__ == "__main__":
    main()
    # Done and disconnected: skip the interpreter's teardown of torch, a third of a second the
    # engine closing this process would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
