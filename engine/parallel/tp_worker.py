"""Entry point of a tensor-parallel worker rank:
`python -m engine.parallel.tp_worker INIT RANK SIZE DEVICE`."""

from engine.parallel.tensor_parallel import main

if __name__ == "__main__":
    main()
