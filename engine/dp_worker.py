"""Entry point of a data-parallel replica process: `python -m engine.dp_worker ADDRESS INDEX`."""

from engine.data_parallel import main

if __name__ == "__main__":
    main()
