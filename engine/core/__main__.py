"""Entry point of an engine core process: `python -m engine.core ADDRESS INDEX`."""

from engine.core.engine_core import main

if __name__ == "__main__":
    main()
