"""Benchmark suite of nns_cuda: the GPU and CPU speed goals, the gated floors, correctness first.

Entry point: ``python -m benchmarks.run`` (``benchmarks.run.main(argv)`` for the CLI).
``benchmarks/NOTES.md`` describes the method; ``benchmarks/RESULTS.md`` holds recorded runs.
"""
