"""The sparse-label benchmark's parts (``benchmarks/sparse_bench.py`` is the entry point).

- :mod:`sparse.report`: per-effort summaries, slices needed to reach a fraction of the
  whole-volume Dice, markdown, the summary line and the figure, from a results file.
"""
