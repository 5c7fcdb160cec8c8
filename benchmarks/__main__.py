"""`python -m benchmarks`: the benchmark suite (see `benchmarks.suite`)."""

from .suite import main

if __name__ == "__main__":
    main()
