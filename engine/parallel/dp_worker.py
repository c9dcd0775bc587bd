"""Entry point of a data-parallel replica process: `python -m engine.parallel.dp_worker ADDRESS INDEX`."""

from engine.parallel.data_parallel import main

if __name__ == "__main__":
    main()
