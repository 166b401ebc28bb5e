"""The benchmark suite: `resaspp bench` (or `python benchmarks/run.py`), see benchmarks/README.md.

    main(argv) -> exit status   run the suite for command-line arguments argv (a list of strings)

Modules: presets (the workloads), providers (what is timed), workloads (inputs, float64 reference),
correctness (the error rule), timing, ceiling (bf16 matmul rate), environment (metadata),
report / plot (outputs), options (the command line), suite (the loop).
Importing this package queries no GPU.
"""
from __future__ import annotations


def main(argv=None) -> int:
    """Runs `resaspp bench ARGS` for argv (default: sys.argv[1:]); returns the exit status:
    0 on success, 1 when some fused provider was wrong or failed or some baseline failed to run (a
    baseline past the error rule is timed and reported, not an error), 2 on a usage error."""
    import sys

    from resaspp_ops.bench.suite import run

    return run(sys.argv[1:] if argv is None else argv)


__all__ = ["main"]
