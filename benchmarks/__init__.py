"""Benchmark suite of nns_cuda (issue 4; DESIGN §2 floors, §4 habit 9).

Entry point: ``python -m benchmarks.run`` (``benchmarks.run.main(argv)`` for the CLI).
``benchmarks/NOTES.md`` describes the method; ``benchmarks/RESULTS.md`` holds recorded runs.
"""
