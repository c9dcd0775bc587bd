"""Entry point of a tensor-parallel worker rank: `python -m engine.tp_worker INIT RANK SIZE DEVICE`."""

from engine.tensor_parallel import main

if __name__ == "__main__":
    main()
