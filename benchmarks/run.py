"""Runs the benchmark suite: the same as `resaspp bench ARGS` (see benchmarks/README.md)."""
import sys

from resaspp_ops.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
